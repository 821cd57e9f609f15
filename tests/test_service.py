"""The service end to end in process: real CPU vLLM engine, real embedded model, real redis-server.

One engine is shared by the whole test run (`grader_engine` in conftest.py); each test builds its own app on it.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from contextlib import asynccontextmanager

import httpx
import pytest
from helpers import metric

from rbr_model.features import FeatureSpec
from rbr_model.grading.engine import Engine
from rbr_model.policy import load_policy
from rbr_model.reward import Weights, default_weights_path
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.engine

CONV = [{"role": "user", "content": "Can you help me write a birthday message for my sister?"}]
ITEM = {"prompt": CONV, "completion": "Happy birthday to the best sister in the world!",
        "response_type": "comply", "rm_score": 0.5, "id": "one"}


async def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def serve(grader_engine, **overrides):
    settings = Settings(**overrides)
    app = create_app(settings, engine=grader_engine)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: app.state.rbr.ready or app.state.rbr.engine_error, timeout_s=120)
        assert app.state.rbr.ready, app.state.rbr.engine_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
            client.app = app
            yield client


async def test_reward_is_rm_plus_weighted_features(grader_engine):
    async with serve(grader_engine) as client:
        r = await client.post("/v1/rewards", json={"items": [ITEM], "return_features": True})
        assert r.status_code == 200, r.text
        body = r.json()
        res = body["results"][0]
        policy = load_policy(None)
        weights = Weights.load(default_weights_path())
        spec = FeatureSpec(policy, "comply")
        assert set(res["features"]) == set(spec.propositions)
        for p in res["features"].values():
            assert 0.0 <= p <= 1.0
        # Recompute independently: classes from the returned probabilities, then the dot product.
        x = spec.features(spec.matrix([res["features"]]))[0]
        classes = dict(zip(spec.classes, x[len(spec.propositions):], strict=True))
        # float64 sums in another order than the service's: ~20 terms x 1e-16 x |w.x| (~10), so 1e-9 is ample
        assert res["classes"] == pytest.approx(classes, abs=1e-9)
        expected_rbr = sum(weights.weights["comply"].get(f, 0.0) * v
                           for f, v in zip(spec.feature_names, x, strict=True))
        assert res["rbr_reward"] == pytest.approx(expected_rbr, abs=1e-9)
        assert res["reward"] == pytest.approx(0.5 + expected_rbr, abs=1e-9)
        assert res["rm_score"] == 0.5 and res["id"] == "one" and res["cached"] is False
        assert body["policy_version"] == policy.short_version and body["weights_version"] == weights.version


async def test_no_response_type_is_rm_only_and_not_graded(grader_engine):
    async with serve(grader_engine) as client:
        item = dict(ITEM, response_type=None, rm_score=-1.25)
        r = await client.post("/v1/rewards", json={"items": [item], "return_features": True})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["reward"] == -1.25 and res["rbr_reward"] == 0.0 and res["features"] is None
        assert metric(client, "rbr_judgments_total") == 0


async def test_second_identical_request_is_a_cache_hit_without_grading(grader_engine, redis_server):
    async with serve(grader_engine, redis_url=redis_server.url, redis_timeout_s=0.5) as client:
        item = dict(ITEM, completion="Wishing you a joyful birthday and a wonderful year ahead!")
        warmup = client.app.state.rbr.serving.grader.engine_requests
        first = await client.post("/v1/rewards", json={"items": [item]})
        judged = metric(client, "rbr_judgments_total")
        sent = client.app.state.rbr.serving.grader.engine_requests
        assert first.status_code == 200 and judged > 0 and sent - warmup == judged
        second = await client.post("/v1/rewards", json={"items": [item]})
        assert second.status_code == 200
        assert second.json()["results"][0]["cached"] is True
        assert second.json()["results"][0]["reward"] == first.json()["results"][0]["reward"]
        assert metric(client, "rbr_judgments_total") == judged
        assert client.app.state.rbr.serving.grader.engine_requests == sent  # the engine was not called again
        assert metric(client, "rbr_cache_requests_total", result="hit") == 1
        keys = redis_server.keys()
        assert keys and all(b"birthday" not in k for k in keys)


async def test_redis_outage_still_serves_then_recovers(grader_engine, redis_server):
    async with serve(grader_engine, redis_url=redis_server.url, redis_timeout_s=0.2, redis_breaker_s=0.3) as client:
        item = dict(ITEM, completion="Happy birthday! May all your wishes come true.")
        assert (await client.post("/v1/rewards", json={"items": [item]})).status_code == 200
        redis_server.stop()
        r = await client.post("/v1/rewards", json={"items": [item]})
        assert r.status_code == 200 and r.json()["results"][0]["cached"] is False
        assert metric(client, "rbr_cache_requests_total", result="error") >= 1
        redis_server.start()
        await asyncio.sleep(0.4)
        r = await client.post("/v1/rewards", json={"items": [item]})  # graded again, stored again
        assert r.status_code == 200
        r = await client.post("/v1/rewards", json={"items": [item]})
        assert r.json()["results"][0]["cached"] is True


async def test_openrlhf_contract(grader_engine):
    async with serve(grader_engine) as client:
        empty = await client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
        assert empty.status_code == 200
        eb = empty.json()
        assert eb["rewards"] == [] and eb["scores"] == [] and all(v == [] for v in eb["extra_logs"].values())
        prompt = "<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n"
        query = prompt + "Soft rain on the roof<|im_end|>"
        # OpenRLHF sends no RM score: without an RM engine or default, that is a 422 naming the query.
        r = await client.post("/get_reward", json={"query": [query], "prompts": [prompt], "labels": ["comply"]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "query[0].rm_score"
    async with serve(grader_engine, default_rm_score=0.0) as client:
        one = await client.post("/get_reward", json={"query": [query], "prompts": [prompt], "labels": ["comply"]})
        assert one.status_code == 200, one.text
        ob = one.json()
        assert set(ob) == {"rewards", "scores", "extra_logs"} and len(ob["rewards"]) == 1
        assert set(ob["extra_logs"]) == set(eb["extra_logs"])
        assert ob["rewards"][0] == ob["extra_logs"]["rbr_reward"][0]  # exact: rm_score 0.0 + rbr is rbr
        # The same completion through /v1/rewards gives the same reward (same split and cleaning).
        r = await client.post("/v1/rewards", json={"items": [{
            "prompt": [{"role": "user", "content": "Write a haiku about rain."}], "completion": "Soft rain on the roof",
            "response_type": "comply", "rm_score": 0.0}]})
        res = r.json()["results"][0]
        assert res["cached"] is True and res["reward"] == ob["rewards"][0]  # exact: the same cached features
        mixed = await client.post("/get_reward", json={"query": [query, query], "prompts": [prompt, prompt],
                                                       "labels": [None, "comply"]})
        mb = mixed.json()
        assert mb["rewards"][0] == 0.0 and mb["extra_logs"]["graded"] == [0.0, 1.0]
        bad = await client.post("/get_reward", json={"query": [query], "prompts": [prompt, prompt]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "prompts"
        bad = await client.post("/get_reward", json={"query": [query], "labels": ["sing"]})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "labels[0]"


async def test_auth_and_admin_separation(grader_engine):
    async with serve(grader_engine, api_keys="k1,k2", admin_key="adm") as client:
        body = {"items": [dict(ITEM, response_type=None)]}
        assert (await client.post("/v1/rewards", json=body)).status_code == 401
        r = await client.post("/v1/rewards", json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
        r = await client.post("/v1/rewards", json=body, headers={"Authorization": "Bearer k2"})
        assert r.status_code == 200
        r = await client.post("/v1/admin/reload", headers={"Authorization": "Bearer k1"})
        assert r.status_code == 403
        r = await client.post("/v1/admin/reload", headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200 and r.json()["generation"] == 2
        assert (await client.get("/healthz")).status_code == 200  # probes stay open


async def test_limits_and_validation_name_the_field(grader_engine):
    async with serve(grader_engine, max_items=3, max_chars=100) as client:
        many = {"items": [dict(ITEM, id=str(i)) for i in range(4)]}
        r = await client.post("/v1/rewards", json=many)
        assert r.status_code == 413 and r.json()["error"]["field"] == "items"
        r = await client.post("/v1/rewards", json={"items": [dict(ITEM, completion="x" * 101)]})
        assert r.status_code == 413 and r.json()["error"]["field"] == "items[0].completion"
        r = await client.post("/v1/rewards", json={"items": [dict(ITEM, response_type="dance")]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "items[0].response_type"
        r = await client.post("/v1/rewards", json={"items": [dict(ITEM, rm_score=None)]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "items[0].rm_score"
        r = await client.post("/v1/rewards", json={"items": [ITEM, ITEM]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "items[1].id"
        r = await client.post("/v1/rewards", content=b'{"items": [', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "body"
        r = await client.post("/v1/rewards", json={"items": [dict(ITEM, rm_score="high")]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "items[0].rm_score"
        nan_body = b'{"items": [{"prompt": "a", "completion": "b", "rm_score": NaN}]}'
        r = await client.post("/v1/rewards", content=nan_body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "rm_score" in r.json()["error"]["field"]
        assert metric(client, "rbr_judgments_total") == 0  # nothing invalid reached the engine


def test_retry_after_spreads_clients_over_the_time_the_work_in_flight_needs():
    import random

    from service.errors import Overloaded
    from service.metrics import Metrics
    from service.scoring import Admission

    now = [100.0]
    admission = Admission(100, Metrics(), retry_after_s=1, clock=lambda: now[0], rng=random.Random(0))

    def refused(judgments):
        with pytest.raises(Overloaded) as info, admission.admit(judgments):
            pass
        return int(info.value.headers["Retry-After"])

    with admission.admit(80):
        assert refused(40) == 1  # nothing has finished yet: no rate, the least wait
        for _ in range(10):  # beside it, 10 requests of 10 judgments finish over 10 s
            now[0] += 1.0
            with admission.admit(10):
                pass
        rate = 100 / 9.0  # 100 judgments since the first finished, 9 s ago
        assert admission.finished_per_s() == pytest.approx(rate)
        # between making room (20 over the bound: 1.8 s) and draining the 80 in flight (7.2 s), whole seconds
        waits = [refused(40) for _ in range(200)]
        assert set(waits) <= set(range(math.ceil(20 / rate), math.ceil(80 / rate) + 1))
        assert min(waits) <= 3 and max(waits) >= 7  # spread, not one value for everyone
        now[0] += 200.0  # the window forgets old work: no rate again
        assert refused(40) == 1
        with admission.admit(1):
            pass  # one judgment that finished at once counts over at least a second: 1/s, never a division by ~0
        assert admission.finished_per_s() == 1.0
        assert refused(100) == Admission.RETRY_AFTER_MAX_S  # 80 s at least at 1/s: capped at the most
        admission.retry_after_s = 90  # an operator's least wait above the cap is kept, not cut to the cap
        assert refused(100) == 90
        admission.retry_after_s = 1
    # the window is trimmed as work finishes, not only when something is refused: no growth without 429s
    for _ in range(1000):
        now[0] += 1.0
        with admission.admit(1):
            pass
    assert len(admission._finished) <= Admission.RATE_WINDOW_S + 1
    assert admission.finished_per_s() == pytest.approx(31 / 30.0)  # 31 finishes in the last 30 s


async def test_overload_gets_429_with_retry_after(grader_engine):
    policy = load_policy(None)
    per_item = len(policy.propositions_for("hard_refuse"))
    async with serve(grader_engine, max_inflight_judgments=per_item * 2) as client:
        def body(k):
            return {"items": [dict(ITEM, id=None, response_type="hard_refuse",
                                   completion=f"I can't help with request number {k}, sorry.")]}
        responses = await asyncio.gather(*[client.post("/v1/rewards", json=body(k)) for k in range(6)])
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        rejected = [r for r in responses if r.status_code == 429]
        assert all(r.headers.get("retry-after") for r in rejected)
        assert rejected[0].json()["error"]["type"] == "overloaded"
        too_big = {"items": [dict(ITEM, id=str(i), response_type="hard_refuse", completion=f"no {i}")
                             for i in range(3)]}
        r = await client.post("/v1/rewards", json=too_big)
        assert r.status_code == 413 and "RBR_MAX_INFLIGHT_JUDGMENTS" in r.json()["error"]["message"]
        assert metric(client, "rbr_inflight_judgments") == 0


async def test_deadline_gives_504(grader_engine):
    async with serve(grader_engine, request_timeout_s=0.001) as client:
        item = dict(ITEM, completion="A completely new birthday message that nobody has graded yet, 504.")
        r = await client.post("/v1/rewards", json={"items": [item]})
        assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"
        assert metric(client, "rbr_inflight_judgments") == 0


async def test_reload_swaps_weights_and_refuses_mismatched_ones(grader_engine, tmp_path):
    weights = Weights.load(default_weights_path())
    async with serve(grader_engine, admin_key="adm") as client:
        auth = {"Authorization": "Bearer adm"}
        before = (await client.post("/v1/rewards", json={"items": [ITEM]})).json()
        weights.weights["comply"]["class:ideal"] = 10.0
        new = weights.save(tmp_path / "w.json")
        r = await client.post("/v1/admin/reload", json={"weights_path": str(new)}, headers=auth)
        assert r.status_code == 200, r.text
        after = (await client.post("/v1/rewards", json={"items": [ITEM]})).json()
        assert after["weights_version"] != before["weights_version"]
        assert after["results"][0]["cached"] is True  # same policy and grader: features reused
        assert after["results"][0]["reward"] != pytest.approx(before["results"][0]["reward"])  # w(ideal) now 10
        wrong = Weights(policy_fingerprint="0" * 64, grader_id="x", weights={})
        r = await client.post("/v1/admin/reload", json={"weights_path": str(wrong.save(tmp_path / "bad.json"))},
                              headers=auth)
        assert r.status_code == 422 and r.json()["error"]["field"] == "weights_path"
        assert "fingerprint" in r.json()["error"]["message"]
        info = (await client.get("/v1/policy")).json()
        assert info["weights_version"] == after["weights_version"]  # the failed reload changed nothing


async def test_metrics_and_readiness(grader_engine):
    frozen_before = gc.get_freeze_count()  # earlier apps in this process froze their own startup objects
    async with serve(grader_engine) as client:
        assert (await client.get("/readyz")).status_code == 200
        # This app's startup froze what it made out of the collector's way (p99): the serving state it built just
        # before readiness is tracked by the collector yet in no generation it scans (gc.get_objects lists those).
        serving = client.app.state.rbr.serving
        assert gc.get_freeze_count() > frozen_before
        assert gc.is_tracked(serving) and not any(o is serving for o in gc.get_objects())
        await client.post("/v1/rewards", json={"items": [ITEM]})
        text = (await client.get("/metrics")).text
        for name in ("rbr_requests_total", "rbr_request_duration_seconds_bucket", "rbr_judgments_total",
                     "rbr_grading_batch_size_bucket", "rbr_reward_bucket", "rbr_inflight_judgments"):
            assert name in text, name
        assert 'route="/v1/rewards"' in text


async def test_concurrent_identical_items_are_graded_once(grader_engine):
    async with serve(grader_engine) as client:
        item = dict(ITEM, id=None, completion="Identical concurrent birthday wishes, graded only once please.")
        warmup = client.app.state.rbr.serving.grader.engine_requests
        rs = await asyncio.gather(*[client.post("/v1/rewards", json={"items": [item]}) for _ in range(4)])
        assert all(r.status_code == 200 for r in rs)
        rewards = {r.json()["results"][0]["reward"] for r in rs}
        assert len(rewards) == 1
        n_props = len(load_policy(None).propositions_for("comply"))
        sent = client.app.state.rbr.serving.grader.engine_requests - warmup
        assert sent == n_props, f"engine saw {sent} judgments for one unique item ({n_props} propositions)"



class GatedEngine(Engine):
    """The real shared engine behind a gate: `grade` waits until the test opens it, to hold work in flight.

    Only the timing is controlled; every judgment still comes from the real engine.
    """

    def __init__(self, inner: Engine):
        self.inner = inner
        self.model_id = inner.model_id
        self.gate = asyncio.Event()
        self.waiting = 0

    def __getattr__(self, name: str):  # tokenizer, yes/no ids, max_model_len ... for the grader's renderer
        return getattr(self.inner, name)

    async def grade(self, prompts):
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await self.inner.grade(prompts)

    async def generate(self, prompts, max_tokens=256, temperature=0.0, seed=None):
        return await self.inner.generate(prompts, max_tokens, temperature, seed)

    async def health(self):
        return await self.inner.health()

    async def close(self):
        pass  # the shared engine belongs to the test run


async def test_readyz_is_503_until_the_warmup_judgment_answers(grader_engine):
    gated = GatedEngine(grader_engine)
    app = create_app(Settings(), engine=gated)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
            await wait_for(lambda: gated.waiting >= 1)  # the warm-up judgment is at the engine, held
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready" and r.headers["retry-after"]
            r = await client.post("/v1/rewards", json={"items": [ITEM]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
            assert (await client.get("/healthz")).status_code == 200  # alive while starting
            gated.gate.set()
            await wait_for(lambda: app.state.rbr.ready)
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.post("/v1/rewards", json={"items": [ITEM]})).status_code == 200


async def test_reload_lets_in_flight_requests_finish_on_the_old_weights(grader_engine, tmp_path):
    gated = GatedEngine(grader_engine)
    gated.gate.set()
    old_weights = Weights.load(default_weights_path())
    new_weights = Weights.load(default_weights_path())
    new_weights.weights["comply"]["class:ideal"] = old_weights.weights["comply"].get("class:ideal", 0.0) + 10.0
    new_path = new_weights.save(tmp_path / "new.json")
    item = dict(ITEM, completion="A birthday note held in flight while the weights change underneath it.")
    body = {"items": [item], "return_features": True}
    app = create_app(Settings(admin_key="adm"), engine=gated)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: app.state.rbr.ready, timeout_s=120)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
            gated.gate.clear()
            in_flight = asyncio.create_task(client.post("/v1/rewards", json=body))
            await wait_for(lambda: gated.waiting > 0)  # its judgments are at the engine
            r = await client.post("/v1/admin/reload", json={"weights_path": str(new_path)},
                                  headers={"Authorization": "Bearer adm"})
            assert r.status_code == 200 and r.json()["generation"] == 2, r.text
            gated.gate.set()
            held = (await in_flight).json()
            after = (await client.post("/v1/rewards", json=body)).json()
    spec = FeatureSpec(load_policy(None), "comply")

    def rbr(weights: Weights, result: dict) -> float:
        x = spec.features(spec.matrix([result["features"]]))[0]
        return sum(weights.weights["comply"].get(f, 0.0) * v for f, v in zip(spec.feature_names, x, strict=True))

    assert held["weights_version"] == old_weights.version != new_weights.version == after["weights_version"]
    # float64 dot products summed in another order than the service's (~1e-14): 1e-9 is ample
    assert held["results"][0]["rbr_reward"] == pytest.approx(rbr(old_weights, held["results"][0]), abs=1e-9)
    assert after["results"][0]["cached"] is True and after["results"][0]["features"] == held["results"][0]["features"]
    assert after["results"][0]["rbr_reward"] == pytest.approx(rbr(new_weights, after["results"][0]), abs=1e-9)
    assert after["results"][0]["rbr_reward"] != pytest.approx(held["results"][0]["rbr_reward"])  # +10 x P(ideal)
