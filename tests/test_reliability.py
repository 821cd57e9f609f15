"""Reliability and security harness: API fuzzing, hostile input, overload, disconnects, auth and log hygiene.

Every test drives the real app on the shared CPU vLLM engine (`grader_engine`), most of them through a real
uvicorn server on loopback started on the test's own event loop, and reports the figures it established (examples
tried, requests sent, errors seen) on the terminal, whatever pytest's capture mode, and as junit properties.
Fault injection (Redis killed under load, the grader engine killed) lives in test_reliability_faults.py.

Select with `-m reliability`. Grading one new item takes seconds on this CPU, so the inputs are built to keep it
rare: most fuzzed items carry no response type (RM-only, no grading) and only a handful of graded items are sent.
`RBR_FUZZ_EXAMPLES` (default 40) bounds the examples per operation and mode; `RBR_FUZZ_SEED` replays a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from helpers import CONV, app_on, asgi_client, live_server, metric, report, reward_item, rss_mib, unique
from redis_server import RedisServer

from rbr_model.policy import load_policy

pytestmark = pytest.mark.reliability  # tests on `grader_engine` are marked `engine` by conftest.py

ADMIN = "admin-key-for-tests"
FUZZ_EXAMPLES = int(os.environ.get("RBR_FUZZ_EXAMPLES", "40"))


# ---- 1. API fuzzing --------------------------------------------------------------------------------------
def _fuzz(base_url: str, examples: int, seed: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """schemathesis against the live server's OpenAPI schema: every operation, positive and negative data.

    Checks: no 5xx, status codes the schema documents, documented content type and headers, bodies that match
    the schema, and schema-invalid requests rejected. Positive-data acceptance is not checked: a schema-valid
    request can rightly be refused for what the schema cannot say (an unknown response type, duplicate ids).
    Runs in a worker thread: blocking HTTP calls, while the server keeps the event loop.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks as oc

    checks = [not_a_server_error, oc.status_code_conformance, oc.content_type_conformance,
              oc.response_headers_conformance, oc.response_schema_conformance, oc.negative_data_rejection,
              oc.unsupported_method]
    headers = {"Authorization": f"Bearer {ADMIN}"}
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    stats: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} [{mode.value}]"
            codes: Counter[Any] = Counter()

            def call(case: Any, codes: Counter[Any] = codes, label: str = label) -> None:
                try:
                    response = case.call_and_validate(base_url=base_url, headers=headers, checks=checks, timeout=120)
                    codes[str(response.status_code)] += 1
                except BaseException as exc:  # noqa: BLE001 - a check failed: record it, keep fuzzing
                    codes["failed"] += 1
                    failures.append(f"{label}: {str(exc)[:1500]}")

            run = _hypothesis_test(operation.as_strategy(generation_mode=mode), call)
            run = settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                           suppress_health_check=list(HealthCheck))(run)
            with contextlib.suppress(Unsatisfiable):  # no invalid data exists for an operation without inputs
                hypothesis_seed(seed)(run)()
            stats[label] = dict(codes)
    return stats, failures


def _hypothesis_test(strategy: Any, call: Any) -> Any:
    from hypothesis import given

    @given(case=strategy)
    def run(case: Any) -> None:
        call(case)

    return run


