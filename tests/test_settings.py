"""The service settings: environment names, bounds, and the reward-model engine's wiring (no engine needed)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from rbr_model.stack import StackSettings, build_rm
from service.settings import Settings


def settings_error(monkeypatch, **env: str) -> str:
    """Set `env` and return the validation error the settings raise."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as err:
        Settings()
    return str(err.value)


def test_grader_and_in_process_rm_must_fit_one_gpu(monkeypatch):
    err = settings_error(monkeypatch, RBR_RM_ENGINE="vllm", RBR_RM_MODEL="/models/rm",
                         RBR_RM_GPU_MEMORY_UTILIZATION="0.3")
    assert "RBR_GPU_MEMORY_UTILIZATION (0.85) + RBR_RM_GPU_MEMORY_UTILIZATION (0.3) exceed 1" in err
    monkeypatch.setenv("RBR_GPU_MEMORY_UTILIZATION", "0.6")
    # 0.6 + 0.3 is 0.8999999999999999 in float64: approx's default (relative 1e-6) absorbs the rounding
    assert Settings().gpu_memory_utilization + Settings().rm_gpu_memory_utilization == pytest.approx(0.9)
    monkeypatch.setenv("RBR_RM_ENGINE", "remote")  # a remote RM takes no memory here
    monkeypatch.setenv("RBR_RM_URL", "http://rm:8000")
    monkeypatch.setenv("RBR_RM_GPU_MEMORY_UTILIZATION", "0.9")
    assert Settings().rm_engine == "remote"


