"""Python client for rbr-serve, and reward-function adapters for TRL and veRL.

Needs only `httpx` and the standard library: no FastAPI, no server modules.

Plain use::

    from service.client import Item, RewardClient

    with RewardClient("http://rbr:8000", api_key="sk-...") as rbr:
        results = rbr.rewards([Item("How do I pick a lock?", "I can't help with that.", "hard_refuse", rm_score=0.2)])
        print(results[0].reward, results[0].rbr_reward)
        totals = rbr.score(prompts, completions, response_types=types, rm_scores=rm)   # list[float]

`AsyncRewardClient` has the same methods as coroutines and sends the chunks of a large batch concurrently.

Both clients retry 429 (honouring `Retry-After`, capped), 500/502/503/504 and connection or timeout errors, with
exponential backoff and full jitter; any other 4xx raises `RewardServiceError` at once, carrying the server's
error type, message and field. Batches above `chunk_size` items go out as several requests; results come back in
input order.

TRL (GRPOTrainer)::

    from service.client import trl_reward_func

    reward = trl_reward_func("http://rbr:8000", api_key="sk-...", response_type_key="response_type")
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=ds)   # ds has a "response_type" column

veRL (`custom_reward_function.path` points at a file holding)::

    from service.client import verl_compute_score

    compute_score = verl_compute_score("http://rbr:8000", api_key="sk-...")
    # each row's extra_info carries "prompt" (text or chat messages), "response_type", optionally "rm_score"
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

__all__ = [
    "AsyncRewardClient",
    "GetRewardResult",
    "Item",
    "RewardClient",
    "RewardResult",
    "RewardServiceError",
    "backoff_delay",
    "parse_retry_after",
    "trl_reward_func",
    "verl_compute_score",
    "verl_compute_score_batch",
]

log = logging.getLogger("rbr.client")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RETRY_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_USER_AGENT = "rbr-serve-client/0.1"


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Item:
    """One completion to score. `prompt`: text or chat messages; `completion`: text or one assistant message."""

    prompt: str | Sequence[Mapping[str, Any]]
    completion: str | Mapping[str, Any]
    response_type: str | None = None
    rm_score: float | None = None
    id: str | None = None


@dataclass
class RewardResult:
    """One scored item: `reward = rm_score + rbr_reward`. `features`/`classes` only with `return_features`."""

    id: str | None
    reward: float
    rbr_reward: float
    rm_score: float
    response_type: str | None
    features: dict[str, float] | None = None
    classes: dict[str, float] | None = None
    cached: bool = False
    policy_version: str | None = None
    weights_version: str | None = None


@dataclass
class GetRewardResult:
    """The OpenRLHF `/get_reward` answer: `extra_logs` maps a name to one value per query."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = field(default_factory=dict)


class RewardServiceError(Exception):
    """The service refused or could not answer. `status` is None when no HTTP response came back."""

    def __init__(self, status: int | None, type: str, message: str, field: str | None = None,
                 retry_after: float | None = None, attempts: int = 1):
        self.status, self.type, self.message, self.field = status, type, message, field
        self.retry_after, self.attempts = retry_after, attempts
        where = f" (field: {field})" if field else ""
        super().__init__(f"{status if status is not None else 'no response'} {type}: {message}{where}")

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (Ray ships worker errors back)
        return (RewardServiceError, (self.status, self.type, self.message, self.field, self.retry_after,
                                     self.attempts))


# ---------------------------------------------------------------------------------------------------------------------
# Retry policy


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter backoff: uniform in [0, min(cap, base * 2**attempt)]; `attempt` counts from 0."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 62))
    return (rng or random).uniform(0.0, max(ceiling, 0.0))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _error_from_response(resp: httpx.Response) -> RewardServiceError:
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return RewardServiceError(resp.status_code, str(err.get("type") or "http_error"),
                                  str(err.get("message") or resp.reason_phrase), err.get("field"), retry_after)
    text = resp.text.strip()[:500] or resp.reason_phrase
    return RewardServiceError(resp.status_code, "http_error", text, None, retry_after)


def _transport_error(exc: Exception) -> RewardServiceError:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    return RewardServiceError(None, kind, f"{type(exc).__name__}: {exc}".rstrip(": "))


class _Retryable(Exception):
    def __init__(self, error: RewardServiceError):
        super().__init__(str(error))
        self.error = error


# ---------------------------------------------------------------------------------------------------------------------
# Payload shaping (shared by both clients and the adapters)


