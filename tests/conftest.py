"""Fixtures shared by the whole test run, above all the one grader engine.

Starting vLLM on this CPU takes ~30 s and ~3.5 GiB, so one `VLLMEngine` (the real embedded model) serves every
test that asks for `grader_engine`. vLLM binds its output handler to the event loop of its first request, while
pytest-asyncio gives each test its own loop by default; so the engine lives on a private event loop in a
background thread, and tests get a thin proxy whose coroutines can be awaited from any loop. Cancelling an
awaiting test task cancels the engine request too.

Tests that use `grader_engine` are marked `engine` automatically (`-m "not engine"` skips them and never starts
vLLM). Tests marked `closes_engine` run after everything else, because they close the shared engine.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import reference  # tests/reference.py (pytest puts tests/ on sys.path, as for the test modules)
from redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The models setup.sh prepared (scripts/env.sh sets the same), not the per-user cache, when pytest runs bare.
os.environ.setdefault("RBR_MODELS_DIR", str(ROOT / "models"))

from rbr_model.grading.engine import Engine, GradingError, Judgment  # noqa: E402
from rbr_model.grading.vllm_engine import cpu_engine_env  # noqa: E402

T = TypeVar("T")

ENGINE_MAX_MODEL_LEN = 4096
ENGINE_DTYPE = "float32"


def _cpu_defaults() -> None:
    """The CPU engine's environment (as scripts/env.sh sets it), for runs that did not source env.sh."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # Apps and `rbr serve` subprocesses grade by prompt unless a test asks for heads (tests/test_heads_engine.py):
    # the serving default (packaged heads) would start a second vLLM engine in every app a test builds.
    os.environ.setdefault("RBR_HEADS", "none")
    cpu_engine_env()  # also for the vLLM server subprocesses some tests start


def pytest_configure(config: pytest.Config) -> None:
    _cpu_defaults()
    config.addinivalue_line("markers", "closes_engine: closes the shared grader engine, so it runs last")
    config.addinivalue_line("markers", reference.MARKER_HELP)


@pytest.hookimpl(tryfirst=True)  # before any fixture starts (a skipped test never starts the engine)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_reference") is not None:
        reference.require_reference()  # skips, or fails under CI=true, when ../shared/reference is absent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "grader_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
    items.sort(key=lambda it: it.get_closest_marker("closes_engine") is not None)  # stable: others keep order


class LoopThread:
    """An asyncio event loop running in a daemon thread; `call` runs a coroutine there and waits for it."""

    def __init__(self, name: str = "grader-engine-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` (run on this thread's loop) from any other event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()


class SharedEngine(Engine):
    """A proxy to an engine living on a `LoopThread`: every coroutine runs on the engine's own loop."""

    def __init__(self, inner: Engine, runner: LoopThread):
        self.inner = inner
        self.runner = runner
        self.model_id = inner.model_id

    def __getattr__(self, name: str) -> Any:  # tokenizer, yes_ids, no_ids, max_model_len, dtype ...
        return getattr(self.inner, name)

    async def grade(self, prompts: Sequence[str]) -> list[Judgment]:
        return await self.runner.run(self.inner.grade(list(prompts)))

    async def generate(
        self, prompts: Sequence[str], max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None
    ) -> list[str]:
        return await self.runner.run(self.inner.generate(list(prompts), max_tokens, temperature, seed))

    async def health(self) -> bool:
        return await self.runner.run(self.inner.health())

    async def gone(self) -> bool:
        return await self.runner.run(self.inner.gone())

    async def close(self) -> None:
        await self.runner.run(self.inner.close())


@pytest.fixture
def redis_server():
    """A fresh real redis-server on a free loopback port, stopped after the test."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def grader_model_path() -> Path:
    """The converted embedded model (converted on first use, ~30 s; then a no-op)."""
    from rbr_model import models

    try:
        return models.prepare()
    except models.ModelError as exc:
        pytest.fail(f"the embedded grader model is not available: {exc}")


@pytest.fixture(scope="session")
def grader_engine(grader_model_path: Path):
    """The real CPU vLLM engine on the embedded model, shared by the whole run (prefix caching on, float32).

    float32 on every machine: the engine's default is bfloat16 on CPUs with native bf16 (AVX512_BF16/AMX), where
    P(yes) moves by ~1e-2 against a float32 reference and the tolerances the tests derive from float32 arithmetic
    (tests/tolerances.py) would not hold. The checkpoint is bfloat16, so float32 holds its weights exactly.
    """
    from rbr_model.grading.vllm_engine import VLLMEngine

    # Built on this (the main) thread: vLLM forks its engine-core process, and forking from a helper thread
    # hung the child here. Construction binds nothing to a loop; the first request starts vLLM's output handler
    # on the loop thread, which then owns the engine.
    try:
        inner = VLLMEngine(grader_model_path, max_model_len=ENGINE_MAX_MODEL_LEN, enable_prefix_caching=True,
                           dtype=ENGINE_DTYPE)
    except GradingError as exc:
        pytest.fail(f"the grader engine did not start: {exc}")
    runner = LoopThread()
    engine = SharedEngine(inner, runner)
    yield engine
    try:
        runner.call(inner.close(), timeout=120)
    finally:
        runner.stop()