@pytest.mark.parametrize("field", ["gpu_memory_utilization", "rm_gpu_memory_utilization"])
@pytest.mark.parametrize("value", ["0", "1.5"])
def test_memory_fractions_are_bounded(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_a_negative_retry_after_is_refused_naming_it():
    with pytest.raises(ValidationError, match="retry_after_s"):
        Settings(retry_after_s=-1)


async def test_rm_settings_reach_the_remote_rm_engine(monkeypatch):
    monkeypatch.setenv("RBR_RM_API_KEY", "rm-secret")
    settings = Settings()
    assert "rm-secret" not in repr(settings)  # a secret, never printed
    seen = []

    def classify(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        data = [{"index": 0, "probs": [1.5], "num_classes": 1}]
        return httpx.Response(200, json={"object": "list", "model": "rm", "data": data})

    monkeypatch.setenv("RBR_RM_ENGINE", "remote")
    monkeypatch.setenv("RBR_RM_URL", "http://rm.test")
    monkeypatch.setenv("RBR_RM_MODEL", "rm")
    settings = Settings()
    assert "rm-secret" not in repr(settings.stack())
    engine = build_rm(settings.stack(), transport=httpx.MockTransport(classify))
    try:
        assert await engine.score([[{"role": "user", "content": "Hi"}]], ["Hello!"]) == [1.5]
    finally:
        await engine.close()
    assert seen == ["Bearer rm-secret"]
    assert Settings(rm_gpu_memory_utilization=0.2).stack().rm_gpu_memory_utilization == 0.2


def test_the_heads_engine_counts_in_the_gpu_share(monkeypatch):
    err = settings_error(monkeypatch, RBR_HEADS="auto",  # the serving default (the test run sets none)
                         RBR_GPU_MEMORY_UTILIZATION="0.9", RBR_HEADS_GPU_MEMORY_UTILIZATION="0.2")
    assert "RBR_GPU_MEMORY_UTILIZATION (0.9) + RBR_HEADS_GPU_MEMORY_UTILIZATION (0.2) exceed 1" in err
    monkeypatch.setenv("RBR_HEADS_GPU_MEMORY_UTILIZATION", "0.1")
    assert Settings().heads_gpu_memory_utilization == 0.1
    monkeypatch.setenv("RBR_RM_ENGINE", "vllm")  # three engines in process: 0.9 + 0.1 + 0.1
    monkeypatch.setenv("RBR_RM_MODEL", "/models/rm")
    with pytest.raises(ValidationError, match=r"\+ RBR_RM_GPU_MEMORY_UTILIZATION \(0.1\) exceed 1"):
        Settings()
    monkeypatch.setenv("RBR_GPU_MEMORY_UTILIZATION", "0.8")  # the defaults' sum, exactly 1 (float rounding aside)
    assert Settings().rm_engine == "vllm"
    # Heads that run no trunk here take no share: none, auto beside a custom grader (auto takes no heads there),
    # and any heads with a remote engine.
    monkeypatch.setenv("RBR_GPU_MEMORY_UTILIZATION", "0.85")
    monkeypatch.setenv("RBR_HEADS_GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("RBR_RM_ENGINE", "none")
    for env in ({"RBR_HEADS": "none"}, {"RBR_GRADER_MODEL": "/models/judge"}):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert Settings()
        for key in env:
            monkeypatch.delenv(key)
    monkeypatch.setenv("RBR_HEADS", "/heads.npz")
    with pytest.raises(ValidationError, match="RBR_HEADS_GPU_MEMORY_UTILIZATION"):
        Settings()


@pytest.mark.parametrize(("env", "named"), [
    ({"RBR_ENGINE": "remote"}, "RBR_REMOTE_URL is required with RBR_ENGINE=remote"),
    ({"RBR_ENGINE": "remote", "RBR_REMOTE_URL": "http://judge:8000", "RBR_HEADS": "/heads.npz"},
     "heads with RBR_ENGINE=remote need RBR_HEADS_URL and RBR_HEADS_TRUNK"),
    ({"RBR_RM_ENGINE": "remote"}, "RBR_RM_URL is required with RBR_RM_ENGINE=remote"),
])
def test_an_engine_without_its_address_fails_at_rbr_serve(monkeypatch, env, named):
    """Not as a 503 once the engines start in the background: `rbr serve` exits 2 naming the variable."""
    from typer.testing import CliRunner

    from rbr_model.cli import app

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=named):
        Settings()
    res = CliRunner().invoke(app, ["serve"])
    assert res.exit_code == 2 and named in res.output and "Traceback" not in res.output
    assert StackSettings(**{k.removeprefix("RBR_").lower(): v for k, v in env.items()}).problems()


def test_rbr_serve_names_bad_settings_by_their_variable(monkeypatch):
    from typer.testing import CliRunner

    from rbr_model.cli import app

    monkeypatch.setenv("RBR_GRADER_LAYOUT", "sideways")
    res = CliRunner().invoke(app, ["serve"])
    assert res.exit_code == 2 and "RBR_GRADER_LAYOUT: Input should be 'proposition_first'" in res.output
    assert "Traceback" not in res.output
    monkeypatch.delenv("RBR_GRADER_LAYOUT")
    monkeypatch.setenv("RBR_RM_ENGINE", "vllm")
    monkeypatch.setenv("RBR_RM_MODEL", "/models/rm")
    monkeypatch.setenv("RBR_RM_GPU_MEMORY_UTILIZATION", "0.5")
    res = CliRunner().invoke(app, ["serve"])
    assert res.exit_code == 2 and "RBR_RM_GPU_MEMORY_UTILIZATION (0.5) exceed 1" in res.output


def test_the_library_never_imports_the_service():
    """rbr_model is a pure library: the service plugs `rbr serve` in through an entry point instead."""
    import ast
    from pathlib import Path

    import rbr_model

    offenders = []
    for path in Path(rbr_model.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
                names = [getattr(node.args[0], "value", "")]
            offenders += [f"{path.name}: {n}" for n in names if n == "service" or str(n).startswith("service.")]
    assert not offenders, offenders


def test_weights_follow_the_rm_they_were_fitted_on():
    """The total must rank, so the packaged weights served beside the embedded RM are those fitted on its scores;
    any other RM (or none) gets the weights fitted with rm_score 0; a weights path always wins."""
    from rbr_model.reward import Weights, default_weights_path
    from service.state import served_caveats

    embedded = Settings(rm_engine="vllm")
    assert embedded.weights_file() == str(default_weights_path(embedded_rm=True))
    assert Settings().weights_file() == str(default_weights_path())
    assert Settings(rm_engine="vllm", rm_model="/models/rm").weights_file() == str(default_weights_path())
    assert Settings(rm_engine="vllm", weights_path="/w.json").weights_file() == "/w.json"
    # each packaged file says how it was fitted: with rm_score 0, or on an RM's scores
    assert Weights.load(default_weights_path()).metrics["settings"]["no_rm"] is True
    assert Weights.load(default_weights_path(embedded_rm=True)).metrics["settings"]["no_rm"] is False

    class Served:  # what served_caveats reads of the reward model
        weights = Weights.load(default_weights_path())

    other_rm = Settings(rm_engine="remote", rm_url="http://rm:8000", grader_model="/models/grader")
    assert any("fitted with rm_score 0" in c for c in served_caveats(other_rm, Served))
    assert not any("fitted with rm_score 0" in c for c in served_caveats(Settings(grader_model="/g"), Served))
