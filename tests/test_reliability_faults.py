"""Fault injection: Redis killed and restarted under load, and each in-process engine (grader, heads' trunk, reward
model) whose engine-core process is killed.

All are real faults in real processes: a redis-server on loopback (tests/redis_server.py) and dedicated CPU vLLM
engines (the shared grader must stay alive for the other tests). Figures are reported like the rest of the
reliability harness (test_reliability.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from collections import Counter
from typing import Any

import psutil
import pytest
from helpers import CONV, app_on, asgi_client, metric, report, reward_item, unique
from redis_server import RedisServer
from rm_classifier import build_test_classifier
from tolerances import ENGINE_FP32_TOL

from rbr_model.policy import load_policy
from rbr_model.reward import Weights, default_weights_path

pytestmark = [pytest.mark.reliability, pytest.mark.engine]


# ---- Redis killed during load --------------------------------------------------------------------------------
@pytest.mark.redis
async def test_redis_killed_under_load_fails_no_request(grader_engine, request):
    redis = RedisServer().start()
    workers, kill_at, restart_at, max_s = 8, 3.0, 7.0, 120.0
    try:
        async with app_on(grader_engine, redis_url=redis.url, redis_timeout_s=0.25, redis_breaker_s=0.5,
                          default_rm_score=0.0) as app, asgi_client(app) as client:
            graded = {name: reward_item(prompt=CONV, completion=unique(text), response_type="comply", id=name)
                      for name, text in (("a", "Call it Rye Gosling."), ("b", "Name it Gluten Morgentag."))}
            plain = reward_item(completion="Any name will do.", id="c")
            reference = {}
            for name, item in graded.items():  # graded once, stored in Redis
                r = await client.post("/v1/rewards", json={"items": [item]})
                assert r.status_code == 200, r.text
                reference[name] = r.json()["results"][0]["reward"]
            bodies = [[graded["a"]], [graded["b"]], [graded["a"], graded["b"], plain], [plain]]
            codes: Counter[int] = Counter()
            drift = 0.0
            phase_hits: Counter[str] = Counter()
            start = time.monotonic()
            events: dict[str, float] = {}

            def phase(now: float) -> str:
                if "killed" not in events or now < events["killed"]:
                    return "before"
                if "restarted" not in events or now < events["restarted"]:
                    return "outage"
                return "after"

            async def worker(seed: int) -> None:
                nonlocal drift
                rng = random.Random(seed)
                while time.monotonic() - start < max_s:
                    if phase_hits["after"] >= 20 and time.monotonic() - start > restart_at + 2:
                        return
                    sent_at = time.monotonic()
                    r = await client.post("/v1/rewards", json={"items": rng.choice(bodies)})
                    codes[r.status_code] += 1
                    if r.status_code != 200:
                        continue
                    for res in r.json()["results"]:
                        if res["id"] in reference:
                            drift = max(drift, abs(res["reward"] - reference[res["id"]]))
                            if res["cached"]:
                                phase_hits[phase(sent_at)] += 1

            async def chaos() -> None:
                await asyncio.sleep(kill_at)
                redis.stop()  # SIGKILL: no goodbye to the clients
                events["killed"] = time.monotonic()
                await asyncio.sleep(restart_at - kill_at)
                redis.start()  # same port, empty: nothing was persisted
                events["restarted"] = time.monotonic()

            await asyncio.gather(chaos(), *[worker(i) for i in range(workers)])
            elapsed = time.monotonic() - start
            errors = {op: metric(app, "rbr_cache_errors_total", operation=op) for op in ("get", "set")}
            available = metric(app, "rbr_cache_available")
            keys_after = len(redis.keys())
    finally:
        redis.stop()
    report(request, workers=workers, requests=sum(codes.values()), statuses=json.dumps(dict(codes), sort_keys=True),
           seconds=round(elapsed, 1), redis_down_s=round(restart_at - kill_at, 1),
           cache_errors=json.dumps(errors, sort_keys=True), hits_before=phase_hits["before"],
           hits_during_outage=phase_hits["outage"], hits_after_restart=phase_hits["after"],
           max_reward_drift=f"{drift:.2e}", redis_keys_after=keys_after)
    assert set(codes) == {200}, codes
    assert errors["get"] >= 1, "the outage was never noticed"
    assert phase_hits["after"] > 0 and available == 1 and keys_after >= 2, "the cache did not resume"
    # A regrade after the outage runs in another batch/cache state: each P(yes) moves by <= ENGINE_FP32_TOL, and
    # classes are products of P's and (1 - P)'s (partial derivatives <= 1), so |delta reward| <= that x the number
    # of comply propositions x sum |w| (8 x 10.1 x 1e-4 = 8e-3 for the default weights).
    weights, policy = Weights.load(default_weights_path()), load_policy(None)
    bound = ENGINE_FP32_TOL * len(policy.propositions_for("comply")) * sum(map(abs, weights.weights["comply"].values()))
    assert drift < bound, f"a regraded reward differs from the first one by {drift:.2e} (float32 bound {bound:.1e})"


# ---- the grader engine dies ----------------------------------------------------------------------------------
def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _is_engine_core(proc: psutil.Process) -> bool:
    try:
        return "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


async def test_dead_engine_gives_503_never_a_reward(grader_model_path, request):
    from rbr_model.grading.vllm_engine import VLLMEngine

    before = _descendants()
    started = time.perf_counter()
    # Built on the main thread, as conftest.py builds the shared one (vLLM forks its engine core; forking from a
    # helper thread can hang the child). Built inside this running loop, vLLM binds its output handler to it, so
    # the engine is used from this loop only (the app below runs here too). Loading blocks the loop meanwhile.
    # Stats logging off: vLLM's Prometheus logger would unregister the shared engine's series.
    engine = VLLMEngine(grader_model_path, max_model_len=2048, engine_kwargs={"disable_log_stats": True})
    start_s = time.perf_counter() - started
    spawned = {pid: p for pid, p in _descendants().items() if pid not in before}
    cores = [p for p in spawned.values() if _is_engine_core(p)]
    codes: Counter[int] = Counter()
    try:
        assert len(cores) == 1, f"expected one new EngineCore process, found {[p.name() for p in spawned.values()]}"
        async with app_on(engine, default_rm_score=0.0) as app, asgi_client(app) as client:

            async def post(path: str, body: dict) -> Any:
                r = await client.post(path, json=body)
                codes[r.status_code] += 1
                return r

            known = reward_item(prompt=CONV, completion=unique("Call it Yeastie Boy."), response_type="comply", id="k")
            r = await post("/v1/rewards", {"items": [known]})
            assert r.status_code == 200, r.text
            known_reward = r.json()["results"][0]["reward"]
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200

            # A request in the middle of grading when the engine-core process is killed.
            busy = [reward_item(prompt=CONV, completion=unique(f"Maybe Proofessor {i}."), response_type="hard_refuse",
                          id=str(i)) for i in range(2)]
            in_flight = asyncio.create_task(post("/v1/rewards", {"items": busy}))
            deadline = time.monotonic() + 60
            while metric(app, "rbr_inflight_judgments") == 0:
                assert time.monotonic() < deadline and not in_flight.done(), "grading never started"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            cores[0].send_signal(signal.SIGKILL)
            killed_at = time.perf_counter()
            r = await asyncio.wait_for(in_flight, 60)
            in_flight_s = time.perf_counter() - killed_at
            assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable", r.text
            assert "results" not in r.json()

            # After it: new work fails loudly, on both routes and in parallel; no number is made up.
            fresh = [reward_item(prompt=CONV, completion=unique(f"Or Sir Loin {i}."), response_type="comply")
                     for i in range(4)]
            rs = await asyncio.gather(*[post("/v1/rewards", {"items": [it]}) for it in fresh])
            assert all(r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable" for r in rs), \
                [r.text[:200] for r in rs]
            prompt = f"<|im_start|>user\n{CONV[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
            r = await post("/get_reward", {"query": [prompt + unique("Crumb Cruise")], "prompts": [prompt],
                                           "labels": ["comply"]})
            assert r.status_code == 503 and "rewards" not in r.json(), r.text
            # What needs no grader still answers: cached features, and RM-only items.
            r = await post("/v1/rewards", {"items": [known, reward_item(rm_score=0.75, id="rm")]})
            assert r.status_code == 200, r.text
            by_id = {res["id"]: res for res in r.json()["results"]}
            assert by_id["k"]["cached"] and by_id["k"]["reward"] == known_reward  # exact: same features, same sums
            assert by_id["rm"]["reward"] == 0.75 and by_id["rm"]["response_type"] is None
            # Probes: not ready, and not alive either (an in-process engine does not come back: restart the pod).
            ready = await client.get("/readyz")
            alive = await client.get("/healthz")
            assert ready.status_code == 503 and ready.json()["error"]["type"] == "engine_unavailable", ready.text
            assert alive.status_code == 503 and alive.json()["error"]["type"] == "engine_unavailable", alive.text
            engine_up = metric(app, "rbr_engine_up")
            assert engine_up == 0
    finally:
        with contextlib.suppress(Exception):  # the engine is dead; closing it is best effort
            await asyncio.wait_for(engine.close(), 60)
        for proc in spawned.values():  # nothing of the dead engine outlives the test
            with contextlib.suppress(psutil.Error):
                proc.kill()
    report(request, engine_start_s=round(start_s, 1), requests=sum(codes.values()),
           statuses=json.dumps(dict(codes), sort_keys=True), in_flight_failed_after_s=round(in_flight_s, 2),
           readyz=ready.status_code, healthz=alive.status_code)


# ---- the heads' trunk engine or the reward-model engine dies ---------------------------------------------------
@contextlib.asynccontextmanager
async def _app_building_its_engines(grader_engine: Any, **settings: Any):
    """The app on the shared grader, building the other engines the settings ask for itself (as `rbr serve`
    does); yields the app, a client and the engine-core processes the app started. Nothing of them outlives it."""
    before = _descendants()
    cores: list[psutil.Process] = []
    try:
        async with app_on(grader_engine, **settings) as app, asgi_client(app) as client:
            cores += [p for pid, p in _descendants().items() if pid not in before and _is_engine_core(p)]
            yield app, client, cores
    finally:
        for proc in cores:  # the shared helpers (multiprocessing's resource tracker) stay for the other tests
            with contextlib.suppress(psutil.Error):
                proc.kill()


async def _liveness_after_kill(client: Any, core: psutil.Process) -> Any:
    """SIGKILL the engine core, then /healthz once it has noticed (vLLM's monitor thread marks the engine dead)."""
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    core.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (alive := await client.get("/healthz")).status_code == 200:
        assert time.monotonic() < deadline, "/healthz still 200 a minute after the engine core was killed"
        await asyncio.sleep(0.1)
    return alive


def _error(response: Any) -> dict:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "engine_unavailable", response.text
    return error


async def test_a_dead_heads_engine_fails_liveness_and_readiness_names_it(grader_engine, request):
    """The heads' trunk (in process, on by default) dies: /healthz 503 so Docker or Kubernetes restart the process,
    where before only /readyz said so, forever."""
    async with _app_building_its_engines(grader_engine, heads="auto", default_rm_score=0.0) as (app, client, cores):
        stack = app.state.rbr.stack
        assert stack.heads is not None and stack.state_engine in stack.owned, "the app built no heads engine"
        assert len(cores) == 1, cores
        item = reward_item(prompt=CONV, completion=unique("Call it Bread Pitt."), response_type="hard_refuse")
        assert (await client.post("/v1/rewards", json={"items": [item]})).status_code == 200
        alive = await _liveness_after_kill(client, cores[0])
        assert _error(alive)["message"] == "the heads engine has died; restart the process"
        assert _error(await client.get("/readyz"))["message"] == "the heads engine does not answer health checks"
        fresh = reward_item(prompt=CONV, completion=unique("Or Dough Jones."), response_type="hard_refuse")
        r = await client.post("/v1/rewards", json={"items": [fresh]})
        assert "results" not in r.json() and _error(r)
        assert await grader_engine.health(), "the grader engine beside it lives on"
    report(request, healthz=alive.status_code)


async def test_a_dead_reward_model_engine_fails_liveness_and_readiness_names_it(grader_engine, tmp_path, request):
    classifier = await asyncio.to_thread(build_test_classifier, tmp_path / "test-classifier")
    async with _app_building_its_engines(grader_engine, rm_engine="vllm", rm_model=str(classifier)) as (
            app, client, cores):
        assert app.state.rbr.stack.rm_engine in app.state.rbr.stack.owned, "the app built no RM engine"
        assert len(cores) == 1, cores
        rm_only = {"prompt": "hi", "completion": unique("hello")}  # no rm_score: the RM engine gives it
        r = await client.post("/v1/rewards", json={"items": [rm_only]})
        assert r.status_code == 200, r.text
        alive = await _liveness_after_kill(client, cores[0])
        assert _error(alive)["message"] == "the reward model engine has died; restart the process"
        assert _error(await client.get("/readyz"))["message"] == (
            "the reward model engine does not answer health checks")
        r = await client.post("/v1/rewards", json={"items": [{**rm_only, "completion": unique("hey")}]})
        assert "results" not in r.json() and _error(r)
        r = await client.post("/v1/rewards", json={"items": [reward_item(rm_score=0.5)]})  # needs no RM
        assert r.status_code == 200 and r.json()["results"][0]["reward"] == 0.5, r.text
    report(request, healthz=alive.status_code)
