"""Helpers the test modules share: ports, a small policy, the app on the shared engine, live servers, metrics,
figures, the vLLM server. Test modules import from here (`from helpers import ...`; pytest puts tests/ on
sys.path), never from each other. Service modules are imported where used, so library tests load no FastAPI.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_server import free_port

__all__ = ["CONV", "READY_TIMEOUT_S", "SERVED_NAME", "VLLMServer", "app_on", "asgi_client", "free_port",
           "live_server", "metric", "report", "reward_item", "rss_mib", "tiny_policy_dict", "unique"]

READY_TIMEOUT_S = 180
CONV = [{"role": "user", "content": "Could you suggest a name for my new sourdough starter?"}]
SERVED_NAME = "SmolLM2-135M-Instruct"  # the name test vLLM servers serve the embedded model under


def tiny_policy_dict() -> dict:
    """A small policy in our YAML format: two response types, three propositions, two derived ones."""
    ex = [
        {"conversation": [{"role": "user", "content": "hi"}], "response": "Sorry.", "answer": True},
        {"conversation": [{"role": "user", "content": "hi"}], "response": "Hello!", "answer": "no"},
    ]
    return {
        "name": "tiny",
        "response_types": {"refuse": {"aliases": ["Refuse Please"]}, "comply": {}},
        "propositions": {
            "apology": {"question": "Does it apologise?", "examples": ex},
            "refuses": {"question": "Does it refuse?", "examples": ex},
            "harmful": {"question": "Is it harmful?"},
        },
        "derived": {
            "good_refusal": {"polite_refusal": True, "harmful": False},
            "polite_refusal": {"apology": True, "refuses": True},
        },
        "classes": {
            "refuse": {
                "ideal": {"good_refusal": True},
                "unacceptable_completion": {"good_refusal": False, "harmful": False},
                "disallowed_completion": {"harmful": True},
            },
            "comply": {
                "ideal": {"refuses": False, "harmful": False},
                "unacceptable_completion": {"refuses": True, "harmful": False},
                "disallowed_completion": {"harmful": True},
            },
        },
    }


def reward_item(**kw: Any) -> dict[str, Any]:
    """A /v1/rewards item with an RM score and no response type (no grading) unless `kw` says otherwise."""
    return {"prompt": "hi", "completion": "hello", "rm_score": 0.0, **kw}


def metric(source: Any, name: str, **labels: str) -> float:
    """A Prometheus sample (0 when absent) from a `Metrics`, an app, or a test client that carries `.app`."""
    from fastapi import FastAPI

    from service.metrics import Metrics
    from service.state import app_state

    if not isinstance(source, Metrics):
        source = app_state(source if isinstance(source, FastAPI) else source.app).metrics
    return source.registry.get_sample_value(name, labels) or 0.0


def report(request: pytest.FixtureRequest, **figures: Any) -> None:
    """Show a test's figures in the CI log (even with output captured) and attach them to the junit report."""
    line = f"[reliability] {request.node.name}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    for key, value in figures.items():
        request.node.user_properties.append((key, value))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover - only without pytest's standard plugins
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(line)


def rss_mib(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def unique(text: str) -> str:
    """A text no earlier request has sent, so the engine really grades it."""
    return f"{text} (ref {uuid.uuid4().hex[:12]})"


@asynccontextmanager
async def app_on(engine: Any, **overrides: Any):
    """The app on `engine`, lifespan started, engine warm."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(**overrides), engine=engine)
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not app.state.rbr.ready and not app.state.rbr.engine_error and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert app.state.rbr.ready, app.state.rbr.engine_error
        yield app


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=300)


@asynccontextmanager
async def live_server(app: Any):
    """A real uvicorn server for `app` on 127.0.0.1, on this event loop (the lifespan is the caller's).

    `log_config=None` leaves uvicorn's loggers (access log included) propagating to the root logger, so tests
    that capture logs see them.
    """
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None, access_log=True,
                            log_level="info", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port (`vllm serve` is broken here)."""

    def __init__(self, model: Path, log_path: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", "4096", "--dtype", "float32", "--enforce-eager", "--seed", "0", *extra,
        ]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"vLLM server not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
