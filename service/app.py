"""The app factory and its lifespan: engine, policy, weights and cache built on start, shut down on exit.

The engine warms up in the background so `/healthz` answers at once and `/readyz` turns 200 only when the
engine, policy and weights are ready (Kubernetes readiness semantics).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from rbr_model.policy import load_policy
from rbr_model.reward import RewardModel, Weights, default_weights_path
from service.cache import build_cache
from service.errors import error_response, install_error_handlers
from service.metrics import Metrics
from service.routes import admin, health, openrlhf, rewards
from service.scoring import Admission, Pipeline, ServingState
from service.settings import Settings

log = logging.getLogger("rbr.app")


def load_reward_model(policy_path: str | None, weights_path: str | None) -> RewardModel:
    policy = load_policy(policy_path)
    weights = Weights.load(weights_path or default_weights_path())
    return RewardModel(policy, weights)


def build_engine(settings: Settings) -> Any:
    """The grader engine the settings ask for (imported lazily: vLLM is heavy)."""
    from rbr_model.models import default_model_path

    if settings.engine == "remote":
        from rbr_model.grading.remote_engine import RemoteEngine

        if not settings.remote_url:
            raise ValueError("RBR_ENGINE=remote needs RBR_REMOTE_URL")
        key = settings.remote_api_key.get_secret_value() if settings.remote_api_key else None
        # The chat template comes from a local copy of the grader's tokenizer (same model as the server's).
        return RemoteEngine(settings.remote_url, model=settings.remote_model,
                            tokenizer=str(settings.grader_model or default_model_path()), api_key=key)
    from rbr_model.grading.vllm_engine import VLLMEngine

    return VLLMEngine(
        str(settings.grader_model or default_model_path()),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager,
        gpu_memory_utilization=settings.gpu_memory_utilization,
    )


def rm_engine_options(settings: Settings) -> dict[str, Any]:
    """Keyword settings for `build_rm_engine`; each RM engine kind keeps the ones it knows."""
    return {
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.rm_gpu_memory_utilization,
        "api_key": settings.rm_api_key.get_secret_value() if settings.rm_api_key else None,
    }


def load_heads(settings: Settings, policy: Any, heads_path: str | None = None) -> Any:
    """The heads to serve, or None. `auto` takes the packaged heads only where they fit (default policy and
    embedded grader) and quietly grades by prompt otherwise; an explicit file must fit or it is an error."""
    from rbr_model.heads import Heads, HeadsError, packaged_heads_path

    choice = heads_path or settings.heads
    if choice == "none":
        return None
    if choice == "auto":
        if settings.grader_model or settings.engine == "remote" or not packaged_heads_path().is_file():
            return None
        heads = Heads.load(packaged_heads_path())
        try:
            heads.check_policy(policy)
        except HeadsError:
            log.info("packaged heads are for the default policy; %s is graded by prompts only", policy.name)
            return None
        return heads
    heads = Heads.load(choice)
    heads.check_policy(policy)
    return heads


def build_state_engine(settings: Settings, heads: Any) -> Any:
    """The engine that runs the heads' trunk: vLLM's pooling runner in process, or a remote pooling server."""
    from rbr_model import models

    layer = int(heads.grader["layer"])
    if settings.engine == "remote":
        from rbr_model.grading.states import RemoteStateEngine

        if not settings.heads_url or not settings.heads_trunk:
            raise ValueError("heads with RBR_ENGINE=remote need RBR_HEADS_URL and RBR_HEADS_TRUNK (a local copy of "
                             "the served trunk); or set RBR_HEADS=none")
        key = settings.remote_api_key.get_secret_value() if settings.remote_api_key else None
        return RemoteStateEngine(settings.heads_url, settings.heads_trunk, api_key=key,
                                 max_model_len=settings.max_model_len)
    from rbr_model.grading.states import VLLMStateEngine

    trunk = settings.heads_trunk or str(models.prepare_trunk(layer))
    return VLLMStateEngine(trunk, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                           enforce_eager=settings.enforce_eager,
                           gpu_memory_utilization=0.05 if _on_gpu() else None)


def _on_gpu() -> bool:
    from rbr_model.grading.vllm_engine import _on_gpu as on_gpu

    return on_gpu()


def build_grader(engine: Any, model: RewardModel, settings: Settings, heads: Any = None,
                 state_engine: Any = None) -> Any:
    from rbr_model.grading.grader import Grader

    calibration = None
    if settings.calibration_path:
        from rbr_model.calibration import Calibration

        calibration = Calibration.load(settings.calibration_path)
    return Grader(engine, model.policy, calibration=calibration, max_in_flight=settings.max_inflight_judgments,
                  layout=settings.grader_layout, heads=heads if state_engine is not None else None,
                  state_engine=state_engine)


class ObserveMiddleware:
    """Per-route request counts and latency, and the body-size bound before anything parses the body.

    Plain ASGI (not BaseHTTPMiddleware) so client disconnects still reach the route.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        metrics: Metrics = state.metrics
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        limit = state.settings.max_body_bytes
        too_large = length.isdigit() and int(length) > limit
        if not length and b"chunked" in headers.get(b"transfer-encoding", b""):
            # No declared length: read the body here, at most `limit` bytes, then replay it to the app.
            receive, too_large = await _bounded_body(receive, limit)
        if too_large:
            metrics.errors.labels("payload_too_large").inc()
            size = f"body of {int(length)} bytes" if length.isdigit() else "chunked body"
            response = error_response(413, "payload_too_large", f"{size} exceeds RBR_MAX_BODY_BYTES={limit}", "body")
            await response(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            if route != "/metrics":
                metrics.requests.labels(route, str(status)).inc()
                metrics.request_duration.labels(route).observe(time.perf_counter() - start)


async def _bounded_body(receive: Any, limit: int) -> tuple[Any, bool]:
    """Buffer a request body of unknown length up to `limit` bytes: (a receive that replays it, too large?)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if size > limit:
            return receive, True
        if not message.get("more_body", False):
            break

    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return replay, False


def create_app(settings: Settings | None = None, engine: Any = None, rm_engine: Any = None,
               state_engine: Any = None) -> FastAPI:
    """Build the app. Pass `engine` (and `state_engine`, the heads' trunk) to share already-started engines
    (tests, embedding)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model = load_reward_model(settings.policy_path, settings.weights_path)
        cache = build_cache(settings.redis_url, metrics, ttl_s=settings.cache_ttl_s,
                            local_size=settings.local_cache_size, timeout_s=settings.redis_timeout_s,
                            breaker_s=settings.redis_breaker_s)
        app.state.cache = cache
        app.state.pipeline = Pipeline(cache, metrics, Admission(settings.max_inflight_judgments, metrics,
                                                               settings.retry_after_s),
                                      rm_engine=rm_engine, default_rm_score=settings.default_rm_score)
        app.state.model = model
        own_engine, own_rm = engine is None, rm_engine is None
        heads = load_heads(settings, model.policy)  # a bad heads file stops the start, naming file and field
        app.state.engine_task = asyncio.create_task(_start_engine(app, settings, engine, model, heads,
                                                                  state_engine))
        log.info("rbr-serve starting: policy %s, weights %s, cache %s, heads %s", model.policy.short_version,
                 model.weights.version, cache.backend,
                 f"{len(heads.propositions)} from {heads.source}" if heads is not None else "none")
        try:
            yield
        finally:
            app.state.ready = False
            metrics.ready.set(0)
            app.state.engine_task.cancel()
            await asyncio.gather(app.state.engine_task, return_exceptions=True)
            if own_engine and app.state.engine is not None:
                await app.state.engine.close()
            if state_engine is None and app.state.state_engine is not None:
                await app.state.state_engine.close()
            if own_rm and app.state.pipeline.rm_engine is not None:
                await app.state.pipeline.rm_engine.close()
            await cache.close()

    app = FastAPI(
        title="rbr-serve",
        version="0.1.0",
        description="Rule Based Rewards for RL fine-tuning: proposition grading through vLLM, cached features, "
        "combined RBR + RM rewards.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.serving = None
    app.state.engine = None
    app.state.state_engine = None
    app.state.ready = False
    app.state.engine_error = None
    app.state.reward_keys = [k.get_secret_value() for k in settings.api_keys]
    app.state.admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    app.state.reload_lock = asyncio.Lock()
    install_error_handlers(app, on_error=lambda t: metrics.errors.labels(t).inc())
    app.add_middleware(ObserveMiddleware)
    for module in (rewards, openrlhf, admin, health):
        app.include_router(module.router)
    return app


def freeze_long_lived_objects() -> None:
    """Hide what startup loaded (vLLM, torch, tokenizer, policy: millions of objects) from the garbage collector.

    They live as long as the process, yet every full collection scanned them all: a pause of a few hundred ms
    that landed on whichever request was running (the cached p99). Objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()


async def _start_engine(app: FastAPI, settings: Settings, engine: Any, model: RewardModel, heads: Any = None,
                        state_engine: Any = None) -> None:
    metrics: Metrics = app.state.metrics
    try:
        if engine is None:
            engine = await asyncio.to_thread(build_engine, settings)
            start = getattr(engine, "start", None)
            if start is not None:
                await start()
        app.state.engine = engine
        if heads is not None and state_engine is None:
            state_engine = await asyncio.to_thread(build_state_engine, settings, heads)
        app.state.state_engine = state_engine
        pipeline: Pipeline = app.state.pipeline
        if pipeline.rm_engine is None and settings.rm_engine != "none":
            from rbr_model.rm import build_rm_engine

            pipeline.rm_engine = await asyncio.to_thread(
                build_rm_engine, settings.rm_engine, settings.rm_model, settings.rm_url, **rm_engine_options(settings))
        grader = build_grader(engine, model, settings, heads, state_engine)
        # Warm up: one real judgment per method in use proves the engines answer before we call ourselves ready.
        warm = [next(iter(model.policy.propositions))]
        if heads is not None:
            warm += [heads.propositions[0]] + [n for n in model.policy.propositions if n not in heads][:1]
        await grader.grade([([{"role": "user", "content": "Hello"}], "Hi there!", list(dict.fromkeys(warm)))])
        app.state.serving = ServingState(model.policy, model, grader, generation=1)
        freeze_long_lived_objects()
        app.state.ready = True
        metrics.ready.set(1)
        metrics.engine_up.set(1)
        log.info("grader engine ready (%s)", getattr(engine, "model_id", type(engine).__name__))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported through /readyz and the log
        app.state.engine_error = f"{type(exc).__name__}: {exc}"
        metrics.engine_up.set(0)
        log.error("grader engine failed to start: %s", app.state.engine_error)
