"""Start-up wiring: the builders (engines, heads, grader, RM, cache), the one typed state the routes read, its
lifecycle, and the readiness and liveness checks.

The app factory and the routes both import from here and nothing here imports them, so there is no cycle. The
engine warms up in the background, so `/healthz` answers at once and `/readyz` turns 200 only when the engine,
policy and weights are ready (Kubernetes readiness semantics).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rbr_model.grading.engine import Engine
from rbr_model.policy import Policy, load_policy
from rbr_model.reward import RewardModel, Weights, default_weights_path
from service.cache import FeatureCache, build_cache
from service.errors import ApiError, EngineUnavailable, NotReady
from service.metrics import Metrics
from service.scoring import Admission, Pipeline, ServingState
from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rbr_model.grading.grader import Grader
    from rbr_model.grading.states import StateEngine
    from rbr_model.heads import Heads
    from rbr_model.rm import RMEngine

log = logging.getLogger("rbr.app")

HONEST_STATUS = "README.md, section 'Honest status of the embedded grader'"
NEAR_CHANCE_PAIR_ACCURACY = 0.6  # weights whose every held-out pair accuracy is below this learned no ranking


# ---- the state -------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class AppState:
    """Everything the routes read, on `app.state.rbr`: set up by `create_app`, filled in by `running`."""

    settings: Settings
    metrics: Metrics
    reward_keys: list[str]
    admin_key: str | None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pipeline: Pipeline | None = None  # from the lifespan's start
    engine: Engine | None = None  # once built (in the background)
    state_engine: StateEngine | None = None  # the heads' trunk, when heads are served
    serving: ServingState | None = None  # once warm; replaced as a whole by a reload
    ready: bool = False
    engine_error: str | None = None  # why the engine failed to start
    engine_task: asyncio.Task[None] | None = None

    @classmethod
    def create(cls, settings: Settings, metrics: Metrics) -> AppState:
        return cls(settings, metrics, reward_keys=[k.get_secret_value() for k in settings.api_keys],
                   admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None)


def app_state(app: Any) -> AppState:
    """The typed state of an app made by `create_app` (routes: `app_state(request.app)`)."""
    return app.state.rbr


# ---- readiness and liveness --------------------------------------------------------------------------------------
def not_serving(state: AppState) -> ApiError | None:
    """Why requests cannot be scored now (the engine failed, or is still starting), or None."""
    if state.engine_error:
        return EngineUnavailable(f"grader engine unavailable: {state.engine_error}")
    if not state.ready or state.serving is None:
        return NotReady("the grader engine is still starting; retry shortly", headers={"Retry-After": "5"})
    return None


async def readiness(state: AppState) -> ApiError | None:
    """`not_serving`, then the engines' health checks (through the grader): None when ready to take work."""
    problem = not_serving(state)
    if problem is not None or state.serving is None:
        return problem
    unhealthy = await state.serving.grader.unhealthy()
    state.metrics.engine_up.set(0 if unhealthy else 1)
    return EngineUnavailable(f"the {unhealthy} does not answer health checks") if unhealthy else None


async def engine_gone(state: AppState) -> str | None:
    """Why the grader engine will never serve again in this process, or None.

    That is when it failed to start, or when an in-process vLLM engine fails its health check: vLLM's engine core
    does not come back once it has died, so only a restart of the process helps. A remote engine that stops
    answering may come back by itself: that is a readiness problem, not a liveness one.
    """
    if state.engine_error:
        return f"grader engine failed to start: {state.engine_error}"
    engine = state.engine
    if engine is None:
        return None  # still starting
    dead = getattr(engine, "dead", None)  # engines that can tell a permanent failure themselves
    if not isinstance(dead, bool):
        dead = state.settings.engine == "vllm" and not await engine.health()
    return "the in-process grader engine has died; restart the process" if dead else None


# ---- builders ----------------------------------------------------------------------------------------------------
def load_reward_model(policy_path: str | None, weights_path: str | None) -> RewardModel:
    policy = load_policy(policy_path)
    weights = Weights.load(weights_path or default_weights_path())
    return RewardModel(policy, weights)


def build_engine(settings: Settings) -> Engine:
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


def load_heads(settings: Settings, policy: Policy, heads_path: str | None = None) -> Heads | None:
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


def build_state_engine(settings: Settings, heads: Heads) -> StateEngine:
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
    from rbr_model.grading.vllm_engine import _on_gpu

    trunk = settings.heads_trunk or str(models.prepare_trunk(layer))
    return VLLMStateEngine(trunk, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                           enforce_eager=settings.enforce_eager,
                           gpu_memory_utilization=0.05 if _on_gpu() else None)


