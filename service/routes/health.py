"""Liveness, readiness, metrics and the policy in force."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from service.auth import require_reward_key
from service.errors import error_response
from service.protocol import ErrorResponse, PolicyInfo
from service.routes.common import serving_state
from service.state import app_state, engines_gone, readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=dict[str, str], responses={503: {"model": ErrorResponse}})
async def healthz(request: Request) -> Any:
    """The process is alive (the engines may still be starting); 503 once any in-process engine (grader, heads'
    trunk, reward model) is gone for good, or the engines failed to start: only a restart helps."""
    state = app_state(request.app)
    reason = await engines_gone(state)
    if reason:
        state.metrics.engine_up.set(0)
        return error_response(503, "engine_unavailable", reason)
    return {"status": "ok"}


@router.get("/readyz", responses={200: {"content": {"application/json": {"example": {"status": "ready"}}}},
                                  503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """200 once the engines are warm and policy and weights are loaded; 503 before, or naming the engine that is
    down."""
    problem = await readiness(app_state(request.app))
    if problem is not None:
        return error_response(problem.status, problem.type, problem.message, headers=problem.headers or None)
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = app_state(request.app)
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
