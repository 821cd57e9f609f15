"""The blocking and asyncio clients of rbr-serve, and the per-loop / per-process holders the adapters use."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from rbr_client._wire import (
    FAILOVER_STATUSES,
    RETRY_STATUSES,
    RETRY_TRANSPORT,
    GetRewardResult,
    Item,
    RewardResult,
    RewardServiceError,
    _chunks,
    _error_from_response,
    _get_reward_bodies,
    _item_payload,
    _merge_get_reward,
    _parse_results,
    _Retryable,
    _score_items,
    _transport_error,
    backoff_delay,
    base_urls,
)

log = logging.getLogger("rbr.client")

_USER_AGENT = "rbr-serve-client/0.1"



class _Base:
    def __init__(self, base_url: str | Sequence[str], api_key: str | None = None, *, timeout: float = 120.0,
                 connect_timeout: float = 5.0, max_retries: int = 4, backoff_base: float = 0.5,
                 backoff_max: float = 20.0, retry_after_max: float = 60.0, chunk_size: int = 256,
                 failover_cooldown: float = 5.0, headers: Mapping[str, str] | None = None,
                 rng: random.Random | None = None):
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_urls = base_urls(base_url)
        self.base_url = ",".join(self.base_urls)
        self.max_retries, self.chunk_size = max_retries, chunk_size
        self.backoff_base, self.backoff_max, self.retry_after_max = backoff_base, backoff_max, retry_after_max
        self.failover_cooldown = failover_cooldown
        self._rng = rng or random.Random()
        self._turn = itertools.count()  # round robin: next() is atomic under the GIL, so threads share it
        self._down_until = [0.0] * len(self.base_urls)  # monotonic time before which a URL is skipped
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._probe_timeout = httpx.Timeout(min(timeout, 10.0), connect=connect_timeout)
        self._headers = {"User-Agent": _USER_AGENT, **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def _outcome(self, resp: httpx.Response) -> Any:
        if resp.is_success:
            try:
                return resp.json()
            except ValueError:
                raise RewardServiceError(resp.status_code, "protocol_error", "answer is not JSON") from None
        err = _error_from_response(resp)
        if resp.status_code in RETRY_STATUSES:
            raise _Retryable(err)
        raise err

    def _first(self) -> int:
        """The URL a request starts on: the next in turn that is not marked down (the next in turn if all are)."""
        n = len(self.base_urls)
        start = next(self._turn) % n
        return self._after(start - 1) if n > 1 else 0

    def _after(self, index: int) -> int:
        """The next URL after `index` not marked down; the very next one when every other is down."""
        n, now = len(self.base_urls), time.monotonic()
        for k in range(1, n + 1):
            i = (index + k) % n
            if self._down_until[i] <= now:
                return i
        return (index + 1) % n

    def _moved(self, index: int, exc: Exception, tried: set[int]) -> tuple[int, bool]:
        """After a failure on URL `index`: the URL to try next, and whether to try it at once.

        A transport error or a 503 marks the URL down for `failover_cooldown` seconds and moves to the next one;
        the move is immediate while this request has URLs it has not tried since it last waited (the failure
        belongs to one replica, not to the service). Other retryable answers (429, 5xx) stay on the same URL."""
        if len(self.base_urls) == 1:
            return index, False
        status = exc.error.status if isinstance(exc, _Retryable) else None
        if isinstance(exc, _Retryable) and status not in FAILOVER_STATUSES:
            return index, False
        self._down_until[index] = time.monotonic() + self.failover_cooldown
        nxt = self._after(index)
        if nxt in tried:
            tried.clear()
            tried.add(nxt)
            return nxt, False
        tried.add(nxt)
        return nxt, True

    def _next_delay(self, attempt: int, exc: Exception, moving_to: str | None = None) -> float:
        """The wait before retry number `attempt + 1` (none when `moving_to` another URL), or raise the final
        error when retries are spent."""
        err = exc.error if isinstance(exc, _Retryable) else _transport_error(exc)
        err.attempts = attempt + 1
        if attempt >= self.max_retries:
            if isinstance(exc, _Retryable):
                raise err from None
            raise err from exc
        if moving_to is not None:
            log.warning("rbr-serve: %s; retry %d/%d on %s", err, attempt + 1, self.max_retries, moving_to)
            return 0.0
        if err.retry_after is not None:
            delay = min(err.retry_after, self.retry_after_max)
        else:
            delay = backoff_delay(attempt, self.backoff_base, self.backoff_max, self._rng)
        log.warning("rbr-serve: %s; retry %d/%d in %.2fs", err, attempt + 1, self.max_retries, delay)
        return delay

    def _failed(self, attempt: int, index: int, exc: Exception, tried: set[int]) -> tuple[int, float]:
        """The URL and the wait for the next attempt after `exc` on URL `index` (raises once retries are spent)."""
        nxt, at_once = self._moved(index, exc, tried)
        return nxt, self._next_delay(attempt, exc, self.base_urls[nxt] if at_once else None)


class RewardClient(_Base):
    """Blocking client (thread-safe). Use as a context manager or call `close()`.

    `base_url`: one URL, or several (a list, or a comma-separated string) for replicas with no load balancer in
    front: requests take them in turn, and a connection error or a 503 moves the request to the next one at once
    (within `max_retries`), skipping the failed URL for `failover_cooldown` seconds. `timeout`: read/write/pool
    seconds per attempt; `connect_timeout`: connect seconds; `max_retries`: retries after the first attempt;
    `backoff_base`/`backoff_max`: full-jitter exponential backoff; `retry_after_max`: cap on an
    honoured `Retry-After`; `chunk_size`: items per request.
    """

    def __init__(self, base_url: str | Sequence[str], api_key: str | None = None, **kwargs: Any):
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.Client(timeout=self._timeout, headers=self._headers)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt, index = 0, self._first()
        tried = {index}
        while True:
            try:
                return self._outcome(self._http.request(method, self.base_urls[index] + path, json=body))
            except (_Retryable, *RETRY_TRANSPORT) as exc:
                index, delay = self._failed(attempt, index, exc, tried)
            attempt += 1
            if delay:
                time.sleep(delay)

    def rewards(self, items: Sequence[Item | Mapping[str, Any]], return_features: bool = False) -> list[RewardResult]:
        """Score `items` (dicts in the `/v1/rewards` shape, or `Item`s); one result per item, in order."""
        payloads = [_item_payload(it) for it in items]
        out: list[RewardResult] = []
        for chunk in _chunks(payloads, self.chunk_size):
            data = self._request("POST", "/v1/rewards", {"items": list(chunk), "return_features": return_features})
            out.extend(_parse_results(data, len(chunk)))
        return out

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], response_types: Sequence[Any] | None = None,
              rm_scores: Sequence[Any] | None = None) -> list[float]:
        """Total rewards for parallel lists; a None (or empty) response type means the RM score alone."""
        return [r.reward for r in self.rewards(_score_items(prompts, completions, response_types, rm_scores))]

    def get_reward(self, query: Sequence[str], prompts: Sequence[str] | None = None,
                   labels: Sequence[str | None] | None = None) -> GetRewardResult:
        """OpenRLHF's `/get_reward`: decoded prompt+response strings; `labels` carry response types."""
        bodies = _get_reward_bodies(query, prompts, labels, self.chunk_size)
        return _merge_get_reward([self._request("POST", "/get_reward", b) for b in bodies])

    def policy(self) -> dict[str, Any]:
        """`GET /v1/policy`: versions, response types with their propositions and classes, class order."""
        return self._request("GET", "/v1/policy")

    def ready(self) -> bool:
        """True when `/readyz` of any base URL answers 200; never retries, never raises for an unreachable one."""
        return any(self._ready(url) for url in self.base_urls)

    def _ready(self, url: str) -> bool:
        try:
            return self._http.get(url + "/readyz", timeout=self._probe_timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_until_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        """Poll `ready()` until it holds; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout}s")
            time.sleep(interval)


class AsyncRewardClient(_Base):
    """Asyncio client, same methods as `RewardClient`; chunks of one call go out `max_concurrency` at a time."""

    def __init__(self, base_url: str | Sequence[str], api_key: str | None = None, *, max_concurrency: int = 4,
                 **kwargs: Any):
        super().__init__(base_url, api_key, **kwargs)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self._http = httpx.AsyncClient(timeout=self._timeout, headers=self._headers)

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt, index = 0, self._first()
        tried = {index}
        while True:
            try:
                return self._outcome(await self._http.request(method, self.base_urls[index] + path, json=body))
            except (_Retryable, *RETRY_TRANSPORT) as exc:
                index, delay = self._failed(attempt, index, exc, tried)
            attempt += 1
            if delay:
                await asyncio.sleep(delay)

    async def _bounded(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Run the coroutine factories at most `max_concurrency` at once; results in order; first error wins."""
        if len(calls) == 1:
            return [await calls[0]()]
        gate = asyncio.Semaphore(self.max_concurrency)

        async def run(call: Callable[[], Any]) -> Any:
            async with gate:
                return await call()

        tasks = [asyncio.ensure_future(run(c)) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def rewards(self, items: Sequence[Item | Mapping[str, Any]],
                      return_features: bool = False) -> list[RewardResult]:
        """Score `items`; one result per item, in order, whatever order the chunks finish in."""
        payloads = [_item_payload(it) for it in items]
        chunks = _chunks(payloads, self.chunk_size)

        def call(chunk: Sequence[Any]) -> Callable[[], Any]:
            async def go() -> list[RewardResult]:
                data = await self._request("POST", "/v1/rewards",
                                           {"items": list(chunk), "return_features": return_features})
                return _parse_results(data, len(chunk))
            return go

        parts = await self._bounded([call(c) for c in chunks]) if chunks else []
        return [r for part in parts for r in part]

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any],
                    response_types: Sequence[Any] | None = None,
                    rm_scores: Sequence[Any] | None = None) -> list[float]:
        """Total rewards for parallel lists; a None (or empty) response type means the RM score alone."""
        return [r.reward for r in await self.rewards(_score_items(prompts, completions, response_types, rm_scores))]

    async def get_reward(self, query: Sequence[str], prompts: Sequence[str] | None = None,
                         labels: Sequence[str | None] | None = None) -> GetRewardResult:
        """OpenRLHF's `/get_reward`, chunked and concurrent."""
        bodies = _get_reward_bodies(query, prompts, labels, self.chunk_size)
        parts = await self._bounded([lambda b=b: self._request("POST", "/get_reward", b) for b in bodies])
        return _merge_get_reward(parts)

    async def policy(self) -> dict[str, Any]:
        """`GET /v1/policy`."""
        return await self._request("GET", "/v1/policy")

    async def ready(self) -> bool:
        """True when `/readyz` of any base URL answers 200; never retries, never raises for an unreachable one."""
        for url in self.base_urls:
            try:
                if (await self._http.get(url + "/readyz", timeout=self._probe_timeout)).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
        return False

    async def wait_until_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        """Poll `ready()` until it holds; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout}s")
            await asyncio.sleep(interval)


class _PerLoop:
    """One AsyncRewardClient per event loop: an httpx.AsyncClient must not cross loops."""

    def __init__(self, factory: Callable[[], AsyncRewardClient]):
        self._factory = factory
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRewardClient] = (
            weakref.WeakKeyDictionary())

    def get(self) -> AsyncRewardClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._factory()
        return client


class _PerProcess:
    """A RewardClient made on first use and again after a fork; dropped when pickled (Ray ships functions)."""

    def __init__(self, factory: Callable[[], RewardClient]):
        self._factory = factory
        self._client: RewardClient | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def get(self) -> RewardClient:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client, self._pid = self._factory(), os.getpid()
            return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {"_factory": self._factory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_factory"])


@dataclass
class _ClientFactory:
    base_url: str | Sequence[str]
    api_key: str | None
    kwargs: dict[str, Any]

    def __call__(self) -> RewardClient:
        return RewardClient(self.base_url, self.api_key, **self.kwargs)
