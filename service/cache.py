"""The feature cache: proposition probabilities per (policy, grader, prompt, completion).

Redis when configured (batched MGET, pipelined SET with TTL), else an in-process LRU. Redis is an
accelerator, never a dependency: when it is down or slow, lookups count as errors, a breaker stops trying for
a while, the outage is logged once, and the service keeps grading.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from service.metrics import Metrics

log = logging.getLogger("rbr.cache")
KEY_PREFIX = "rbr:f:"

Entry = dict[str, float]  # proposition name -> calibrated P(yes)


def cache_key(policy_fp: str, grader_fp: str, conversation: Sequence[dict], completion: str) -> str:
    """A hash of everything the features depend on: never raw text in a key."""
    h = hashlib.sha256()
    for part in (policy_fp, grader_fp, json.dumps(list(conversation), ensure_ascii=False, sort_keys=True),
                 completion):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return KEY_PREFIX + h.hexdigest()


class FeatureCache(Protocol):
    backend: str

    async def get_many(self, keys: Sequence[str]) -> list[Entry | None]: ...

    async def set_many(self, entries: dict[str, Entry]) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class LocalCache:
    """A bounded in-process LRU: the default with no Redis, per process."""

    backend = "local"

    def __init__(self, metrics: Metrics, max_entries: int = 100_000):
        self.metrics, self.max_entries = metrics, max_entries
        self._data: OrderedDict[str, Entry] = OrderedDict()
        metrics.cache_available.set(1)

    async def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        out = []
        for key in keys:
            entry = self._data.get(key)
            if entry is not None:
                self._data.move_to_end(key)
            out.append(entry)
        _count(self.metrics, out)
        return out

    async def set_many(self, entries: dict[str, Entry]) -> None:
        for key, entry in entries.items():
            self._data[key] = entry
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """redis-py asyncio with bounded timeouts and a breaker; recovers by itself."""

    backend = "redis"

    def __init__(self, url: str, metrics: Metrics, ttl_s: int, timeout_s: float = 0.05, breaker_s: float = 5.0):
        import redis.asyncio as redis

        self.metrics, self.ttl_s, self.timeout_s, self.breaker_s = metrics, ttl_s, timeout_s, breaker_s
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            health_check_interval=0,
        )
        self._open_until = 0.0  # breaker: skip Redis until this monotonic time
        self._down = False
        metrics.cache_available.set(1)

    def _skip(self) -> bool:
        return time.monotonic() < self._open_until

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.cache_errors.labels(operation).inc()
        self._open_until = time.monotonic() + self.breaker_s
        self.metrics.cache_available.set(0)
        if not self._down:
            self._down = True
            log.warning("redis unavailable (%s: %s); serving without cache, retrying every %.0fs",
                        operation, type(exc).__name__, self.breaker_s)

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.warning("redis available again; cache resumed")
        self.metrics.cache_available.set(1)

    async def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        if not keys:
            return []
        if self._skip():
            self.metrics.cache_requests.labels("error").inc(len(keys))
            return [None] * len(keys)
        try:
            raw = await asyncio.wait_for(self._client.mget(list(keys)), self.timeout_s * 4)
        except (TimeoutError, OSError, Exception) as exc:  # noqa: BLE001 - any Redis failure
            self._failed("get", exc)
            self.metrics.cache_requests.labels("error").inc(len(keys))
            return [None] * len(keys)
        self._ok()
        out: list[Entry | None] = []
        for value in raw:
            try:
                out.append(json.loads(value) if value is not None else None)
            except ValueError:
                out.append(None)
        _count(self.metrics, out)
        return out

    async def set_many(self, entries: dict[str, Entry]) -> None:
        if not entries or self._skip():
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, entry in entries.items():
                pipe.set(key, json.dumps(entry, separators=(",", ":")), ex=self.ttl_s)
            await asyncio.wait_for(pipe.execute(), self.timeout_s * 4)
        except (TimeoutError, OSError, Exception) as exc:  # noqa: BLE001
            self._failed("set", exc)
            return
        self._ok()

    async def ping(self) -> bool:
        try:
            await asyncio.wait_for(self._client.ping(), self.timeout_s * 4)
        except Exception:  # noqa: BLE001
            return False
        return True

    async def close(self) -> None:
        await self._client.aclose()


def _count(metrics: Metrics, found: list[Entry | None]) -> None:
    hits = sum(1 for e in found if e is not None)
    if hits:
        metrics.cache_requests.labels("hit").inc(hits)
    if len(found) - hits:
        metrics.cache_requests.labels("miss").inc(len(found) - hits)


def build_cache(redis_url: str | None, metrics: Metrics, *, ttl_s: int, local_size: int, timeout_s: float,
                breaker_s: float) -> FeatureCache:
    if redis_url:
        return RedisCache(redis_url, metrics, ttl_s, timeout_s, breaker_s)
    log.info("RBR_REDIS_URL not set: using an in-process LRU feature cache (%d entries)", local_size)
    return LocalCache(metrics, local_size)
