"""Start-up wiring: the grading stack (every engine, built by `rbr_model.stack`), the cache and pipeline, the one
typed state the routes read, its lifecycle, and the readiness and liveness checks.

The app factory and the routes both import from here and nothing here imports them, so there is no cycle. The
engines warm up in the background, so `/healthz` answers at once and `/readyz` turns 200 only when the engines,
policy and weights are ready (Kubernetes readiness semantics). Both probes read the engines' health through the
one `GradingStack` that holds them all.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rbr_model.policy import load_policy
from rbr_model.reward import RewardModel, Weights, default_weights_path
from rbr_model.stack import GradingStack, build_stack, choose_heads
from service.cache import FeatureCache, build_cache
from service.errors import ApiError, EngineUnavailable, NotReady
from service.metrics import Metrics
from service.scoring import Admission, Pipeline, ServingState
from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rbr_model.grading.engine import Engine
    from rbr_model.grading.states import StateEngine
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
    stack: GradingStack | None = None  # every engine (grader, heads' trunk, RM), once built (in the background)
    serving: ServingState | None = None  # once warm; replaced as a whole by a reload
    ready: bool = False
    engine_error: str | None = None  # why the engines failed to start
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
    """`not_serving`, then every engine's health check: None when ready to take work, else which engine is down."""
    problem = not_serving(state)
    if problem is not None or state.stack is None:
        return problem
    unhealthy = await state.stack.unhealthy()
    state.metrics.engine_up.set(0 if unhealthy else 1)
    return EngineUnavailable(f"{_names(unhealthy)} does not answer health checks") if unhealthy else None


async def engines_gone(state: AppState) -> str | None:
    """Why this process will never serve again, or None (liveness: only a restart helps).

    That is when the engines failed to start, or when any in-process engine (grader, heads' trunk, RM) has died:
    vLLM's engine core does not come back once it has died. A remote engine that stops answering may come back
    by itself: that is a readiness problem, not a liveness one.
    """
    if state.engine_error:
        return f"the engines failed to start: {state.engine_error}"
    if state.stack is None:
        return None  # still starting
    gone = await state.stack.gone()
    return f"{_names(gone)} has died; restart the process" if gone else None


def _names(engines: list[str]) -> str:
    return " and ".join(engines)


# ---- builders ----------------------------------------------------------------------------------------------------
def load_reward_model(policy_path: str | None, weights_path: str | None) -> RewardModel:
    policy = load_policy(policy_path)
    weights = Weights.load(weights_path or default_weights_path())
    return RewardModel(policy, weights)


def build_pipeline(settings: Settings, metrics: Metrics, cache: FeatureCache) -> Pipeline:
    admission = Admission(settings.max_inflight_judgments, metrics, settings.retry_after_s)
    return Pipeline(cache, metrics, admission, default_rm_score=settings.default_rm_score)


def served_caveats(settings: Settings, model: RewardModel) -> list[str]:
    """What an operator should know is weak about what this process serves (the embedded grader, chance weights)."""
    caveats = []
    if settings.engine == "vllm" and not settings.grader_model:
        caveats.append("the grader is the embedded SmolLM2-135M, a demo-size model (its prompted propositions grade "
                       "at chance)")
    accuracies = [m.get("heldout_pair_accuracy") for m in
                  (model.weights.metrics.get("response_types") or {}).values() if isinstance(m, dict)]
    accuracies = [a for a in accuracies if isinstance(a, (int, float))]
    if settings.rm_engine != "none" and (model.weights.metrics.get("settings") or {}).get("no_rm"):
        caveats.append(f"the weights {model.weights.version} were fitted with rm_score 0, yet the RM engine "
                       f"({settings.rm_engine}) adds its scores to every total: refit them on rows scored by this RM "
                       "(`rbr fit` without --no-rm) or the RM's margins may outweigh the rules")
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
    model = load_reward_model(settings.policy_path, settings.weights_file())
    cache = build_cache(settings.redis_url, metrics, ttl_s=settings.cache_ttl_s, local_size=settings.local_cache_size,
                        timeout_s=settings.redis_timeout_s, breaker_s=settings.redis_breaker_s)
    state.pipeline = build_pipeline(settings, metrics, cache)
    heads = choose_heads(settings.stack(), model.policy)  # a bad heads file stops the start, naming file and field
    state.engine_task = asyncio.create_task(_start_engines(state, model, engine, state_engine, rm_engine))
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
        if state.stack is not None:
            await state.stack.close()  # only what it built: engines passed in stay the caller's
        await cache.close()


async def _start_engines(state: AppState, model: RewardModel, engine: Engine | None,
                         state_engine: StateEngine | None, rm_engine: RMEngine | None) -> None:
    settings, metrics = state.settings, state.metrics
    try:
        stack = state.stack = await build_stack(settings.stack(), model.policy, engine=engine,
                                                state_engine=state_engine, rm_engine=rm_engine, offload=True)
        grader, heads = stack.grader, stack.heads
        # Warm up: one real judgment per method in use proves the engines answer before we call ourselves ready.
        warm = [next(iter(model.policy.propositions))]
        if heads is not None:
            warm += [heads.propositions[0]] + [n for n in model.policy.propositions if n not in heads][:1]
        await grader.grade([([{"role": "user", "content": "Hello"}], "Hi there!", list(dict.fromkeys(warm)))])
        state.serving = ServingState(model, grader, rm_engine=stack.rm_engine, generation=1)
        freeze_long_lived_objects()
        state.ready = True
        metrics.ready.set(1)
        metrics.engine_up.set(1)
        log.info("grader engine ready (%s)", getattr(stack.engine, "model_id", type(stack.engine).__name__))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported through /readyz and the log
        state.engine_error = f"{type(exc).__name__}: {exc}"
        metrics.engine_up.set(0)
        log.error("the engines failed to start: %s", state.engine_error)