def build_grader(engine: Engine, model: RewardModel, settings: Settings, heads: Heads | None = None,
                 state_engine: StateEngine | None = None) -> Grader:
    from rbr_model.grading.grader import Grader

    calibration = None
    if settings.calibration_path:
        from rbr_model.calibration import Calibration

        calibration = Calibration.load(settings.calibration_path)
    return Grader(engine, model.policy, calibration=calibration, max_in_flight=settings.max_engine_requests,
                  layout=settings.grader_layout, heads=heads if state_engine is not None else None,
                  state_engine=state_engine)


def build_pipeline(settings: Settings, metrics: Metrics, cache: FeatureCache,
                   rm_engine: RMEngine | None = None) -> Pipeline:
    admission = Admission(settings.max_inflight_judgments, metrics, settings.retry_after_s)
    return Pipeline(cache, metrics, admission, rm_engine=rm_engine, default_rm_score=settings.default_rm_score)


def served_caveats(settings: Settings, model: RewardModel) -> list[str]:
    """What an operator should know is weak about what this process serves (the embedded grader, chance weights)."""
    caveats = []
    if settings.engine == "vllm" and not settings.grader_model:
        caveats.append("the grader is the embedded SmolLM2-135M, a demo-size model (its prompted propositions grade "
                       "at chance)")
    accuracies = [m.get("heldout_pair_accuracy") for m in
                  (model.weights.metrics.get("response_types") or {}).values() if isinstance(m, dict)]
    accuracies = [a for a in accuracies if isinstance(a, (int, float))]
    if accuracies and max(accuracies) < NEAR_CHANCE_PAIR_ACCURACY:
        caveats.append(f"the weights {model.weights.version} were fitted on near-random features (held-out pair "
                       f"accuracy at most {max(accuracies):.2f})")
    return caveats


def freeze_long_lived_objects() -> None:
    """Hide what startup loaded (vLLM, torch, tokenizer, policy: millions of objects) from the garbage collector.

    They live as long as the process, yet every full collection scanned them all: a pause of a few hundred ms
    that landed on whichever request was running (the cached p99). Objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()


# ---- lifecycle ---------------------------------------------------------------------------------------------------
@asynccontextmanager
async def running(app: FastAPI, engine: Engine | None = None, rm_engine: RMEngine | None = None,
                  state_engine: StateEngine | None = None) -> AsyncIterator[None]:
    """The lifespan: load policy, weights, heads and cache, start the engines in the background, always shut
    down what this process started. Engines passed in are shared (tests, embedding) and left running."""
    state = app_state(app)
    settings, metrics = state.settings, state.metrics
    model = load_reward_model(settings.policy_path, settings.weights_path)
    cache = build_cache(settings.redis_url, metrics, ttl_s=settings.cache_ttl_s, local_size=settings.local_cache_size,
                        timeout_s=settings.redis_timeout_s, breaker_s=settings.redis_breaker_s)
    state.pipeline = build_pipeline(settings, metrics, cache, rm_engine)
    heads = load_heads(settings, model.policy)  # a bad heads file stops the start, naming file and field
    state.engine_task = asyncio.create_task(_start_engines(state, engine, model, heads, state_engine))
    log.info("rbr-serve starting: policy %s, weights %s, cache %s, heads %s", model.policy.short_version,
             model.weights.version, cache.backend,
             f"{len(heads.propositions)} from {heads.source}" if heads is not None else "none")
    caveats = served_caveats(settings, model)
    if caveats:
        log.warning("serving for trials, not for training a policy: %s; read why in %s", "; ".join(caveats),
                    HONEST_STATUS)
    try:
        yield
    finally:
        state.ready = False
        metrics.ready.set(0)
        state.engine_task.cancel()
        await asyncio.gather(state.engine_task, return_exceptions=True)
        if engine is None and state.engine is not None:
            await state.engine.close()
        if state_engine is None and state.state_engine is not None:
            await state.state_engine.close()
        if rm_engine is None and state.pipeline.rm_engine is not None:
            await state.pipeline.rm_engine.close()
        await cache.close()


async def _start_engines(state: AppState, engine: Engine | None, model: RewardModel, heads: Heads | None,
                         state_engine: StateEngine | None) -> None:
    settings, metrics, pipeline = state.settings, state.metrics, state.pipeline
    assert pipeline is not None
    try:
        if engine is None:
            engine = await asyncio.to_thread(build_engine, settings)
            start = getattr(engine, "start", None)
            if start is not None:
                await start()
        state.engine = engine
        if heads is not None and state_engine is None:
            state_engine = await asyncio.to_thread(build_state_engine, settings, heads)
        state.state_engine = state_engine
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
        state.serving = ServingState(model, grader, generation=1)
        freeze_long_lived_objects()
        state.ready = True
        metrics.ready.set(1)
        metrics.engine_up.set(1)
        log.info("grader engine ready (%s)", getattr(engine, "model_id", type(engine).__name__))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported through /readyz and the log
        state.engine_error = f"{type(exc).__name__}: {exc}"
        metrics.engine_up.set(0)
        log.error("grader engine failed to start: %s", state.engine_error)