def _text(content: Any) -> str:
    """Message content as text: strings pass; multimodal part lists keep their text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text", ""))
    if isinstance(content, Iterable):
        parts = [p if isinstance(p, str) else p.get("text", "") for p in content
                 if isinstance(p, str) or (isinstance(p, Mapping) and p.get("type", "text") == "text")]
        return "".join(parts)
    return str(content)


def _message(m: Any) -> dict[str, str]:
    if not isinstance(m, Mapping):
        raise TypeError(f"a chat message must be a mapping with 'role' and 'content', not {type(m).__name__}")
    return {"role": str(m.get("role", "user")), "content": _text(m.get("content"))}


def _messages(seq: Any) -> list[dict[str, str]]:
    return [_message(m) for m in seq]


def _split(prompt: Any, completion: Any) -> tuple[str | list[dict[str, str]], str | dict[str, str]]:
    """Normalise to the wire shapes. A completion given as a list of messages (TRL's conversational form) is
    scored on its last message; any messages before it (tool calls and results) join the prompt."""
    p: str | list[dict[str, str]] = prompt if isinstance(prompt, str) else _messages(prompt)
    if isinstance(completion, str):
        return p, completion
    if isinstance(completion, Mapping):
        return p, _message(completion)
    turns = _messages(completion)
    if not turns:
        raise ValueError("completion holds no message")
    if len(turns) > 1:
        p = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + turns[:-1]
    return p, turns[-1]


def _opt_label(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v)
    return s if s.strip() else None


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _item_payload(item: Item | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, Item):
        raw: dict[str, Any] = {"prompt": item.prompt, "completion": item.completion,
                               "response_type": item.response_type, "rm_score": item.rm_score, "id": item.id}
    elif isinstance(item, Mapping):
        raw = dict(item)
    else:
        raise TypeError(f"an item is a dict or an Item, not {type(item).__name__}")
    if "prompt" in raw and "completion" in raw:
        raw["prompt"], raw["completion"] = _split(raw["prompt"], raw["completion"])
    if raw.get("rm_score") is not None:
        raw["rm_score"] = _opt_float(raw["rm_score"])
    # Unknown keys are kept so the server's strict validation names them (422) rather than dropping them silently.
    return {k: v for k, v in raw.items() if v is not None or k in ("prompt", "completion")}


def _chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _parse_results(data: Any, expected: int) -> list[RewardResult]:
    try:
        rows = data["results"]
        pv, wv = data.get("policy_version"), data.get("weights_version")
        out = [RewardResult(id=r.get("id"), reward=float(r["reward"]), rbr_reward=float(r["rbr_reward"]),
                            rm_score=float(r["rm_score"]), response_type=r.get("response_type"),
                            features=r.get("features"), classes=r.get("classes"), cached=bool(r.get("cached")),
                            policy_version=pv, weights_version=wv) for r in rows]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RewardServiceError(200, "protocol_error", f"unexpected /v1/rewards answer: {exc!r}") from None
    if len(out) != expected:
        raise RewardServiceError(200, "protocol_error", f"{len(out)} results for {expected} items")
    return out


def _get_reward_bodies(query: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[str | None] | None,
                       chunk_size: int) -> list[dict[str, Any]]:
    n = len(query)
    for name, values in (("prompts", prompts), ("labels", labels)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: {len(values)} entries for {n} queries")
    bodies = []
    for start in range(0, max(n, 1), chunk_size):
        end = min(start + chunk_size, n)
        body: dict[str, Any] = {"query": list(query[start:end])}
        if prompts is not None:
            body["prompts"] = list(prompts[start:end])
        if labels is not None:
            body["labels"] = list(labels[start:end])
        bodies.append(body)
    return bodies


def _merge_get_reward(parts: list[Any]) -> GetRewardResult:
    out = GetRewardResult([], [], {})
    for part in parts:
        out.rewards.extend(float(x) for x in part["rewards"])
        out.scores.extend(float(x) for x in part["scores"])
        for k, v in (part.get("extra_logs") or {}).items():
            out.extra_logs.setdefault(k, []).extend(v)
    return out


def _score_items(prompts: Sequence[Any], completions: Sequence[Any], response_types: Sequence[Any] | None,
                 rm_scores: Sequence[Any] | None) -> list[dict[str, Any]]:
    n = len(prompts)
    for name, values in (("completions", completions), ("response_types", response_types), ("rm_scores", rm_scores)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: {len(values)} entries for {n} prompts")
    return [_item_payload(Item(prompts[i], completions[i],
                               _opt_label(response_types[i]) if response_types is not None else None,
                               _opt_float(rm_scores[i]) if rm_scores is not None else None)) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Clients


class _Base:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 120.0,
                 connect_timeout: float = 5.0, max_retries: int = 4, backoff_base: float = 0.5,
                 backoff_max: float = 20.0, retry_after_max: float = 60.0, chunk_size: int = 256,
                 headers: Mapping[str, str] | None = None, rng: random.Random | None = None):
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.max_retries, self.chunk_size = max_retries, chunk_size
        self.backoff_base, self.backoff_max, self.retry_after_max = backoff_base, backoff_max, retry_after_max
        self._rng = rng or random.Random()
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

    def _next_delay(self, attempt: int, exc: Exception) -> float:
        """The wait before retry number `attempt + 1`, or raise the final error when retries are spent."""
        err = exc.error if isinstance(exc, _Retryable) else _transport_error(exc)
        err.attempts = attempt + 1
        if attempt >= self.max_retries:
            if isinstance(exc, _Retryable):
                raise err from None
            raise err from exc
        if err.retry_after is not None:
            delay = min(err.retry_after, self.retry_after_max)
        else:
            delay = backoff_delay(attempt, self.backoff_base, self.backoff_max, self._rng)
        log.warning("rbr-serve: %s; retry %d/%d in %.2fs", err, attempt + 1, self.max_retries, delay)
        return delay


class RewardClient(_Base):
    """Blocking client (thread-safe). Use as a context manager or call `close()`.

    `timeout`: read/write/pool seconds per attempt; `connect_timeout`: connect seconds; `max_retries`: retries after
    the first attempt; `backoff_base`/`backoff_max`: full-jitter exponential backoff; `retry_after_max`: cap on an
    honoured `Retry-After`; `chunk_size`: items per request.
    """

    def __init__(self, base_url: str, api_key: str | None = None, **kwargs: Any):
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, timeout=self._timeout, headers=self._headers)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                return self._outcome(self._http.request(method, path, json=body))
            except (_Retryable, *_RETRY_TRANSPORT) as exc:
                delay = self._next_delay(attempt, exc)
            attempt += 1
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
        """True when `/readyz` answers 200; never retries, never raises for an unreachable server."""
        try:
            return self._http.get("/readyz", timeout=self._probe_timeout).status_code == 200
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

    def __init__(self, base_url: str, api_key: str | None = None, *, max_concurrency: int = 4, **kwargs: Any):
        super().__init__(base_url, api_key, **kwargs)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, headers=self._headers)

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        attempt = 0
        while True:
            try:
                return self._outcome(await self._http.request(method, path, json=body))
            except (_Retryable, *_RETRY_TRANSPORT) as exc:
                delay = self._next_delay(attempt, exc)
            attempt += 1
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
        """True when `/readyz` answers 200; never retries, never raises for an unreachable server."""
        try:
            return (await self._http.get("/readyz", timeout=self._probe_timeout)).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_until_ready(self, timeout: float = 600.0, interval: float = 2.0) -> None:
        """Poll `ready()` until it holds; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout}s")
            await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------------------------------