async def test_fuzz_openapi_all_routes(grader_engine, request):
    seed = int(os.environ.get("RBR_FUZZ_SEED", random.randrange(2**32)))
    # A default RM score makes schema-valid items scorable; random response types are unknown (422) or null
    # (RM only), so fuzzing stays cheap. The valid graded requests are sent explicitly below.
    async with app_on(grader_engine, default_rm_score=0.0, admin_key=ADMIN) as app, live_server(app) as base:
        start = time.perf_counter()
        stats, failures = await asyncio.to_thread(_fuzz, base, FUZZ_EXAMPLES, seed)
        graded = await asyncio.to_thread(_valid_graded_cases, base)
        elapsed = time.perf_counter() - start
        server_errors = sum(v for s in stats.values() for k, v in s.items() if k.startswith("5"))
        examples = sum(sum(s.values()) for s in stats.values())
        # The server-side view: every request the fuzzer made, by status.
        seen = Counter()
        for sample in app.state.rbr.metrics.requests.collect()[0].samples:
            if sample.name.endswith("_total"):
                seen[sample.labels["code"]] += int(sample.value)
    for label, s in stats.items():
        report(request, operation=label.replace(" ", "_"), statuses=json.dumps(s, sort_keys=True))
    report(request, seed=seed, examples_per_operation_and_mode=FUZZ_EXAMPLES, operations=len(stats),
           examples=examples, graded_valid_requests=graded, server_statuses=json.dumps(dict(seen), sort_keys=True),
           failures=len(failures), server_errors=server_errors, seconds=round(elapsed, 1))
    assert not failures, f"RBR_FUZZ_SEED={seed} reproduces:\n\n" + "\n\n".join(failures[:5])
    assert server_errors == 0 and not any(code.startswith("5") for code in seen)
    operations = {label.split(" [")[0] for label in stats}
    for route in ("POST /v1/rewards", "POST /get_reward", "POST /v1/admin/reload", "GET /v1/policy", "GET /healthz",
                  "GET /readyz"):
        assert route in operations, f"{route} missing from the OpenAPI schema"


