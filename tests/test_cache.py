"""The feature cache against a real redis-server: hits, TTL, no raw text in keys, outage and recovery."""

from __future__ import annotations

import asyncio
import logging

from helpers import metric
from redis_server import RedisServer

from service.cache import KEY_PREFIX, LocalCache, RedisCache, build_cache, cache_key
from service.metrics import Metrics

CONV = [{"role": "user", "content": "How do I bake bread?"}]


def test_key_is_a_hash_of_everything():
    k = cache_key("pol", "grader", CONV, "Knead the dough.")
    assert k.startswith(KEY_PREFIX) and len(k) == len(KEY_PREFIX) + 64
    assert "bread" not in k and "Knead" not in k
    others = {
        cache_key("pol2", "grader", CONV, "Knead the dough."),
        cache_key("pol", "grader2", CONV, "Knead the dough."),
        cache_key("pol", "grader", [{"role": "user", "content": "How do I bake cake?"}], "Knead the dough."),
        cache_key("pol", "grader", CONV, "Knead the dough!"),
        # the length prefix keeps a boundary shift from colliding
        cache_key("po", "lgrader", CONV, "Knead the dough."),
    }
    assert k not in others and len(others) == 5


async def test_redis_round_trip_ttl_and_counts(redis_server):
    metrics = Metrics()
    cache = RedisCache(redis_server.url, metrics, ttl_s=60, timeout_s=0.5)
    keys = [cache_key("p", "g", CONV, f"answer {i}") for i in range(3)]
    assert await cache.get_many(keys) == [None, None, None]
    await cache.set_many({keys[0]: {"apology": 0.25}, keys[2]: {"apology": 0.75, "judgmental": 0.1}})
    assert await cache.get_many(keys) == [{"apology": 0.25}, None, {"apology": 0.75, "judgmental": 0.1}]
    assert metric(metrics, "rbr_cache_requests_total", result="hit") == 2
    assert metric(metrics, "rbr_cache_requests_total", result="miss") == 4
    stored = redis_server.keys()
    assert len(stored) == 2 and all(k.startswith(KEY_PREFIX.encode()) for k in stored)
    ttl = await cache._client.ttl(keys[0])
    assert 0 < ttl <= 60
    await cache.close()


async def test_redis_outage_degrades_and_recovers(redis_server, caplog):
    metrics = Metrics()
    cache = RedisCache(redis_server.url, metrics, ttl_s=60, timeout_s=0.2, breaker_s=0.5)
    key = cache_key("p", "g", CONV, "x")
    await cache.set_many({key: {"apology": 0.5}})
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="rbr.cache"):
        for _ in range(5):
            assert await cache.get_many([key]) == [None]  # served as misses, no exception
            await cache.set_many({key: {"apology": 0.9}})
    assert metric(metrics, "rbr_cache_requests_total", result="error") == 5
    assert metric(metrics, "rbr_cache_errors_total", operation="get") >= 1
    assert metrics.registry.get_sample_value("rbr_cache_available") == 0
    outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_logs) == 1  # once per outage, not once per call
    # The breaker means most calls during the outage never touched the network.
    assert metric(metrics, "rbr_cache_errors_total", operation="get") < 5

    redis_server.start()  # same port, empty (no persistence)
    await asyncio.sleep(0.6)  # breaker window passes
    await cache.set_many({key: {"apology": 0.5}})
    assert await cache.get_many([key]) == [{"apology": 0.5}]
    assert metrics.registry.get_sample_value("rbr_cache_available") == 1
    await cache.close()


async def test_redis_with_password(tmp_path):
    server = RedisServer(password="s3cret-pass").start()
    try:
        metrics = Metrics()
        good = build_cache(server.url, metrics, ttl_s=60, local_size=10, timeout_s=0.5, breaker_s=1)
        await good.set_many({"rbr:f:abc": {"a": 1.0}})
        assert await good.get_many(["rbr:f:abc"]) == [{"a": 1.0}]
        bad = build_cache(server.url.replace("s3cret-pass", "wrong"), metrics, ttl_s=60, local_size=10,
                          timeout_s=0.5, breaker_s=1)
        assert await bad.get_many(["rbr:f:abc"]) == [None]  # auth failure is a cache error, not a crash
        assert metric(metrics, "rbr_cache_errors_total", operation="get") == 1
        await good.close()
        await bad.close()
    finally:
        server.stop()


async def test_local_cache_is_bounded_lru(caplog):
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="rbr.cache"):
        cache = build_cache(None, metrics, ttl_s=60, local_size=2, timeout_s=0.1, breaker_s=1)
    assert isinstance(cache, LocalCache)
    assert any("in-process LRU" in r.getMessage() for r in caplog.records)
    await cache.set_many({"a": {"x": 1.0}, "b": {"x": 2.0}})
    await cache.get_many(["a"])  # a is now most recent
    await cache.set_many({"c": {"x": 3.0}})
    assert await cache.get_many(["a", "b", "c"]) == [{"x": 1.0}, None, {"x": 3.0}]