# TRL adapter


def _trl_items(prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any],
               response_type_key: str | None, rm_score_key: str | None) -> list[dict[str, Any]]:
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{len(completions)} completions for {n} prompts")
    if response_type_key is None:
        types: Sequence[Any] = [None] * n
    elif response_type_key in kwargs:
        types = kwargs[response_type_key]
    else:
        raise ValueError(f"no dataset column {response_type_key!r} reached the reward function: add it to the "
                         "dataset, or pass response_type_key=None to score with the RM alone")
    rms: Sequence[Any] = kwargs[rm_score_key] if rm_score_key is not None else [None] * n
    return _score_items(prompts, completions, types, rms)


def _batch_metrics(results: Sequence[RewardResult]) -> dict[str, float]:
    """Batch means: rbr/rm parts, graded and cached fractions, and per proposition / class over graded items."""
    if not results:
        return {}
    n = len(results)
    out = {"rbr_reward": sum(r.rbr_reward for r in results) / n, "rm_score": sum(r.rm_score for r in results) / n,
           "graded_frac": sum(1 for r in results if r.response_type) / n,
           "cached_frac": sum(1 for r in results if r.cached) / n}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in results:
        if not r.response_type:
            continue
        named = [(f"prop/{k}", v) for k, v in (r.features or {}).items() if not k.startswith("class:")]
        named += [(f"class/{k}", v) for k, v in (r.classes or {}).items()]
        for key, v in named:
            sums[key] = sums.get(key, 0.0) + float(v)
            counts[key] = counts.get(key, 0) + 1
    out.update({k: sums[k] / counts[k] for k in sorted(sums)})
    return out


