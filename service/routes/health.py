"""Liveness, readiness, metrics and the policy in force."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from service.auth import require_reward_key
from service.errors import error_response
from service.protocol import ErrorResponse, PolicyInfo
from service.routes.common import serving_state

router = APIRouter(tags=["operations"])


async def engine_gone(app: Any) -> str | None:
    """Why the grader engine will never serve again in this process, or None.

    That is when it failed to start, or when an in-process vLLM engine fails its health check: vLLM's engine core
    does not come back once it has died, so only a restart of the process helps. A remote engine that stops
    answering may come back by itself: that is a readiness problem, not a liveness one.
    """
    state = app.state
    if state.engine_error:
        return f"grader engine failed to start: {state.engine_error}"
    engine = state.engine
    if engine is None:
        return None  # still starting
    dead = getattr(engine, "dead", None)  # engines that can tell a permanent failure themselves
    if not isinstance(dead, bool):
        health = getattr(engine, "health", None)
        dead = state.settings.engine == "vllm" and health is not None and not await health()
    return "the in-process grader engine has died; restart the process" if dead else None


@router.get("/healthz", response_model=dict[str, str], responses={503: {"model": ErrorResponse}})
async def healthz(request: Request) -> Any:
    """The process is alive (the engine may still be starting); 503 once the grader engine is gone for good."""
    reason = await engine_gone(request.app)
    if reason:
        request.app.state.metrics.engine_up.set(0)
        return error_response(503, "engine_unavailable", reason)
    return {"status": "ok"}


@router.get("/readyz", responses={200: {"content": {"application/json": {"example": {"status": "ready"}}}},
                                  503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """200 once the engine is warm and policy and weights are loaded; 503 before, or when the engine is down."""
    state = request.app.state
    if state.engine_error:
        return error_response(503, "engine_unavailable", f"grader engine unavailable: {state.engine_error}")
    if not state.ready or state.serving is None:
        return error_response(503, "not_ready", "grader engine is starting", headers={"Retry-After": "5"})
    engine = state.engine
    health = getattr(engine, "health", None)
    if health is not None and not await health():
        state.metrics.engine_up.set(0)
        return error_response(503, "engine_unavailable", "grader engine does not answer health checks")
    heads_engine = state.state_engine
    if heads_engine is not None and not await heads_engine.health():
        state.metrics.engine_up.set(0)
        return error_response(503, "engine_unavailable", "the heads' engine does not answer health checks")
    state.metrics.engine_up.set(1)
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = request.app.state
    if state.serving is not None:
        state.metrics.sync_grader(state.serving.grader)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/policy", response_model=PolicyInfo, dependencies=[Depends(require_reward_key)],
            responses={code: {"model": ErrorResponse} for code in (401, 403, 503)})
async def policy(request: Request) -> PolicyInfo:
    """The policy and weights in force: versions, response types with their propositions and classes."""
    s = serving_state(request)
    return PolicyInfo(
        name=s.policy.name,
        version=s.policy_version,
        fingerprint=s.policy.fingerprint,
        grader_fingerprint=s.grader.fingerprint,
        weights_version=s.weights_version,
        weights_created_at=s.model.weights.created_at,
        response_types={
            rt: {
                "aliases": list(s.policy.response_types[rt].aliases),
                "propositions": list(s.policy.propositions_for(rt)),
                "classes": list(s.policy.class_names(rt)),
                "features": list(s.model.features[rt].feature_names),
            }
            for rt in s.policy.classes
        },
        class_order=list(s.policy.class_order),
    )
