"""The reward-model engines (rbr_model/rm.py).

Unit tests (no engine) cover the scoring rule, the factory and the remote engine's HTTP handling. The engine tests
run the real code paths on a TEST-ONLY classifier: the embedded grader model's weights with a random, seeded
one-label score head (`build_test_classifier`). Its scores mean nothing; they only have to agree:

- in-process `VLLMRMEngine` vs a plain transformers `AutoModelForSequenceClassification` forward pass on the same
  rendered text, and
- `RemoteRMEngine` against a real `python -m vllm.entrypoints.openai.api_server --runner pooling` subprocess vs
  both of those.

Everything runs in float32 (the checkpoint is bfloat16; upcasting is exact): the comparison is then about the
code path (chat rendering, last-token pooling, no activation on the head), not about bfloat16 rounding in two
different kernel libraries. Two float32 paths then add the same terms in another order: TOL follows from that
(tests/tolerances.py; observed: up to 6.3e-6 between vLLM and transformers on scores of magnitude < 1).

At most one engine runs at a time: the in-process engine is class-scoped and shut down before the server starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port
from rm_classifier import build_test_classifier
from tolerances import ENGINE_FP32_TOL

from rbr_model.rm import (
    RemoteRMEngine,
    RMError,
    VLLMRMEngine,
    build_rm_engine,
    rm_messages,
    score_from_logits,
)

TOL = ENGINE_FP32_TOL  # |score difference|: a logit (576-term dot product) summed in another fp32 order
DTYPE = "float32"
MAX_MODEL_LEN = 1024
READY_TIMEOUT_S = float(os.environ.get("RBR_TEST_READY_TIMEOUT_S", "180"))

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATIONS = [
    CAPITAL,
    CAPITAL,
    CAPITAL,
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Can you help me pick a lock?"},
        {"role": "assistant", "content": "Whose lock is it?"},
        {"role": "user", "content": "My neighbour's. He is away."},
    ],
]
COMPLETIONS = [
    "Paris is the capital of France.",
    "I don't know.",
    "Bananas!",
    "I can't help with getting into someone else's home without their permission.",
]

# Scores from the in-process engine, kept for the remote engine to compare against (filled by TestVLLMEngine).
INPROCESS_SCORES: list[float] = []


# ---- unit tests: no engine ----------------------------------------------------------------------------------


def test_score_rule_one_label_is_the_raw_logit():
    assert score_from_logits([3.7]) == 3.7
    assert score_from_logits([-12.0]) == -12.0  # unbounded: no sigmoid


def test_score_rule_many_labels_is_the_probability_of_the_last():  # float64 softmax: approx's default >> rounding
    assert score_from_logits([0.0, 0.0]) == pytest.approx(0.5)
    assert score_from_logits([1.0, 2.0, 3.0]) == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    assert score_from_logits([1000.0, 0.0]) == pytest.approx(0.0)  # stable for large logits


@pytest.mark.parametrize("bad", [[], [float("nan")], [1.0, float("inf")]])
def test_score_rule_rejects_bad_logits(bad):
    with pytest.raises(RMError):
        score_from_logits(bad)


def test_rm_messages_appends_the_completion_as_the_assistant_turn():
    msgs = rm_messages(CAPITAL, "Paris.")
    assert msgs == [*CAPITAL, {"role": "assistant", "content": "Paris."}]
    assert CAPITAL == [{"role": "user", "content": "What is the capital of France?"}]  # input untouched
    with pytest.raises(RMError):
        rm_messages([{"role": "user"}], "x")
    with pytest.raises(RMError):
        rm_messages(CAPITAL, None)  # type: ignore[arg-type]


async def test_build_rm_engine_kinds():
    assert build_rm_engine("none", None, None) is None
    with pytest.raises(ValueError, match="unknown rm engine"):
        build_rm_engine("openai", None, None)
    # ("vllm", None): the embedded helpful-only RM, served in tests/test_rm_embedded.py
    with pytest.raises(ValueError, match="base URL"):
        build_rm_engine("remote", None, None)
    # Settings meant for the other kind (max_model_len) are dropped, not passed on.
    eng = build_rm_engine("remote", "rm", "http://127.0.0.1:1/", max_model_len=2048, timeout=5.0)
    assert isinstance(eng, RemoteRMEngine)
    assert eng.model_id == "rm" and eng.base_url == "http://127.0.0.1:1"
    await eng.close()


def _mock(handler) -> RemoteRMEngine:
    return RemoteRMEngine("http://rm.test", model="rm", api_key="k", transport=httpx.MockTransport(handler))


def _classify_reply(*probs: float) -> httpx.Response:
    data = [{"index": 0, "label": None, "probs": list(probs), "num_classes": len(probs)}]
    return httpx.Response(200, json={"object": "list", "model": "rm", "data": data})


async def test_remote_engine_request_shape():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization"), json.loads(request.content)))
        body = seen[-1][2]
        return _classify_reply(float(len(body["messages"][-1]["content"])))

    eng = _mock(handler)
    assert await eng.score([CAPITAL, CAPITAL], ["ab", "abcd"]) == [2.0, 4.0]
    assert await eng.score([], []) == []
    await eng.close()
    path, auth, body = seen[0]
    assert path == "/classify" and auth == "Bearer k"
    assert body["model"] == "rm" and body["use_activation"] is False and body["add_generation_prompt"] is False
    assert body["messages"] == [*CAPITAL, {"role": "assistant", "content": "ab"}]


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(500, text="boom"),
        httpx.Response(404, json={"error": {"message": "The model `rm` does not exist."}}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"data": []}),
        httpx.Response(200, json={"data": [{"probs": []}]}),
        httpx.Response(200, content=b'{"data": [{"probs": [NaN]}]}'),  # Python's json reads NaN
        httpx.Response(200, json={"data": [{"probs": ["high"]}]}),
    ],
)
async def test_remote_engine_bad_replies_raise(reply):
    eng = _mock(lambda request: reply)
    with pytest.raises(RMError):
        await eng.score([CAPITAL], ["x"])
    await eng.close()


async def test_one_failure_fails_the_batch_and_cancels_the_rest():
    cancelled = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["messages"][-1]["content"] == "bad":
            return httpx.Response(400, json={"error": {"message": "too long"}})
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return _classify_reply(0.0)

    eng = _mock(handler)
    with pytest.raises(RMError, match="400"):
        await asyncio.wait_for(eng.score([CAPITAL] * 3, ["slow", "bad", "slow"]), 10)
    await asyncio.wait_for(cancelled.wait(), 5)
    await eng.close()


async def test_remote_engine_unreachable_and_closed():
    eng = RemoteRMEngine(f"http://127.0.0.1:{free_port()}", timeout=5.0)
    with pytest.raises(RMError):
        await eng.score([CAPITAL], ["x"])
    assert await eng.health() is False
    await eng.close()
    await eng.close()  # twice is fine
    with pytest.raises(RMError, match="closed"):
        await eng.score([CAPITAL], ["x"])


async def test_length_mismatch_raises():
    eng = _mock(lambda request: _classify_reply(0.0))
    with pytest.raises(RMError):
        await eng.score([CAPITAL, CAPITAL], ["x"])
    await eng.close()


# ---- shared fixtures for the engine tests --------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return build_test_classifier(tmp_path_factory.mktemp("rm") / "test-classifier", seed=0)


@pytest.fixture(scope="module")
def reference_scores(classifier_dir) -> list[float]:
    """Plain transformers: same rendering (chat template, no extra special tokens), one sequence at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for conv, completion in zip(CONVERSATIONS, COMPLETIONS, strict=True):
            messages = [*conv, {"role": "assistant", "content": completion}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            ids = tok.encode(text, add_special_tokens=False)
            out.append(float(model(torch.tensor([ids])).logits[0, 0]))
    del model
    gc.collect()
    return out


@pytest.mark.engine
def test_test_classifier_is_labelled_and_idempotent(classifier_dir):
    readme = (classifier_dir / "README.md").read_text()
    assert "TEST ONLY: random score head, not a reward model" in readme
    config = json.loads((classifier_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    stamp = (classifier_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert build_test_classifier(classifier_dir, seed=0) == classifier_dir
    assert (classifier_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten: no rebuild
    print(f"second build_test_classifier call: {time.monotonic() - t0:.2f} s")


@pytest.mark.engine
def test_reference_scores_are_raw_logits(reference_scores):
    assert all(math.isfinite(s) for s in reference_scores)
    assert len({round(s, 4) for s in reference_scores}) == len(reference_scores)


# ---- in-process engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
async def vllm_engine(classifier_dir):
    """One in-process engine for TestVLLMEngine, shut down when the class is done."""
    pytest.importorskip("vllm")
    # Built in a worker thread, the way the service builds it, with the service's default RM memory fraction
    # (RBR_RM_GPU_MEMORY_UTILIZATION), which the CPU build must accept.
    eng = await asyncio.to_thread(build_rm_engine, "vllm", str(classifier_dir), None,
                                  max_model_len=MAX_MODEL_LEN, dtype=DTYPE, gpu_memory_utilization=0.1)
    assert isinstance(eng, VLLMRMEngine)
    yield eng
    await eng.close()


@pytest.mark.engine
class TestVLLMEngine:
    async def test_scores_are_finite_deterministic_and_distinct(self, vllm_engine):
        first = await vllm_engine.score(CONVERSATIONS, COMPLETIONS)
        second = await vllm_engine.score(CONVERSATIONS, COMPLETIONS)
        assert len(first) == len(COMPLETIONS) and all(isinstance(s, float) and math.isfinite(s) for s in first)
        assert first == pytest.approx(second, abs=TOL)  # another batch: fp32 order (no batch-invariance promise)
        assert len({round(s, 4) for s in first}) == len(first), first
        INPROCESS_SCORES[:] = first
        assert await vllm_engine.health() is True
        assert await vllm_engine.score([], []) == []

    async def test_matches_transformers(self, vllm_engine, reference_scores):
        scores = await vllm_engine.score(CONVERSATIONS, COMPLETIONS)
        assert scores == pytest.approx(reference_scores, abs=TOL)

    async def test_concurrent_calls_agree_with_one_batch(self, vllm_engine, reference_scores):
        pairs = zip(CONVERSATIONS, COMPLETIONS, strict=True)
        singles = await asyncio.gather(*(vllm_engine.score([c], [r]) for c, r in pairs))
        assert [s[0] for s in singles] == pytest.approx(reference_scores, abs=TOL)

    async def test_bad_input_raises(self, vllm_engine):
        with pytest.raises(RMError):
            await vllm_engine.score([CAPITAL], ["a", "b"])
        with pytest.raises(RMError, match="max_model_len"):
            await vllm_engine.score([CAPITAL], ["word " * (2 * MAX_MODEL_LEN)])
        with pytest.raises(RMError):
            await vllm_engine.score([[{"role": "user"}]], ["x"])
        assert await vllm_engine.health() is True  # bad input does not hurt the engine

    async def test_closed_engine_raises(self, vllm_engine):  # last in the class: closes the shared engine
        await vllm_engine.close()
        assert await vllm_engine.health() is False
        with pytest.raises(RMError, match="closed"):
            await vllm_engine.score(CONVERSATIONS, COMPLETIONS)


# ---- remote engine against a real vLLM server ---------------------------------------------------------------


class _Server:
    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--runner", "pooling", "--dtype", DTYPE, "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
               "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(1.0)
        pytest.fail(f"the vLLM server was not healthy after {timeout_s:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="class")
def server(classifier_dir, tmp_path_factory):
    """One vLLM server for TestRemoteEngine, stopped when the class is done."""
    pytest.importorskip("vllm")
    srv = _Server(classifier_dir, tmp_path_factory.mktemp("rm-server") / "server.log")
    try:
        srv.wait_ready(READY_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def remote_engine(server):
    eng = build_rm_engine("remote", None, server.url, timeout=60.0)
    yield eng
    await eng.close()


@pytest.mark.engine
class TestRemoteEngine:
    async def test_same_scores_as_inprocess_and_transformers(self, remote_engine, reference_scores):
        assert await remote_engine.health() is True
        scores = await remote_engine.score(CONVERSATIONS, COMPLETIONS)
        assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
        assert scores == pytest.approx(reference_scores, abs=TOL)
        if INPROCESS_SCORES:  # filled when the in-process tests ran in this session
            assert scores == pytest.approx(INPROCESS_SCORES, abs=TOL)

    async def test_named_model(self, server, reference_scores):
        eng = RemoteRMEngine(server.url, model=server_model(server), timeout=60.0)
        try:
            assert await eng.score(CONVERSATIONS[:1], COMPLETIONS[:1]) == pytest.approx(reference_scores[:1], abs=TOL)
        finally:
            await eng.close()
        eng = RemoteRMEngine(server.url, model="no-such-model", timeout=60.0)
        try:
            with pytest.raises(RMError, match="404"):
                await eng.score(CONVERSATIONS[:1], COMPLETIONS[:1])
        finally:
            await eng.close()

    async def test_too_long_raises(self, remote_engine):
        with pytest.raises(RMError):
            await remote_engine.score([CAPITAL], ["word " * (2 * MAX_MODEL_LEN)])

    async def test_dead_server_raises(self, server, remote_engine):  # last in the class: stops the shared server
        server.stop()
        assert await remote_engine.health() is False
        with pytest.raises(RMError):
            await remote_engine.score(CONVERSATIONS, COMPLETIONS)


def server_model(server: _Server) -> str:
    """The model name the server serves (its --model path unless --served-model-name is given)."""
    return httpx.get(f"{server.url}/v1/models", timeout=10.0).json()["data"][0]["id"]
