"""The service settings: environment names, bounds, and the reward-model engine's wiring (no engine needed)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from rbr_model.rm import build_rm_engine
from service.settings import Settings
from service.state import rm_engine_options


def test_grader_and_in_process_rm_must_fit_one_gpu(monkeypatch):
    monkeypatch.setenv("RBR_RM_ENGINE", "vllm")
    monkeypatch.setenv("RBR_RM_GPU_MEMORY_UTILIZATION", "0.3")
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "RBR_GPU_MEMORY_UTILIZATION (0.85) + RBR_RM_GPU_MEMORY_UTILIZATION (0.3) exceed 1" in str(err.value)
    monkeypatch.setenv("RBR_GPU_MEMORY_UTILIZATION", "0.6")
    # 0.6 + 0.3 is 0.8999999999999999 in float64: approx's default (relative 1e-6) absorbs the rounding
    assert Settings().gpu_memory_utilization + Settings().rm_gpu_memory_utilization == pytest.approx(0.9)
    monkeypatch.setenv("RBR_RM_ENGINE", "remote")  # a remote RM takes no memory here
    monkeypatch.setenv("RBR_RM_GPU_MEMORY_UTILIZATION", "0.9")
    assert Settings().rm_engine == "remote"


@pytest.mark.parametrize("field", ["gpu_memory_utilization", "rm_gpu_memory_utilization"])
@pytest.mark.parametrize("value", ["0", "1.5"])
def test_memory_fractions_are_bounded(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


async def test_rm_settings_reach_the_remote_rm_engine(monkeypatch):
    monkeypatch.setenv("RBR_RM_API_KEY", "rm-secret")
    settings = Settings()
    assert "rm-secret" not in repr(settings)  # a secret, never printed
    seen = []

    def classify(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        data = [{"index": 0, "probs": [1.5], "num_classes": 1}]
        return httpx.Response(200, json={"object": "list", "model": "rm", "data": data})

    engine = build_rm_engine("remote", "rm", "http://rm.test", **rm_engine_options(settings),
                             transport=httpx.MockTransport(classify))
    try:
        assert await engine.score([[{"role": "user", "content": "Hi"}]], ["Hello!"]) == [1.5]
    finally:
        await engine.close()
    assert seen == ["Bearer rm-secret"]
    assert rm_engine_options(Settings(rm_gpu_memory_utilization=0.2))["gpu_memory_utilization"] == 0.2


def test_rbr_serve_names_bad_settings_by_their_variable(monkeypatch):
    from typer.testing import CliRunner

    from rbr_model.cli import app

    monkeypatch.setenv("RBR_GRADER_LAYOUT", "sideways")
    res = CliRunner().invoke(app, ["serve"])
    assert res.exit_code == 2 and "RBR_GRADER_LAYOUT: Input should be 'proposition_first'" in res.output
    assert "Traceback" not in res.output
    monkeypatch.delenv("RBR_GRADER_LAYOUT")
    monkeypatch.setenv("RBR_RM_ENGINE", "vllm")
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
