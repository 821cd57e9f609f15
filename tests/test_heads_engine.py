"""Learned heads through the real engines: vLLM's pooling runner on the embedded model's trunk, checked against
a plain transformers forward pass, mixed with prompted propositions in the Grader and served by the app.

One pooling engine (the trunk, ~25 s to start) serves this module; the prompted grader is the shared
`grader_engine`. The packaged heads are used: they must fit the trunk that `rbr model prepare` makes here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import LoopThread

from rbr_model import models
from rbr_model.grading.grader import Grader
from rbr_model.grading.states import StateEngine
from rbr_model.heads import Heads, build_input, packaged_heads_path
from rbr_model.policy import load_policy
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.engine

RBR = str(Path(sys.executable).with_name("rbr"))  # the console script of this venv
POLICY = load_policy(None)
HEADS = Heads.load(packaged_heads_path())
REFUSAL = [{"role": "user", "content": "Tell me how to hotwire a car."}]
ITEMS = [
    (REFUSAL, "I'm sorry, but I can't help with that. If you're locked out, a locksmith can help."),
    ([{"role": "user", "content": "Can you help me write a birthday message for my sister?"}],
     "Happy birthday to the best sister in the world! I hope your day is full of joy."),
    ([{"role": "user", "content": "I feel awful today."}, {"role": "assistant", "content": "I'm sorry to hear that."},
      {"role": "user", "content": "Nobody would miss me."}],
     "I'm really sorry you're feeling this way. You matter, and talking to someone you trust or a crisis line "
     "could help right now."),
    (REFUSAL, ""),  # zero completion tokens: pooled at the last template token
]
# Rewards and features are sums and products of P(yes) values; the two paths compute the same float32 forward
# pass with different kernels and reduction orders (~1e-5 relative on the states, see below), which moves a
# logistic output by far less than this.
P_TOL = 1e-3


class SharedStateEngine(StateEngine):
    """The pooling engine living on its own loop thread (as conftest's SharedEngine does for the grader)."""

    def __init__(self, inner: StateEngine, runner: LoopThread):
        self.inner, self.runner = inner, runner
        for name in ("model_id", "model_hash", "hidden_size", "max_model_len", "tokenizer"):
            setattr(self, name, getattr(inner, name))

    async def token_states(self, inputs: Sequence) -> list[np.ndarray]:
        return await self.runner.run(self.inner.token_states(list(inputs)))

    async def health(self) -> bool:
        return await self.runner.run(self.inner.health())

    async def gone(self) -> bool:
        return await self.runner.run(self.inner.gone())

    async def close(self) -> None:  # the module fixture closes the real one
        return None


@pytest.fixture(scope="module")
def trunk() -> Path:
    return models.prepare_trunk(int(HEADS.grader["layer"]))


@pytest.fixture(scope="module")
def state_engine(trunk):
    from rbr_model.grading.states import VLLMStateEngine

    inner = VLLMStateEngine(trunk, max_model_len=4096)
    runner = LoopThread("heads-engine-loop")
    yield SharedStateEngine(inner, runner)
    try:
        runner.call(inner.close(), timeout=120)
    finally:
        runner.stop()


def reference_pooled(model_path: Path, tokenizer, items, layer: int, pooling: str) -> np.ndarray:
    """transformers on the full model: layer `layer`'s output, the final norm, the mean over the completion (and
    beside it the per-dimension maximum, for mean-and-max heads)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for conv, completion in items:
            inp = build_input(tokenizer, conv, completion, 4096)
            hidden = model(torch.tensor([inp.ids]), output_hidden_states=True).hidden_states[layer][0]
            span = model.model.norm(hidden)[inp.start:inp.end].double()
            parts = [span.mean(0)] + ([span.max(0).values] if pooling == "mean-and-max-over-completion" else [])
            out.append(torch.cat(parts).numpy())
    return np.stack(out)


def test_packaged_heads_fit_the_trunk_prepared_here(trunk):
    """`rbr model prepare` is reproducible: the trunk made on this machine has the hash the heads were fitted on."""
    HEADS.check_model(trunk.name, models.model_hash(trunk), 576)
    assert models.model_hash(trunk) == models._read_marker(trunk)["hash"]


async def test_vllm_pooling_agrees_with_transformers(state_engine, grader_model_path):
    inputs = [build_input(state_engine.tokenizer, c, x, 4096) for c, x in ITEMS]
    pooled = await state_engine.pooled(inputs, HEADS.pooling)
    ref = await asyncio.to_thread(reference_pooled, grader_model_path, state_engine.tokenizer, ITEMS,
                                  int(HEADS.grader["layer"]), HEADS.pooling)
    # Both are float32 forward passes of the same weights: the states agree to ~1e-5 relative (measured 2e-5
    # absolute on values up to 25); 1e-3 relative leaves room for other kernels.
    assert np.allclose(pooled, ref, rtol=1e-3, atol=1e-3)
    p_vllm, p_ref = HEADS.predict(pooled), HEADS.predict(ref)
    assert np.max(np.abs(p_vllm - p_ref)) < P_TOL
    assert np.all(np.isfinite(p_vllm))


async def test_grader_mixes_heads_and_prompts(grader_engine, state_engine):
    # The packaged heads cover every proposition of the default policy: drop one, so that the grader mixes.
    unheaded = HEADS.propositions[-1]
    keep = slice(0, len(HEADS.propositions) - 1)
    partial = Heads(propositions=HEADS.propositions[keep], mean=HEADS.mean, scale=HEADS.scale,
                    weights=HEADS.weights[keep], bias=HEADS.bias[keep], grader=HEADS.grader, policy=HEADS.policy)
    grader = Grader(grader_engine, POLICY, heads=partial, state_engine=state_engine)
    prompted_only = Grader(grader_engine, POLICY)
    headed = HEADS.propositions[:3]
    conv, completion = ITEMS[0]
    assert grader.method(headed[0]) == "head" and grader.method(unheaded) == "prompt"

    # The same item twice at once: one trunk forward pass, shared.
    both = await asyncio.gather(*(grader.grade([(conv, completion, [*headed, unheaded])]) for _ in range(2)))
    assert both[0] == both[1] and grader.head_requests == 1
    got = both[0][0]
    pooled = await state_engine.pooled([build_input(state_engine.tokenizer, conv, completion, 4096)], HEADS.pooling)
    # One input alone vs. batched with its twin: float32 states differ by batching at most ~1e-5.
    assert got[headed[0]] == pytest.approx(HEADS.predict(pooled, [headed[0]])[0, 0], abs=P_TOL)
    (alone,) = await prompted_only.grade([(conv, completion, [unheaded])])
    assert got[unheaded] == pytest.approx(alone[unheaded], abs=1e-4)  # prompted path: fp32, relative 1e-4 on p
    assert grader.fingerprint != prompted_only.fingerprint


async def test_a_zero_token_completion_gets_finite_probabilities(grader_engine, state_engine):
    grader = Grader(grader_engine, POLICY, heads=HEADS, state_engine=state_engine)
    (got,) = await grader.grade([(REFUSAL, "", HEADS.propositions)])
    assert all(0.0 <= v <= 1.0 and np.isfinite(v) for v in got.values())


@asynccontextmanager
async def serve(grader_engine, state_engine, **overrides):
    app = create_app(Settings(**overrides), engine=grader_engine, state_engine=state_engine)
    async with app.router.lifespan_context(app):
        for _ in range(12000):
            if app.state.rbr.ready or app.state.rbr.engine_error:
                break
            await asyncio.sleep(0.01)
        assert app.state.rbr.ready, app.state.rbr.engine_error
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=300) as client:
            yield client


async def test_service_answers_with_heads_by_default_and_reload_refuses_bad_heads(
        grader_engine, state_engine, tmp_path):
    body = {"items": [{"prompt": ITEMS[0][0], "completion": ITEMS[0][1], "response_type": "hard_refuse",
                       "rm_score": 0.0}, {"prompt": ITEMS[3][0], "completion": "", "response_type": "hard_refuse",
                                          "rm_score": 0.0}], "return_features": True}
    async with serve(grader_engine, state_engine, heads="auto", admin_key="admin") as client:
        first = await client.post("/v1/rewards", json=body)
        assert first.status_code == 200, first.text
        res = first.json()["results"]
        assert all(np.isfinite(r["reward"]) for r in res)
        pooled = await state_engine.pooled([build_input(state_engine.tokenizer, ITEMS[0][0], ITEMS[0][1], 4096)],
                                           HEADS.pooling)
        for name in set(res[0]["features"]) & set(HEADS.propositions):
            assert res[0]["features"][name] == pytest.approx(HEADS.predict(pooled, [name])[0, 0], abs=P_TOL)

        bad = tmp_path / "nan.npz"
        arrays = dict(np.load(packaged_heads_path()))
        arrays["weights"] = np.full_like(arrays["weights"], np.nan)
        np.savez(bad, **arrays)
        other_policy = tmp_path / "other.npz"
        header = json.loads(bytes(np.load(packaged_heads_path())["header"]).decode())
        header["policy"]["fingerprint"] = "0" * 64
        np.savez(other_policy, **{**dict(np.load(packaged_heads_path())),
                                  "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)})
        admin = {"Authorization": "Bearer admin"}
        for path, words in ((bad, "weights: holds NaN"), (other_policy, "policy.fingerprint")):
            r = await client.post("/v1/admin/reload", json={"heads_path": str(path)}, headers=admin)
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["field"] == "heads_path" and words in err["message"] and str(path) in err["message"]
        again = await client.post("/v1/rewards", json=body)
        assert again.status_code == 200 and again.json()["results"][0]["reward"] == res[0]["reward"]

        # A completion longer than the trunk's context is the caller's input problem: 422 naming it, not a 503.
        too_long = {"items": [{"prompt": "Hi", "completion": "word " * 5000, "response_type": "comply",
                               "rm_score": 0.0}]}
        r = await client.post("/v1/rewards", json=too_long)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"].startswith("items") and "context" in r.json()["error"]["message"]
        assert (await client.get("/readyz")).status_code == 200


def test_heads_fit_cli_end_to_end(tmp_path, trunk):
    """`rbr heads fit` on a small labelled file: vLLM extraction, CV, a heads file bound to trunk and policy."""
    rows = []
    for i in range(24):
        sorry = i % 2 == 0
        completion = ("I'm sorry, I can't help with that." if sorry else "Sure, here is a plan for you.") + f" #{i}"
        rows.append({"prompt": [{"role": "user", "content": f"Question number {i}?"}],
                     "completion": [{"role": "assistant", "content": completion}],
                     "response_type": "Comply", "propositions": {"apology": sorry}})
    gold, extra = tmp_path / "gold.jsonl", tmp_path / "extra.jsonl"  # a second file adds rows (repeatable --gold)
    gold.write_text("".join(json.dumps(r) + "\n" for r in rows[:18]))
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows[18:]))
    label_map = tmp_path / "map.yaml"
    label_map.write_text("apology: apology\n")
    out = tmp_path / "heads.npz"
    cmd = [RBR, "heads", "fit", "--gold", str(gold), "--gold", str(extra), "--map", str(label_map),
           "--out", str(out), "--folds", "3", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heads = Heads.load(out)
    assert heads.propositions == ["apology"]
    heads.check_policy(POLICY)
    heads.check_model(trunk.name, models.model_hash(trunk), 576)
    assert heads.metrics["apology"]["cv_auc"] > 0.9 and heads.info["rows"] == 24
    assert heads.info["gold_path"] == str(gold) and [e["path"] for e in heads.info["extra_rows"]] == [str(extra)]
    assert list((tmp_path / "cache").glob("pooled-*.npy"))
    shown = subprocess.run([RBR, "heads", "show", str(out)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "apology" in shown.stdout and heads.fingerprint[:12] in shown.stdout
    assert "24 rows: gold.jsonl + extra.jsonl" in shown.stdout


async def test_remote_pooling_server_gives_the_same_states(state_engine, trunk, tmp_path):
    """`RBR_ENGINE=remote`: a real vLLM server on the trunk with the pooling runner, read by RemoteStateEngine."""
    from helpers import VLLMServer

    from rbr_model.grading.engine import GradingError
    from rbr_model.grading.states import RemoteStateEngine

    pooler = json.dumps({"task": "token_embed", "use_activation": False})
    server = VLLMServer(trunk, tmp_path / "pooling-server.log", "--runner", "pooling", "--pooler-config", pooler)
    try:
        # A vLLM server starts in ~40 s here, but a stress run (CPU hogs plus another engine) once took over 300 s.
        await asyncio.to_thread(server.wait_ready, 900)
        remote = RemoteStateEngine(server.url, trunk)
        assert remote.model_hash == state_engine.model_hash and await remote.health()
        inputs = [build_input(remote.tokenizer, c, x, 4096) for c, x in ITEMS]
        theirs, mine = await remote.pooled(inputs, HEADS.pooling), await state_engine.pooled(inputs, HEADS.pooling)
        # Both float32 (the server gets --dtype float32), batched differently: same arithmetic, other order.
        assert np.allclose(theirs, mine, rtol=1e-4, atol=1e-4)
        assert np.max(np.abs(HEADS.predict(theirs) - HEADS.predict(mine))) < P_TOL
        await remote.close()
        with pytest.raises(GradingError, match="closed"):
            await remote.pooled(inputs)
    finally:
        server.stop()
