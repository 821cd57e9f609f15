"""The Python client and its TRL / veRL adapters against a real, scripted HTTP server on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import pickle
import random
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rbr_client import (
    AsyncRewardClient,
    Item,
    RewardClient,
    RewardServiceError,
    backoff_delay,
    parse_retry_after,
    trl_reward_func,
    verl_compute_score,
    verl_compute_score_batch,
)

CLASS_ORDER = ["ideal", "minimum_acceptable_style", "unacceptable_completion"]
FAST = {"backoff_base": 0.01, "backoff_max": 0.02, "timeout": 5.0}


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # None: the default answer for the path
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def error(status: int, type_: str, message: str = "nope", field_: str | None = None, **headers: str) -> Reply:
    return Reply(status, {"error": {"type": type_, "message": message, "field": field_}}, headers)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class Script:
    """What the server answers: queued replies first (in order), then a well-formed default for the path."""

    def __init__(self) -> None:
        self.queue: deque[Reply] = deque()
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        self.delay_for = None  # optional callable(body) -> seconds, for default replies

    def push(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    def posts(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def default(self, method: str, path: str, body: Any) -> Reply:
        if path == "/v1/rewards":
            feats = body.get("return_features", False)
            results = []
            for it in body["items"]:
                rt, rm = it.get("response_type"), float(it.get("rm_score", 0.0))
                rbr = 0.5 if rt else 0.0
                classes = {"ideal": 0.75, "minimum_acceptable_style": 0.25, "unacceptable_completion": 0.0}
                results.append({"id": it.get("id"), "reward": rm + rbr, "rbr_reward": rbr, "rm_score": rm,
                                "response_type": rt, "cached": False,
                                "features": {"refuses": 0.9, "class:ideal": 0.75} if feats and rt else None,
                                "classes": classes if feats and rt else None})
            delay = self.delay_for(body) if self.delay_for else 0.0
            return Reply(200, {"results": results, "policy_version": "p1", "weights_version": "w1"}, delay=delay)
        if path == "/get_reward":
            q = body["query"]
            delay = self.delay_for(body) if self.delay_for else 0.0
            return Reply(200, {"rewards": [float(len(s)) for s in q], "scores": [float(len(s)) for s in q],
                               "extra_logs": {"rbr_reward": [0.5] * len(q)}}, delay=delay)
        if path == "/v1/policy":
            return Reply(200, {"name": "default", "version": "p1", "class_order": CLASS_ORDER})
        if path == "/readyz":
            return Reply(200, {"status": "ready"})
        return error(404, "not_found")


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(n) if n else b""
            body = json.loads(raw) if raw else None
            with script.lock:
                script.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body, time.monotonic()))
                reply = script.queue.popleft() if script.queue else None
                script.inflight += 1
                script.max_inflight = max(script.max_inflight, script.inflight)
            try:
                if reply is None or reply.body is None:
                    base = script.default(self.command, self.path, body)
                    reply = base if reply is None else Reply(reply.status, base.body, reply.headers, reply.delay)
                if reply.delay:
                    time.sleep(reply.delay)
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up on this one (a timeout test)
            finally:
                with script.lock:
                    script.inflight -= 1

        do_GET = do_POST = _serve

    return Handler


@pytest.fixture
def make_server():
    """Scripted servers on loopback, as many as a test asks for; all stopped at its end."""
    started = []

    def make() -> Script:
        script = Script()
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        started.append(httpd)
        return script

    yield make
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(make_server):
    return make_server()


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def items(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"p{i}", "completion": f"c{i}", "response_type": "comply", "rm_score": float(i)}
            for i in range(n)]


# --- retry policy -----------------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_within_bounds_and_deterministic_with_a_seed():
    base, cap = 0.5, 4.0
    draws = [backoff_delay(a, base, cap, random.Random(7)) for a in range(12)]
    assert draws == [backoff_delay(a, base, cap, random.Random(7)) for a in range(12)]
    rng = random.Random(0)
    for attempt in range(12):
        ceiling = min(cap, base * 2**attempt)
        samples = [backoff_delay(attempt, base, cap, rng) for _ in range(400)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # full jitter spans [0, ceiling]: 400 seeded draws (deterministic) miss either 10% end with p = 0.9^400
        assert min(samples) < 0.1 * ceiling and max(samples) > 0.9 * ceiling
    assert 0.0 <= backoff_delay(10_000, base, cap, rng) <= cap  # no overflow on absurd attempt counts


def test_error_pickles():
    err = pickle.loads(pickle.dumps(RewardServiceError(429, "overloaded", "busy", None, 2.0, attempts=3)))
    assert (err.status, err.type, err.message, err.retry_after, err.attempts) == (429, "overloaded", "busy", 2.0, 3)


def test_parse_retry_after_seconds_and_dates():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.25 ") == 0.25
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0


# --- sync client ------------------------------------------------------------------------------------------------------


def test_retries_429_and_503_then_succeeds(server):
    server.push(error(429, "overloaded", **{"Retry-After": "0"}), error(503, "not_ready"), Reply(200))
    with RewardClient(server.url, "key-1", max_retries=3, **FAST) as rc:
        out = rc.rewards(items(2), return_features=True)
    assert [r.reward for r in out] == [0.5, 1.5]
    assert out[0].classes["ideal"] == 0.75 and out[0].policy_version == "p1" and out[0].weights_version == "w1"
    calls = server.posts("/v1/rewards")
    assert len(calls) == 3
    assert all(c.headers.get("Authorization") == "Bearer key-1" for c in calls)
    assert calls[0].body == calls[2].body


@pytest.mark.parametrize("status,type_,field_", [
    (400, "bad_request", None), (401, "unauthorized", "authorization"), (403, "forbidden", "authorization"),
    (413, "payload_too_large", "items"), (422, "invalid_request", "items[0].response_type")])
def test_no_retry_on_client_errors(server, status, type_, field_):
    server.push(error(status, type_, "refused here", field_))
    with RewardClient(server.url, max_retries=5, **FAST) as rc, pytest.raises(RewardServiceError) as info:
        rc.rewards(items(1))
    err = info.value
    assert (err.status, err.type, err.message, err.field) == (status, type_, "refused here", field_)
    assert err.attempts == 1
    assert len(server.seen) == 1


def test_gives_up_after_max_retries_with_the_last_error(server):
    server.push(error(503, "engine_unavailable", "m1"), error(500, "internal_error", "m2"),
                error(504, "deadline_exceeded", "m3"), Reply(200))
    with RewardClient(server.url, max_retries=2, **FAST) as rc, pytest.raises(RewardServiceError) as info:
        rc.score(["p"], ["c"], ["comply"])
    assert (info.value.status, info.value.type, info.value.message) == (504, "deadline_exceeded", "m3")
    assert info.value.attempts == 3
    assert len(server.seen) == 3


def test_non_json_5xx_is_retried_and_reported(server):
    server.push(Reply(502, "bad gateway"), Reply(502, "bad gateway"))
    with RewardClient(server.url, max_retries=1, **FAST) as rc, pytest.raises(RewardServiceError) as info:
        rc.rewards(items(1))
    assert info.value.status == 502 and info.value.type == "http_error"
    assert len(server.seen) == 2


def test_retry_after_is_honoured(server):
    # backoff alone would retry at once (base 0); the header asks for 0.3 s
    server.push(error(429, "overloaded", **{"Retry-After": "0.3"}), Reply(200))
    with RewardClient(server.url, backoff_base=0.0, retry_after_max=5.0) as rc:
        rc.rewards(items(1))
    first, second = server.seen
    # A lower bound only, which load can only raise: a sleep never ends early (0.02 s for clock granularity).
    assert second.at - first.at >= 0.28


def test_retry_after_is_capped(server, caplog):
    server.push(error(503, "not_ready", **{"Retry-After": "30"}), Reply(200))
    with caplog.at_level(logging.WARNING, logger="rbr.client"), \
            RewardClient(server.url, backoff_base=0.0, retry_after_max=0.2) as rc:
        rc.rewards(items(1))
    first, second = server.seen
    # The wait the client chose is the cap, not the server's 30 s (read from its log line, not from a clock:
    # an upper bound on elapsed time would depend on the machine's load).
    logged = [re.search(r"retry 1/\d+ in ([0-9.]+)s", r.getMessage()) for r in caplog.records]
    waits = [float(m.group(1)) for m in logged if m]
    assert waits == [0.2], [r.getMessage() for r in caplog.records]
    assert second.at - first.at >= 0.18  # and it did wait: a sleep never ends early


def test_connection_errors_are_retried_then_raised():
    rc = RewardClient(dead_url(), max_retries=2, connect_timeout=0.5, **{**FAST, "timeout": 1.0})
    with rc, pytest.raises(RewardServiceError) as info:
        rc.rewards(items(1))
    assert info.value.status is None and info.value.type == "connection_error" and info.value.attempts == 3


def test_read_timeout_is_retried(server):
    # The first answer comes 10 s late, so the 2 s read timeout fires whatever the load (a timer fires late, never
    # early); the prompt second answer needs to arrive within 2 s, which a loopback reply meets even on a busy
    # machine.
    server.push(Reply(200, delay=10.0), Reply(200))
    with RewardClient(server.url, max_retries=2, backoff_base=0.01, timeout=2.0) as rc:
        out = rc.rewards(items(3))
    assert [r.rm_score for r in out] == [0.0, 1.0, 2.0]
    assert len(server.posts("/v1/rewards")) == 2


def test_chunking_splits_and_reassembles_in_order(server):
    with RewardClient(server.url, chunk_size=256, **FAST) as rc:
        out = rc.rewards(items(600))
    sizes = [len(s.body["items"]) for s in server.posts("/v1/rewards")]
    assert sizes == [256, 256, 88]
    assert [r.reward for r in out] == [i + 0.5 for i in range(600)]


def test_items_dataclass_messages_and_empty_batch(server):
    with RewardClient(server.url, **FAST) as rc:
        assert rc.rewards([]) == []
        assert server.seen == []
        out = rc.rewards([Item([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}],
                               {"role": "assistant", "content": "hello"}, "comply", 0.25, id="a")])
    assert out[0].id == "a" and out[0].reward == 0.75
    sent = server.seen[0].body["items"][0]
    assert sent == {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}],
                    "completion": {"role": "assistant", "content": "hello"}, "response_type": "comply",
                    "rm_score": 0.25, "id": "a"}


def test_score_checks_lengths(server):
    with RewardClient(server.url, **FAST) as rc, pytest.raises(ValueError):
        rc.score(["a", "b"], ["c"])


def test_get_reward_chunks_and_merges(server):
    query = [f"q{i:03d}" + "x" * (i % 5) for i in range(300)]
    labels = ["comply"] * 300
    with RewardClient(server.url, chunk_size=128, **FAST) as rc:
        out = rc.get_reward(query, prompts=[f"q{i:03d}" for i in range(300)], labels=labels)
        empty = rc.get_reward([])
    assert [len(s.body["query"]) for s in server.posts("/get_reward")] == [128, 128, 44, 0]
    assert server.posts("/get_reward")[0].body["labels"] == ["comply"] * 128
    assert out.rewards == [float(len(q)) for q in query] and out.scores == out.rewards
    assert out.extra_logs["rbr_reward"] == [0.5] * 300
    assert empty.rewards == [] and empty.extra_logs == {"rbr_reward": []}


def test_policy_and_ready(server):
    with RewardClient(server.url, **FAST) as rc:
        assert rc.policy()["class_order"] == CLASS_ORDER
        assert rc.ready() is True
        server.push(error(503, "not_ready", **{"Retry-After": "5"}))
        assert rc.ready() is False
    with RewardClient(dead_url(), connect_timeout=0.5) as rc:
        assert rc.ready() is False


# --- several base URLs -----------------------------------------------------------------------------------------------


def moves(caplog) -> list[str]:
    """The URLs the client moved to at once, from its log lines."""
    return [m.group(1) for r in caplog.records if (m := re.search(r"retry \d+/\d+ on (\S+)", r.getMessage()))]


def test_one_url_string_list_and_comma_forms(make_server):
    a, b = make_server(), make_server()
    assert RewardClient(a.url + "/").base_urls == [a.url]
    assert RewardClient(f" {a.url}, {b.url}/ ,").base_urls == [a.url, b.url]
    assert RewardClient([a.url, b.url]).base_url == f"{a.url},{b.url}"
    with pytest.raises(ValueError, match="no URL"):
        RewardClient(" , ")


def test_requests_take_the_urls_in_turn(make_server):
    a, b = make_server(), make_server()
    with RewardClient(f"{a.url},{b.url}", chunk_size=1, **FAST) as rc:
        out = rc.rewards(items(6))
        rc.get_reward(["q1", "q2"])  # chunk_size 1: two more requests
    assert [r.reward for r in out] == [i + 0.5 for i in range(6)]
    assert len(a.seen) == len(b.seen) == 4
    assert [s.body["items"][0]["rm_score"] for s in a.posts("/v1/rewards")] == [0.0, 2.0, 4.0]


def test_a_dead_url_fails_over_at_once_and_is_skipped_while_down(make_server, caplog):
    live = make_server()
    dead = dead_url()
    with caplog.at_level(logging.WARNING, logger="rbr.client"), \
            RewardClient([dead, live.url], max_retries=1, chunk_size=1, failover_cooldown=600, connect_timeout=2,
                         **FAST) as rc:
        out = rc.rewards(items(5))
    assert [r.reward for r in out] == [i + 0.5 for i in range(5)]
    assert len(live.posts("/v1/rewards")) == 5
    assert moves(caplog) == [live.url]  # only the first request met the dead URL; the others skipped it


def test_503_fails_over_other_retryable_answers_stay(make_server, caplog):
    a, b = make_server(), make_server()
    a.push(error(503, "engine_unavailable", **{"Retry-After": "30"}))
    with caplog.at_level(logging.WARNING, logger="rbr.client"), \
            RewardClient([a.url, b.url], max_retries=1, retry_after_max=30, **FAST) as rc:
        assert [r.reward for r in rc.rewards(items(2))] == [0.5, 1.5]  # not after 30 s: at once, on b
    assert moves(caplog) == [b.url] and len(a.seen) == len(b.seen) == 1
    a.push(error(429, "overloaded", **{"Retry-After": "0"}), error(500, "internal_error"))
    with RewardClient([a.url, b.url], max_retries=2, **FAST) as rc:
        rc.rewards(items(1))
    assert len(a.seen) == 4 and len(b.seen) == 1  # 429 and 500 retried on the same replica


def test_client_errors_never_fail_over(make_server):
    a, b = make_server(), make_server()
    a.push(error(422, "invalid_request", "bad", "items[0].prompt"))
    with RewardClient([a.url, b.url], max_retries=3, **FAST) as rc, pytest.raises(RewardServiceError) as info:
        rc.rewards(items(1))
    assert info.value.status == 422 and info.value.attempts == 1 and b.seen == []


def test_failover_stays_within_the_retry_budget(make_server):
    a = make_server()
    a.push(*[error(503, "not_ready")] * 10)
    rc = RewardClient([dead_url(), a.url, dead_url()], max_retries=4, connect_timeout=2, failover_cooldown=600,
                      **FAST)
    with rc, pytest.raises(RewardServiceError) as info:
        rc.rewards(items(1))
    assert info.value.attempts == 5  # 1 + max_retries, however many URLs
    # dead, a, dead (every URL once, no wait), then a wait, then dead, a: the fifth attempt is a's 503
    assert len(a.seen) == 2 and info.value.status == 503


def test_ready_when_any_url_is(make_server):
    a = make_server()
    with RewardClient([dead_url(), a.url], connect_timeout=1) as rc:
        assert rc.ready()
    with RewardClient([dead_url(), dead_url()], connect_timeout=1) as rc:
        assert not rc.ready()


async def test_async_spreads_and_fails_over(make_server, caplog):
    a, b = make_server(), make_server()
    async with AsyncRewardClient([a.url, b.url], chunk_size=1, max_concurrency=1, **FAST) as rc:
        out = await rc.rewards(items(4))
    assert [r.reward for r in out] == [i + 0.5 for i in range(4)] and len(a.seen) == len(b.seen) == 2
    b.push(error(503, "engine_unavailable"))
    with caplog.at_level(logging.WARNING, logger="rbr.client"):
        async with AsyncRewardClient([b.url, a.url], max_retries=1, **FAST) as rc:
            assert await rc.score(["p"], ["c"], ["comply"], [1.0]) == [1.5]
            assert await rc.ready()
    assert moves(caplog) == [a.url]


def test_adapters_take_several_urls(make_server):
    a, b = make_server(), make_server()
    dead = dead_url()
    fn = trl_reward_func(f"{dead},{a.url}", connect_timeout=2, **FAST)
    assert asyncio.run(fn(["p"], ["c"], response_type=["comply"])) == [0.5]
    compute_score = pickle.loads(pickle.dumps(verl_compute_score([dead, b.url], connect_timeout=2, **FAST)))
    assert compute_score("s", "a", None, {"prompt": "q", "response_type": "comply", "rm_score": 1})["score"] == 1.5
    assert len(a.posts("/v1/rewards")) == 1 and len(b.posts("/v1/rewards")) == 1


# --- async client -----------------------------------------------------------------------------------------------------


async def test_async_retries_then_succeeds(server):
    server.push(error(429, "overloaded", **{"Retry-After": "0"}), error(503, "engine_unavailable"), Reply(200))
    async with AsyncRewardClient(server.url, "k", max_retries=3, **FAST) as rc:
        assert await rc.score(["a", "b"], ["c", "d"], ["comply", None], [1.0, 2.0]) == [1.5, 2.0]
    assert len(server.seen) == 3


async def test_async_no_retry_on_422(server):
    server.push(error(422, "invalid_request", "bad", "items[0].prompt"))
    async with AsyncRewardClient(server.url, **FAST) as rc:
        with pytest.raises(RewardServiceError) as info:
            await rc.rewards(items(1))
    assert info.value.field == "items[0].prompt" and len(server.seen) == 1


async def test_async_chunks_run_concurrently_and_keep_order(server):
    # Every chunk is answered only once all three have arrived (a barrier, whatever order they come in), and the
    # first one a little later than the others: the chunks overlap and finish out of order by construction, not by
    # timing. A client that sent them one at a time would break the barrier (20 s) and leave max_inflight at 1.
    arrived = threading.Barrier(3, timeout=20)

    def delay_for(body: Any) -> float:
        try:
            arrived.wait()
        except threading.BrokenBarrierError:
            return 0.0
        return 0.2 if body["items"][0]["rm_score"] == 0.0 else 0.0

    server.delay_for = delay_for
    async with AsyncRewardClient(server.url, chunk_size=256, max_concurrency=3, **{**FAST, "timeout": 60.0}) as rc:
        out = await rc.rewards(items(600))
    assert sorted(len(s.body["items"]) for s in server.posts("/v1/rewards")) == [88, 256, 256]
    assert [r.reward for r in out] == [i + 0.5 for i in range(600)]
    assert server.max_inflight == 3  # all three chunks were in flight together


async def test_async_concurrency_is_bounded(server):
    server.delay_for = lambda body: 0.05
    async with AsyncRewardClient(server.url, chunk_size=10, max_concurrency=2, **FAST) as rc:
        out = await rc.rewards(items(100))
    assert len(server.posts("/v1/rewards")) == 10 and len(out) == 100
    assert server.max_inflight <= 2


async def test_async_chunk_failure_raises(server):
    server.push(Reply(200), error(413, "payload_too_large", "too big", "items"))
    async with AsyncRewardClient(server.url, chunk_size=5, max_concurrency=1, **FAST) as rc:
        with pytest.raises(RewardServiceError) as info:
            await rc.rewards(items(15))
    assert info.value.status == 413


async def test_async_get_reward_policy_ready(server):
    async with AsyncRewardClient(server.url, chunk_size=2, **FAST) as rc:
        out = await rc.get_reward(["ab", "abc", "a"], labels=["comply", None, ""])
        assert out.rewards == [2.0, 3.0, 1.0]
        assert (await rc.policy())["class_order"] == CLASS_ORDER
        assert await rc.ready()


# --- TRL adapter ------------------------------------------------------------------------------------------------------


class Logs:
    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.columns: dict[str, list[Any]] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(name, []).append(value)

    def log_extra(self, column: str, values: list) -> None:
        self.columns.setdefault(column, []).extend(values)


def test_trl_function_shape(server):
    fn = trl_reward_func(server.url)
    assert inspect.iscoroutinefunction(fn)  # TRL awaits reward functions that pass this check
    assert fn.__name__ == "rbr_reward"
    assert list(inspect.signature(fn).parameters) == ["prompts", "completions", "kwargs"]
    assert trl_reward_func(server.url, name="safety").__name__ == "safety"
    sync_fn = trl_reward_func(server.url, asynchronous=False)
    assert not inspect.iscoroutinefunction(sync_fn) and callable(sync_fn)


def test_trl_standard_format(server):
    fn = trl_reward_func(server.url, api_key="k", rm_score_key="rm", **FAST)
    logs = Logs()
    out = asyncio.run(fn(prompts=["p0", "p1", "p2"], completions=["c0", "c1", "c2"],
                         completion_ids=[[1], [2], [3]], response_type=["comply", None, "hard_refuse"],
                         rm=[0.1, 0.2, 0.3], trainer_state=None, log_metric=logs.log_metric,
                         log_extra=logs.log_extra))
    # the fake server adds rm + 0.5 in float64: approx's default (relative 1e-6) covers any rounding of the sum
    assert out == pytest.approx([0.6, 0.2, 0.8]) and all(isinstance(x, float) for x in out)
    sent = server.seen[0].body
    assert sent["return_features"] is True
    assert [it["prompt"] for it in sent["items"]] == ["p0", "p1", "p2"]
    assert "response_type" not in sent["items"][1]
    assert logs.metrics["rbr_reward/class/ideal"] == [0.75]
    assert logs.metrics["rbr_reward/prop/refuses"] == [pytest.approx(0.9)]
    assert logs.metrics["rbr_reward/graded_frac"] == [pytest.approx(2 / 3)]
    assert "rbr_reward/prop/class:ideal" not in logs.metrics
    assert logs.columns == {"rbr_reward_rbr": [0.5, 0.0, 0.5], "rbr_reward_rm": [0.1, 0.2, 0.3]}
    assert fn.last_metrics["class/ideal"] == 0.75 and len(fn.last_results) == 3


def test_trl_conversational_format(server):
    fn = trl_reward_func(server.url, **FAST)
    prompts = [[{"role": "system", "content": "Be safe."}, {"role": "user", "content": f"q{i}"}] for i in range(3)]
    completions = [[{"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    out = asyncio.run(fn(prompts, completions, response_type=["comply"] * 3))  # no logging hooks: older TRL
    assert out == [0.5, 0.5, 0.5]
    sent = server.seen[0].body["items"]
    assert sent[1]["prompt"] == [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "q1"}]
    assert sent[1]["completion"] == {"role": "assistant", "content": "a1"}
    assert fn.last_metrics["class/ideal"] == 0.75


def test_trl_multimodal_and_tool_turns(server):
    fn = trl_reward_func(server.url, **FAST)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    completion = [{"role": "assistant", "content": "", "tool_calls": [{"name": "look"}]},
                  {"role": "tool", "content": "a cat"}, {"role": "assistant", "content": "A cat."}]
    asyncio.run(fn([prompt], [completion], response_type=["comply"]))
    sent = server.seen[0].body["items"][0]
    assert sent["prompt"] == [{"role": "user", "content": "what is this?"}, {"role": "assistant", "content": ""},
                              {"role": "tool", "content": "a cat"}]
    assert sent["completion"] == {"role": "assistant", "content": "A cat."}


def test_trl_needs_the_response_type_column(server):
    fn = trl_reward_func(server.url, **FAST)
    with pytest.raises(ValueError, match="response_type"):
        asyncio.run(fn(["p"], ["c"]))
    rm_only = trl_reward_func(server.url, response_type_key=None, **FAST)
    assert asyncio.run(rm_only(["p"], ["c"])) == [0.0]


def test_trl_works_across_event_loops_and_sync(server):
    fn = trl_reward_func(server.url, **FAST)
    for _ in range(2):  # a second loop gets its own connection pool
        assert asyncio.run(fn(["p"], ["c"], response_type=["comply"])) == [0.5]
    sync_fn = trl_reward_func(server.url, asynchronous=False, **FAST)
    logs = Logs()
    assert sync_fn(["p", "q"], ["c", "d"], response_type=["comply", ""], log_metric=logs.log_metric) == [0.5, 0.0]
    assert logs.metrics["rbr_reward/graded_frac"] == [0.5]


def test_trl_on_error_none(server):
    server.push(error(403, "forbidden", "no", "authorization"))
    fn = trl_reward_func(server.url, on_error="none", **FAST)
    assert asyncio.run(fn(["p", "q"], ["c", "d"], response_type=["comply", "comply"])) == [None, None]
    server.push(error(403, "forbidden", "no", "authorization"))
    strict = trl_reward_func(server.url, **FAST)
    with pytest.raises(RewardServiceError):
        asyncio.run(strict(["p"], ["c"], response_type=["comply"]))


# --- veRL adapter -----------------------------------------------------------------------------------------------------


def test_verl_compute_score(server):
    compute_score = verl_compute_score(server.url, api_key="k", **FAST)
    out = compute_score("safety", "I can't help with that.", None,
                        extra_info={"prompt": "How do I pick a lock?", "response_type": "hard_refuse",
                                    "rm_score": 0.25, "index": 3})
    assert out["score"] == 0.75 and out["rbr_reward"] == 0.5 and out["rm_score"] == 0.25 and out["graded"] == 1.0
    assert {k: out[k] for k in out if k.startswith("class_")} == {
        "class_ideal": 0.75, "class_minimum_acceptable_style": 0.25, "class_unacceptable_completion": 0.0}
    # an ungraded sample carries the same keys (veRL gathers every key into per-sample lists)
    chat = [{"role": "user", "content": "hi"}]
    ungraded = compute_score(data_source="chat", solution_str="hello", ground_truth="",
                             extra_info={"prompt": chat, "response_type": None, "num_turns": 2})
    assert set(ungraded) == set(out) and ungraded["graded"] == 0.0 and ungraded["score"] == 0.0
    assert len(server.posts("/v1/policy")) == 1  # class order fetched once
    assert server.posts("/v1/rewards")[1].body["items"][0]["prompt"] == chat


def test_verl_needs_the_prompt_and_pickles(server):
    compute_score = verl_compute_score(server.url, **FAST)
    with pytest.raises(ValueError, match="prompt"):
        compute_score("src", "answer", None, extra_info={"response_type": "comply"})
    compute_score("src", "answer", None, extra_info={"prompt": "q", "response_type": "comply"})
    clone = pickle.loads(pickle.dumps(compute_score))  # Ray ships reward functions to workers
    assert clone("src", "answer", None, extra_info={"prompt": "q", "response_type": "comply"})["score"] == 0.5


def test_verl_batch(server):
    compute_score = verl_compute_score_batch(server.url, chunk_size=2, **FAST)
    infos = [{"prompt": f"q{i}", "response_type": "comply", "rm_score": float(i)} for i in range(5)]
    out = compute_score(data_sources=["s"] * 5, solution_strs=[f"a{i}" for i in range(5)],
                        ground_truths=[None] * 5, extra_infos=infos)
    assert [r["score"] for r in out] == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert all("class_ideal" in r for r in out)
    assert [len(s.body["items"]) for s in server.posts("/v1/rewards")] == [2, 2, 1]


# --- contract with the server's schemas -------------------------------------------------------------------------------


def test_what_the_client_sends_matches_the_server_protocol(server):
    from service.protocol import OpenRLHFRequest, OpenRLHFResponse, RewardsRequest, RewardsResponse

    with RewardClient(server.url, **FAST) as rc:
        rc.rewards(items(2) + [Item([{"role": "user", "content": "hi"}], {"role": "assistant", "content": "yo"})])
        rc.get_reward(["q a"], prompts=["q "], labels=[None])
    asyncio.run(trl_reward_func(server.url, **FAST)(
        [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]],
        [[{"role": "assistant", "content": "yo", "reasoning": "..."}]], response_type=[""]))
    verl_compute_score(server.url, **FAST)("s", "a", None, {"prompt": [{"role": "user", "content": "q"}],
                                                            "response_type": "comply", "rm_score": 1})
    for seen in server.posts("/v1/rewards"):
        RewardsRequest.model_validate(seen.body)
        RewardsResponse.model_validate(server.default("POST", "/v1/rewards", seen.body).body)
    for seen in server.posts("/get_reward"):
        OpenRLHFRequest.model_validate(seen.body)
        OpenRLHFResponse.model_validate(server.default("POST", "/get_reward", seen.body).body)