def _valid_graded_cases(base_url: str) -> int:
    """Valid requests that really grade, through schemathesis too, so their 200 bodies are checked against the
    schema: one new item on /v1/rewards with features, the same conversation on /get_reward (cached)."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks as oc

    checks = [not_a_server_error, oc.status_code_conformance, oc.content_type_conformance,
              oc.response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    rewards = schema["/v1/rewards"]["POST"]
    openrlhf = schema["/get_reward"]["POST"]
    completion = unique("Try naming it Clint Yeastwood; it is a classic.")
    item = {"prompt": CONV, "completion": completion, "response_type": "comply", "rm_score": 0.25, "id": "a"}
    plain = {"prompt": "hello", "completion": "hi", "response_type": None, "rm_score": -1.0, "id": "b"}
    prompt = f"<|im_start|>user\n{CONV[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    cases = [
        rewards.Case(body={"items": [item, plain], "return_features": True}, media_type="application/json"),
        rewards.Case(body={"items": [item]}, media_type="application/json"),
        openrlhf.Case(body={"query": [prompt + completion + "<|im_end|>"], "prompts": [prompt], "labels": ["comply"]},
                      media_type="application/json"),
    ]
    for case in cases:
        response = case.call_and_validate(base_url=base_url, checks=checks, timeout=300)
        assert response.status_code == 200, response.text
    first = cases[0].call(base_url=base_url, timeout=300).json()["results"][0]
    assert first["features"] and all(0.0 <= v <= 1.0 for v in first["features"].values())
    return len(cases)


def test_the_schema_states_what_the_routes_check():
    """What the fuzzer may send as valid: a prompt given as messages holds one at least (minItems, the same rule the
    validator names the field with); the per-query lists say they must match `query` (JSON Schema cannot)."""
    from service.protocol import OpenRLHFRequest, RewardsRequest

    prompt = RewardsRequest.model_json_schema()["$defs"]["RewardItem"]["properties"]["prompt"]
    (messages,) = [b for b in prompt["anyOf"] if b.get("type") == "array"]
    assert messages["minItems"] == 1
    fields = OpenRLHFRequest.model_json_schema()["properties"]
    assert all("exactly as many as `query`" in fields[name]["description"] for name in ("prompts", "labels"))


# ---- 2. hostile and malformed input --------------------------------------------------------------------------
LIMITS = {"max_items": 8, "max_chars": 30_000, "max_body_bytes": 256 * 1024}


def _rewards(*items: dict[str, Any], **kw: Any) -> bytes:
    return json.dumps({"items": list(items), **kw}).encode()


def hostile_cases() -> list[tuple[str, str, bytes, dict[str, str], int, str]]:
    """(name, route, raw body, extra headers, expected status, expected field) per hostile input."""
    r, g = "/v1/rewards", "/get_reward"
    chat = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    long_text = " ".join(f"word{i}" for i in range(4000))  # ~36k chars: past RBR_MAX_CHARS=30000
    context_text = " ".join(f"w{i % 97}x" for i in range(5500))[:29_000]  # under max_chars, over 4096 tokens
    return [
        ("bad json", r, b'{"items": [', {}, 422, "body"),
        ("bad json openrlhf", g, b'{"query": ', {}, 422, "body"),
        ("trailing garbage", r, _rewards(reward_item()) + b"}}", {}, 422, "body"),
        ("not an object", r, b"[1, 2, 3]", {}, 422, "body"),
        ("empty body", r, b"", {}, 422, "body"),
        ("text/plain body", r, b"items", {"content-type": "text/plain"}, 422, "body"),
        ("items not a list", r, b'{"items": {"a": 1}}', {}, 422, "items"),
        ("rm_score a string", r, _rewards(reward_item(rm_score="high")), {}, 422, "items[0].rm_score"),
        ("prompt a number", r, _rewards(reward_item(prompt=5)), {}, 422, "items[0].prompt"),
        ("completion a list", r, _rewards(reward_item(completion=["a"])), {}, 422, "items[0].completion"),
        ("return_features a list", r, _rewards(reward_item(), return_features=[1]), {}, 422, "return_features"),
        ("return_features a number", r, _rewards(reward_item(), return_features=0.0), {}, 422, "return_features"),
        ("rm_score a numeric string", r, _rewards(reward_item(rm_score="0.5")), {}, 422, "items[0].rm_score"),
        ("query not a list", g, b'{"query": "abc"}', {}, 422, "query"),
        ("label a number", g, json.dumps({"query": [chat + "x"], "labels": [3]}).encode(), {}, 422, "labels[0]"),
        ("empty message list", r, _rewards(reward_item(prompt=[])), {}, 422, "items[0].prompt"),
        ("more labels than queries", g, json.dumps({"query": [], "labels": [None]}).encode(), {}, 422, "labels"),
        ("unknown message role", r, _rewards(reward_item(prompt=[{"role": "wizard", "content": "x"}])), {}, 422,
         "items[0].prompt"),
        ("completion from the user", r, _rewards(reward_item(completion={"role": "user", "content": "x"})), {}, 422,
         "items[0].completion.role"),
        ("unknown field", r, _rewards(reward_item(colour="red")), {}, 422, "items[0].colour"),
        ("id too long", r, _rewards(reward_item(id="i" * 300)), {}, 422, "items[0].id"),
        ("too many items", r, _rewards(*[reward_item(id=str(i)) for i in range(9)]), {}, 413, "items"),
        ("too many queries", g, json.dumps({"query": [chat + "x"] * 9}).encode(), {}, 413, "query"),
        ("huge completion", r, _rewards(reward_item(completion=long_text)), {}, 413, "items[0].completion"),
        ("huge message", r, _rewards(reward_item(prompt=[{"role": "user", "content": long_text}])), {}, 413,
         "items[0].prompt[0].content"),
        ("huge prompt openrlhf", g, json.dumps({"query": [chat + "x"], "prompts": [long_text]}).encode(), {}, 413,
         "prompts[0]"),
        ("body over the byte limit", r, b'{"items": ["' + b"x" * 300_000 + b'"]}', {}, 413, "body"),
        ("deep nesting", r, b'{"items": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 422, "body"),
        ("deep nesting in a field", r, b'{"items": [{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}]}", {}, 422,
         "body"),
        ("integer of 5000 digits", r, b'{"items": [{"prompt": "a", "completion": "b", "rm_score": ' + b"9" * 5000
         + b"}]}", {}, 422, "body"),
        ("invalid utf-8", r, b'{"items": [{"prompt": "\xff\xfe\xc3", "completion": "b", "rm_score": 0}]}', {}, 422,
         "body"),
        ("raw control character", r, b'{"items": [{"prompt": "a\x01b", "completion": "b", "rm_score": 0}]}', {},
         422, "body"),
        ("lone surrogate", r, b'{"items": [{"prompt": "a", "completion": "\\ud800", "rm_score": 0}]}', {}, 422,
         "items[0].completion"),
        ("lone surrogate in a message", r, b'{"items": [{"prompt": [{"role": "user", "content": "\\udfff"}], '
         b'"completion": "b", "rm_score": 0}]}', {}, 422, "items[0].prompt[0].content"),
        ("lone surrogate openrlhf", g, b'{"query": ["Assistant: \\udc00"]}', {}, 422, "query[0]"),
        ("unknown response type", r, _rewards(reward_item(response_type="dance")), {}, 422, "items[0].response_type"),
        ("huge unknown response type", r, _rewards(reward_item(response_type="z" * 20_000)), {}, 422,
         "items[0].response_type"),
        ("unknown label", g, json.dumps({"query": [chat + "x"], "labels": ["sing"]}).encode(), {}, 422,
         "labels[0]"),
        ("NaN rm_score", r, b'{"items": [{"prompt": "a", "completion": "b", "rm_score": NaN}]}', {}, 422,
         "items[0].rm_score"),
        ("Infinity rm_score", r, b'{"items": [{"prompt": "a", "completion": "b", "rm_score": Infinity}]}', {}, 422,
         "items[0].rm_score"),
        ("-Infinity rm_score", r, b'{"items": [{"prompt": "a", "completion": "b", "rm_score": -Infinity}]}', {},
         422, "items[0].rm_score"),
        ("overflowing rm_score", r, b'{"items": [{"prompt": "a", "completion": "b", "rm_score": 1e999}]}', {}, 422,
         "items[0].rm_score"),
        ("duplicate ids", r, _rewards(reward_item(id="x"), reward_item(id="y"), reward_item(id="x")), {}, 422,
         "items[2].id"),
        ("prompts count mismatch", g, json.dumps({"query": [chat + "x"], "prompts": ["a", "b"]}).encode(), {}, 422,
         "prompts"),
        ("query without a prompt boundary", g, b'{"query": ["no marker here"]}', {}, 422, "query[0]"),
        ("longer than the grader's context", r, _rewards(reward_item(completion=context_text, response_type="comply")),
         {}, 422, "items"),
    ]


async def _chunks(body: bytes, size: int = 16 * 1024):
    for i in range(0, len(body), size):
        yield body[i:i + size]


async def test_hostile_inputs_get_4xx_naming_the_field(grader_engine, request):
    cases = hostile_cases()
    outcomes: list[tuple[str, int, str | None]] = []
    async with app_on(grader_engine, default_rm_score=0.0, **LIMITS) as app, live_server(app) as base:
        rss_before = rss_mib()
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            for name, route, body, headers, status, field in cases:
                r = await client.post(route, content=body, headers={"content-type": "application/json", **headers})
                error = r.json().get("error", {}) if r.headers.get("content-type") == "application/json" else {}
                outcomes.append((name, r.status_code, error.get("field")))
                assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
                assert (error.get("field") or "").startswith(field), f"{name}: field {error.get('field')!r}"
                assert field in error["message"] and len(error["message"]) < 600, f"{name}: {error['message']!r}"
            # A body of unknown length (chunked) is bounded too, before anything parses it.
            huge = _rewards(*[reward_item(completion="y" * 20_000)] * 16)
            r = await client.post("/v1/rewards", content=_chunks(huge), headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["field"] == "body", r.text[:300]
            outcomes.append(("chunked body over the byte limit", r.status_code, "body"))
            # Empty lists are valid requests: 200 with nothing in them.
            r = await client.post("/v1/rewards", json={"items": []})
            assert r.status_code == 200 and r.json()["results"] == []
            r = await client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
            assert r.status_code == 200 and r.json()["rewards"] == []
            # Escaped control characters are valid JSON text: graded like any other (a real reward, no error).
            odd = unique("Tabs\tbells\u0007 escapes\u001b[0m and a NUL\u0000 in the reply.")
            r = await client.post("/v1/rewards", json={"items": [reward_item(completion=odd, response_type="comply")]})
            assert r.status_code == 200, r.text
            assert math.isfinite(r.json()["results"][0]["reward"])  # a real number, whatever its value
            outcomes.append(("escaped control characters (valid)", r.status_code, None))
            # The process is still healthy and serves.
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            r = await client.post("/v1/rewards", json={"items": [reward_item(id="after")]})
            assert r.status_code == 200 and r.json()["results"][0]["id"] == "after"
        gc.collect()
        rss_after = rss_mib()
        server_errors = sum(v for code, v in _statuses(app).items() if code.startswith("5"))
    statuses = Counter(status for _, status, _ in outcomes)
    report(request, hostile_inputs=len(outcomes), statuses=json.dumps(dict(statuses), sort_keys=True),
           server_errors=server_errors, rss_mib_before=round(rss_before), rss_mib_after=round(rss_after))
    assert server_errors == 0


def _statuses(app: Any) -> Counter[str]:
    seen: Counter[str] = Counter()
    for sample in app.state.rbr.metrics.requests.collect()[0].samples:
        if sample.name.endswith("_total"):
            seen[sample.labels["code"]] += int(sample.value)
    return seen


# ---- 4. overload ---------------------------------------------------------------------------------------------
async def _graded_round(client: httpx.AsyncClient, n: int) -> float:
    """Send `n` new comply items at once (one per request); the seconds until all were answered."""
    start = time.perf_counter()
    item = {"prompt": CONV, "response_type": "comply"}
    rs = await asyncio.gather(*[client.post("/v1/rewards", json={"items": [
        reward_item(**item, completion=unique("Call it Bread Pitt."))]}) for _ in range(n)])
    assert all(r.status_code == 200 for r in rs), [r.text[:200] for r in rs]
    return time.perf_counter() - start


async def test_overload_answers_429_and_only_admitted_work_reaches_the_engine(grader_engine, request):
    per_item = len(load_policy(None).propositions_for("comply"))  # judgments per new comply item
    bound_items = 2
    clients, duration = 64, 25.0
    async with app_on(grader_engine, max_inflight_judgments=per_item * bound_items) as app, \
            live_server(app) as base:
        grader = app.state.rbr.serving.grader
        limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
            # Baseline (a figure for the report only): the bound's worth of new items at once, twice, alone.
            base_s = [await _graded_round(client, bound_items) for _ in range(2)]
            baseline = 2 * bound_items / sum(base_s)
            rss_before = rss_mib()
            sent_before = grader.engine_requests
            codes: Counter[int] = Counter()
            missing_retry_after = 0
            peak_inflight = 0.0
            stop = time.monotonic() + duration

            async def hammer() -> None:
                nonlocal missing_retry_after
                while time.monotonic() < stop:
                    body = {"items": [reward_item(prompt=CONV, completion=unique("Name it Dough Nut."),
                                            response_type="comply")]}
                    r = await client.post("/v1/rewards", json=body)
                    codes[r.status_code] += 1
                    if r.status_code == 429:
                        missing_retry_after += not r.headers.get("retry-after", "").isdigit()
                        await asyncio.sleep(0.2)  # an impatient client: retries far sooner than Retry-After says

            async def watch() -> None:
                nonlocal peak_inflight
                while time.monotonic() < stop:
                    peak_inflight = max(peak_inflight, metric(app, "rbr_inflight_judgments"))
                    await asyncio.sleep(0.01)

            start = time.perf_counter()
            await asyncio.gather(watch(), *[hammer() for _ in range(clients)])
            elapsed = time.perf_counter() - start
            rss_after = rss_mib()
            sent = grader.engine_requests - sent_before
            bound = app.state.rbr.pipeline.admission.limit
            assert metric(app, "rbr_inflight_judgments") == 0
    admitted = codes[200]
    overloaded = admitted / elapsed
    # Figures, not assertions: throughput and memory depend on the machine and its load (benchmarks/ measures them).
    report(request, clients=clients, bound_judgments=bound, peak_inflight_judgments=int(peak_inflight),
           requests=sum(codes.values()), statuses=json.dumps(dict(codes), sort_keys=True),
           missing_retry_after=missing_retry_after, engine_prompts=sent, baseline_items_per_s=round(baseline, 3),
           overloaded_items_per_s=round(overloaded, 3), throughput_ratio=round(overloaded / baseline, 2),
           rss_mib_before=round(rss_before), rss_mib_after=round(rss_after))
    assert set(codes) <= {200, 429}, codes
    assert codes[429] > 0 and admitted >= bound_items, codes  # the first wave fills the bound; the rest is refused
    assert missing_retry_after == 0
    # What a collapse under rejection would come from, checked directly instead of through a throughput ratio:
    # a refused request reaching the engine (every prompt sent belongs to an admitted item, 8 each, each prompt
    # unique), or admission letting more than the bound in.
    assert sent == admitted * per_item, f"{sent} prompts reached the engine for {admitted} admitted items"
    assert peak_inflight <= bound, f"{peak_inflight} judgments in flight, bound {bound}"


# ---- 3c. a client that disconnects mid-request ---------------------------------------------------------------
class HeldEngine:
    """The real shared engine whose answers wait at a gate once computed: while the gate is closed no grading can
    finish, so work that leaves the grader was cancelled, not completed. Every judgment comes from the real engine.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.model_id = inner.model_id
        self.gate = asyncio.Event()
        self.gate.set()
        self.outcomes: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:  # tokenizer, yes/no ids, max_model_len ... for the grader
        return getattr(self.inner, name)

    async def grade(self, prompts: Any) -> Any:
        try:
            out = await self.inner.grade(prompts)  # cancelled here: vLLM aborts the request
            await self.gate.wait()
        except asyncio.CancelledError:
            self.outcomes["cancelled"] += 1
            raise
        self.outcomes["completed"] += 1
        return out

    async def generate(self, prompts: Any, max_tokens: int = 256, temperature: float = 0.0, seed: Any = None) -> Any:
        return await self.inner.generate(prompts, max_tokens, temperature, seed)

    async def health(self) -> bool:
        return await self.inner.health()

    async def close(self) -> None:
        pass  # the shared engine belongs to the test run