def _trl_report(fn: Any, name: str, results: list[RewardResult], kwargs: Mapping[str, Any],
                log_metrics: bool, log_columns: bool) -> list[float]:
    metrics = _batch_metrics(results)
    fn.last_results, fn.last_metrics = results, metrics
    log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
    if log_metrics and callable(log_metric):
        for key, value in metrics.items():
            log_metric(f"{name}/{key}", value)
    if log_columns and callable(log_extra):
        log_extra(f"{name}_rbr", [r.rbr_reward for r in results])
        log_extra(f"{name}_rm", [r.rm_score for r in results])
    return [r.reward for r in results]


def _trl_failed(fn: Any, name: str, n: int, exc: Exception) -> list[float | None]:
    log.error("%s: scoring failed, returning None for %d samples: %s", name, n, exc)
    fn.last_results, fn.last_metrics = [], {}
    return [None] * n


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


def trl_reward_func(base_url: str, api_key: str | None = None, *, response_type_key: str | None = "response_type",
                    rm_score_key: str | None = None, name: str = "rbr_reward", log_metrics: bool = True,
                    log_columns: bool = True, on_error: Literal["raise", "none"] = "raise",
                    asynchronous: bool = True, **client_kwargs: Any) -> Callable[..., Any]:
    """A reward function for TRL's `GRPOTrainer(reward_funcs=[...])`: `(prompts, completions, **kwargs)` -> floats.

    Prompts/completions may be text or conversational (prompt: list of messages; completion: list holding the
    assistant message). The response type comes from the dataset column `kwargs[response_type_key]` (None or ""
    for "no rule applies"); the RM score from `kwargs[rm_score_key]` when given, else the server's RM.

    Logging: recent TRL passes `log_metric(name, value)` and `log_extra(column, values)` to reward functions; when
    present, batch means go to `log_metric` as `<name>/rbr_reward`, `<name>/rm_score`, `<name>/graded_frac`,
    `<name>/cached_frac`, `<name>/prop/<proposition>`, `<name>/class/<class>`, and per-sample `<name>_rbr` and
    `<name>_rm` columns to `log_extra`. Without those hooks (older TRL) read `fn.last_metrics` / `fn.last_results`.

    `on_error="none"`: a batch that still fails after retries returns None per sample (TRL turns None into NaN and
    leaves this function out for those samples) instead of raising. `asynchronous=False` gives a plain function
    for TRL versions that do not await coroutine reward functions. Other keywords configure the client.
    """
    if on_error not in ("raise", "none"):
        raise ValueError("on_error must be 'raise' or 'none'")
    # Keep the event-loop-bound and process-bound clients apart; TRL runs async reward functions on its own loop.
    if asynchronous:
        clients = _PerLoop(lambda: AsyncRewardClient(base_url, api_key, **client_kwargs))

        async def reward_func(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
            items = _trl_items(prompts, completions, kwargs, response_type_key, rm_score_key)
            try:
                results = await clients.get().rewards(items, return_features=log_metrics)
            except RewardServiceError as exc:
                if on_error == "raise":
                    raise
                return _trl_failed(reward_func, name, len(items), exc)
            return _trl_report(reward_func, name, results, kwargs, log_metrics, log_columns)
    else:
        sync_clients = _PerProcess(lambda: RewardClient(base_url, api_key, **client_kwargs))

        def reward_func(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
            items = _trl_items(prompts, completions, kwargs, response_type_key, rm_score_key)
            try:
                results = sync_clients.get().rewards(items, return_features=log_metrics)
            except RewardServiceError as exc:
                if on_error == "raise":
                    raise
                return _trl_failed(reward_func, name, len(items), exc)
            return _trl_report(reward_func, name, results, kwargs, log_metrics, log_columns)

    reward_func.__name__ = reward_func.__qualname__ = name
    reward_func.last_results, reward_func.last_metrics = [], {}
    return reward_func


# ---------------------------------------------------------------------------------------------------------------------
# veRL adapter


class _VerlScorer:
    """Shared state of the veRL adapters: a per-process client and the policy's class order (fetched once)."""

    def __init__(self, base_url: str, api_key: str | None, prompt_key: str, response_type_key: str,
                 rm_score_key: str | None, include_classes: bool, client_kwargs: dict[str, Any]):
        self.prompt_key, self.response_type_key, self.rm_score_key = prompt_key, response_type_key, rm_score_key
        self.include_classes = include_classes
        self._clients = _PerProcess(_ClientFactory(base_url, api_key, client_kwargs))
        self._class_order: list[str] | None = None
        self.__name__ = "compute_score"

    def _item(self, solution_str: str, extra_info: Mapping[str, Any] | None) -> dict[str, Any]:
        info = extra_info if isinstance(extra_info, Mapping) else {}
        if self.prompt_key not in info or info[self.prompt_key] is None:
            raise ValueError(f"extra_info[{self.prompt_key!r}] is missing: store each row's prompt (text or chat "
                             "messages) there when you build the veRL dataset")
        rm = info.get(self.rm_score_key) if self.rm_score_key else None
        return _item_payload(Item(info[self.prompt_key], solution_str, _opt_label(info.get(self.response_type_key)),
                                  _opt_float(rm)))

    def _score(self, items: list[dict[str, Any]]) -> list[dict[str, float]]:
        client = self._clients.get()
        if self.include_classes and self._class_order is None:
            self._class_order = list(client.policy().get("class_order") or [])
        results = client.rewards(items, return_features=self.include_classes)
        out = []
        for r in results:
            row = {"score": r.reward, "rbr_reward": r.rbr_reward, "rm_score": r.rm_score,
                   "graded": 1.0 if r.response_type else 0.0}
            # veRL gathers every key into per-sample lists, so every row carries the same keys.
            for c in self._class_order or []:
                row[f"class_{c}"] = float((r.classes or {}).get(c, 0.0))
            out.append(row)
        return out


@dataclass
class _ClientFactory:
    base_url: str
    api_key: str | None
    kwargs: dict[str, Any]

    def __call__(self) -> RewardClient:
        return RewardClient(self.base_url, self.api_key, **self.kwargs)


class _VerlSingle(_VerlScorer):
    def __call__(self, data_source: Any, solution_str: str, ground_truth: Any = None,
                 extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, float]:
        return self._score([self._item(solution_str, extra_info)])[0]


class _VerlBatch(_VerlScorer):
    def __call__(self, data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Any = None,
                 extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
                 **kwargs: Any) -> list[dict[str, float]]:
        infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        if len(infos) != len(solution_strs):
            raise ValueError(f"{len(infos)} extra_infos for {len(solution_strs)} solutions")
        return self._score([self._item(s, e) for s, e in zip(solution_strs, infos, strict=True)])


def verl_compute_score(base_url: str, api_key: str | None = None, *, prompt_key: str = "prompt",
                       response_type_key: str = "response_type", rm_score_key: str | None = "rm_score",
                       include_classes: bool = True, **client_kwargs: Any) -> Callable[..., dict[str, float]]:
    """veRL custom reward function: `compute_score(data_source, solution_str, ground_truth, extra_info=None)`.

    Reads from `extra_info`: `"prompt"` (required; text or a list of chat messages), `"response_type"` (None or ""
    for "no rule applies") and optionally `"rm_score"` (else the server's RM). `data_source` and `ground_truth` are
    not used. Returns `{"score": total, "rbr_reward", "rm_score", "graded", "class_<name>" for every class in the
    policy's class order}`, the same keys for every sample. One request per call (veRL's naive manager); use
    `verl_compute_score_batch` with `reward_manager=batch` to send a whole batch at once. The callable pickles
    without its HTTP connection, so Ray can ship it. Other keywords configure the `RewardClient`.
    """
    return _VerlSingle(base_url, api_key, prompt_key, response_type_key, rm_score_key, include_classes, client_kwargs)


def verl_compute_score_batch(base_url: str, api_key: str | None = None, *, prompt_key: str = "prompt",
                             response_type_key: str = "response_type", rm_score_key: str | None = "rm_score",
                             include_classes: bool = True, **client_kwargs: Any) -> Callable[..., list[dict]]:
    """Like `verl_compute_score` for veRL's BatchRewardManager:
    `compute_score(data_sources, solution_strs, ground_truths, extra_infos) -> list[dict]`."""
    return _VerlBatch(base_url, api_key, prompt_key, response_type_key, rm_score_key, include_classes, client_kwargs)