async def test_client_disconnect_frees_engine_work(grader_engine, request):
    held = HeldEngine(grader_engine)
    async with app_on(held) as app, live_server(app) as base:
        grader = app.state.rbr.serving.grader
        items = [reward_item(prompt=CONV, completion=unique("Perhaps Loaf Actually."), response_type="hard_refuse")]
        body = json.dumps({"items": items}).encode()
        port = int(base.rsplit(":", 1)[1])
        held.gate.clear()  # from now on no grading can finish: only cancellation frees work
        held.outcomes.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/rewards HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        deadline = time.monotonic() + 120
        while metric(app, "rbr_inflight_judgments") == 0:
            assert time.monotonic() < deadline, "the request never reached the grader"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the engine is busy with it now
        admitted = metric(app, "rbr_inflight_judgments")
        busy = grader.in_flight
        closed_at = time.perf_counter()
        writer.close()  # the client goes away without reading the answer
        # The gate is closed, so this loop ends only if the disconnect cancels the work (a generous deadline: it
        # is reached only when cancellation is broken).
        deadline = time.monotonic() + 120
        while metric(app, "rbr_inflight_judgments") or grader.in_flight or metric(app, "rbr_inflight_requests"):
            assert time.monotonic() < deadline, "grading work kept running after the client left"
            await asyncio.sleep(0.01)
        freed_s = time.perf_counter() - closed_at
        outcomes = dict(held.outcomes)
        deadline = time.monotonic() + 60
        while (unfinished := _engine_unfinished(grader_engine)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # vLLM's own abort lands a moment later
        cancelled = metric(app, "rbr_requests_total", route="/v1/rewards", code="499")
        held.gate.set()
        # What the whole request would have cost (a figure for the report): the same items graded to the end.
        start = time.perf_counter()
        async with asgi_client(app) as client:
            r = await client.post("/v1/rewards", json={"items": items})
        assert r.status_code == 200
        full_s = time.perf_counter() - start
    report(request, judgments_admitted=int(admitted), prompts_in_engine=busy, engine_calls=json.dumps(outcomes),
           freed_after_s=round(freed_s, 2), full_request_s=round(full_s, 2), engine_unfinished_after=unfinished,
           cancelled_requests=int(cancelled))
    assert cancelled == 1
    assert unfinished in (0, None)
    assert outcomes.get("cancelled", 0) >= 1 and not outcomes.get("completed"), outcomes


def _engine_unfinished(engine: Any) -> int | None:
    """Requests vLLM itself still holds (None where the engine does not say)."""
    try:
        return int(engine._llm.output_processor.get_num_unfinished_requests())
    except AttributeError:
        return None


# ---- 5. security ---------------------------------------------------------------------------------------------
async def test_keys_are_required_and_kept_apart(grader_engine, request):
    routes = [("POST", "/v1/rewards", {"items": [reward_item()]}), ("POST", "/get_reward", {"query": []}),
              ("GET", "/v1/policy", None)]
    seen: Counter[int] = Counter()
    async with app_on(grader_engine, api_keys="reward-one,reward-two", admin_key=ADMIN, default_rm_score=0.0) as app, \
            asgi_client(app) as client:

        async def call(method: str, path: str, body: Any, auth: str | None) -> httpx.Response:
            headers = {"Authorization": auth} if auth is not None else {}
            r = await client.request(method, path, json=body, headers=headers)
            seen[r.status_code] += 1
            return r

        for method, path, body in routes:
            r = await call(method, path, body, None)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
            assert r.json()["error"]["field"] == "authorization"
            for bad in ("Bearer ", "Basic reward-one", "reward-one", "Bearer reward-on", "Bearer reward-one2"):
                r = await call(method, path, body, bad)
                assert r.status_code in (401, 403), (path, bad, r.status_code)
            r = await call(method, path, body, f"Bearer {ADMIN}")  # the admin key is not a reward key
            assert r.status_code == 403, (path, r.text)
            for good in ("Bearer reward-one", "bearer reward-two"):
                assert (await call(method, path, body, good)).status_code == 200, (path, good)
        for auth, status in ((None, 401), ("Bearer reward-one", 403), ("Bearer reward-two", 403), ("Bearer nope", 403),
                             (f"Bearer {ADMIN}", 200)):
            r = await call("POST", "/v1/admin/reload", None, auth)
            assert r.status_code == status, (auth, r.text)
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and scraping stay open
            assert (await call("GET", path, None, None)).status_code == 200
    async with app_on(grader_engine, api_keys="k") as app, asgi_client(app) as client:
        r = await client.post("/v1/admin/reload", headers={"Authorization": "Bearer k"})
        assert r.status_code == 403 and "RBR_ADMIN_KEY" in r.json()["error"]["message"]  # admin off without its key
        seen[r.status_code] += 1
    report(request, requests=sum(seen.values()), statuses=json.dumps(dict(seen), sort_keys=True))


def test_key_comparison_is_constant_time(monkeypatch, request):
    """Every configured key is compared, with equal-length inputs, whichever key matches and whatever the token."""
    import service.auth as auth

    calls: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ["first-key", "a-much-longer-second-key", "k3"]
    for token, expected in (("first-key", True), ("k3", True), ("nope", False), ("x" * 500, False), ("", False)):
        calls.clear()
        assert auth._matches(token, keys) is expected
        assert len(calls) == len(keys), f"{token!r}: stopped after {len(calls)} of {len(keys)} keys"
        assert len({n for pair in calls for n in pair}) == 1, "compared inputs of different lengths"
    report(request, tokens_checked=5, keys=len(keys), comparisons_per_token=len(keys))


@pytest.mark.redis
async def test_no_user_text_in_logs_or_redis_keys(grader_engine, request, caplog, capfd):
    marker_prompt = f"PROMPTMARK{uuid.uuid4().hex[:10]}"
    marker_completion = f"COMPLETIONMARK{uuid.uuid4().hex[:10]}"
    markers = (marker_prompt, marker_completion)
    redis = RedisServer().start()
    try:
        caplog.set_level(logging.INFO)  # the default level (RBR_LOG_LEVEL=info), root logger
        async with app_on(grader_engine, redis_url=redis.url, redis_timeout_s=1.0, default_rm_score=0.0) as app, \
                live_server(app) as base, httpx.AsyncClient(base_url=base, timeout=300) as client:
            prompt = f"Please name my sourdough starter {marker_prompt}."
            completion = f"How about {marker_completion}, the mighty starter?"
            sent = Counter()
            chat = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            bodies = [
                ("/v1/rewards", {"items": [{"prompt": prompt, "completion": completion, "response_type": "comply",
                                            "id": "m"}], "return_features": True}),
                ("/v1/rewards", {"items": [{"prompt": prompt, "completion": completion, "response_type": None}]}),
                ("/get_reward", {"query": [chat + completion], "prompts": [chat], "labels": ["comply"]}),
                # failures too: an unknown response type, text over the limit, a bad role, a bad label
                ("/v1/rewards", {"items": [{"prompt": prompt, "completion": completion, "response_type": "dance"}]}),
                ("/v1/rewards", {"items": [{"prompt": prompt, "completion": completion * 3000}]}),
                ("/v1/rewards", {"items": [{"prompt": prompt, "completion": {"role": "user", "content": completion}}]}),
                ("/get_reward", {"query": [chat + completion], "labels": [marker_completion]}),
            ]
            for path, body in bodies:
                r = await client.post(path, json=body)
                sent[r.status_code] += 1
            assert sent[200] == 3, sent
            keys = redis.keys()
            values = [_redis_get(redis, k) for k in keys]
        logs = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records)
        out, err = capfd.readouterr()  # what went straight to this process's stdout/stderr (vLLM's own logger)
    finally:
        redis.stop()
    access_lines = [r for r in caplog.records if r.name == "uvicorn.access"]
    leaks = [m for m in markers if m in logs or m in out or m in err]
    report(request, requests=sum(sent.values()), statuses=json.dumps(dict(sent), sort_keys=True),
           log_records=len(caplog.records), access_log_lines=len(access_lines), redis_keys=len(keys), leaks=len(leaks))
    assert access_lines, "uvicorn's access log was not captured"
    assert not leaks, f"user text in logs: {leaks}"
    assert keys and all(re.fullmatch(rb"rbr:f:[0-9a-f]{64}", k) for k in keys), keys
    for value in values:
        assert not any(m.encode() in value for m in markers)
        assert all(isinstance(v, float) for v in json.loads(value).values())  # only P(yes) per proposition


def _redis_get(redis: RedisServer, key: bytes) -> bytes:
    import subprocess

    out = subprocess.run(["redis-cli", "-p", str(redis.port), "--raw", "GET", key], capture_output=True, check=True)
    return out.stdout.strip()


async def test_admin_reload_reads_only_regular_files(grader_engine, request, tmp_path):
    """An admin typo must not hang or kill the service: devices, FIFOs, directories and odd names are refused."""
    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)
    paths = [("policy_path", "/dev/zero"), ("policy_path", str(fifo)), ("policy_path", str(tmp_path)),
             ("policy_path", "bad\x00name"), ("weights_path", str(tmp_path / "missing.json")),
             ("weights_path", "w" * 5000), ("policy_path", "/etc/hostname")]
    seen: Counter[int] = Counter()
    async with app_on(grader_engine, admin_key=ADMIN) as app, asgi_client(app) as client:
        version = app.state.rbr.serving.policy_version
        for field, path in paths:
            r = await asyncio.wait_for(client.post("/v1/admin/reload", json={field: path},
                                                   headers={"Authorization": f"Bearer {ADMIN}"}), 30)
            seen[r.status_code] += 1
            assert r.status_code == 422 and r.json()["error"]["field"] == field, (path[:40], r.text[:300])
            assert len(r.json()["error"]["message"]) < 700
        assert app.state.rbr.serving.policy_version == version and app.state.rbr.serving.generation == 1
    report(request, reloads_tried=len(paths), statuses=json.dumps(dict(seen), sort_keys=True))
