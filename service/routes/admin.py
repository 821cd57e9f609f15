"""`POST /v1/admin/reload`: a new policy or weights without a restart (admin key only)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace

from fastapi import APIRouter, Depends, Request

from rbr_model.policy import PolicyError
from rbr_model.reward import WeightsError
from rbr_model.stack import choose_heads
from service.auth import require_admin_key
from service.errors import InvalidRequest
from service.protocol import ErrorResponse, ReloadRequest, ReloadResponse
from service.routes.common import quote, serving_state
from service.scoring import ServingState
from service.state import app_state, load_reward_model

router = APIRouter(tags=["admin"])
log = logging.getLogger("rbr.admin")


@router.post("/v1/admin/reload", response_model=ReloadResponse, dependencies=[Depends(require_admin_key)],
             responses={code: {"model": ErrorResponse} for code in (401, 403, 422, 503)})
async def reload(request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load policy and weights again (or from new paths); requests in flight finish on the old ones."""
    from rbr_model.heads import HeadsError

    state = app_state(request.app)
    settings, metrics = state.settings, state.metrics
    body = body or ReloadRequest()
    async with state.reload_lock:
        old = serving_state(request)
        policy_path = body.policy_path or settings.policy_path
        weights_path = body.weights_path or settings.weights_file()
        for field, path in (("policy_path", body.policy_path), ("weights_path", body.weights_path),
                            ("heads_path", body.heads_path)):
            # Only regular files: a device (/dev/zero) or a FIFO would block or exhaust memory while loading.
            if path and not os.path.isfile(path):  # isfile is False for a NUL byte or a name too long, too
                metrics.reloads.labels("error").inc()
                raise InvalidRequest(f"{field}: {quote(path)} is not an existing regular file", field=field)
        try:
            model = await asyncio.to_thread(load_reward_model, policy_path, weights_path)
        except (PolicyError, WeightsError, OSError, ValueError) as exc:
            metrics.reloads.labels("error").inc()
            field = "weights_path" if isinstance(exc, WeightsError) else "policy_path"
            raise InvalidRequest(f"{field}: {str(exc)[:500]}", field=field) from None
        try:
            stack_settings = settings.stack()
            if body.heads_path:
                stack_settings = replace(stack_settings, heads=body.heads_path)
            heads = await asyncio.to_thread(choose_heads, stack_settings, model.policy)
            assert state.stack is not None  # serving_state above: the engines are warm
            if heads is not None and state.stack.state_engine is None:
                raise HeadsError(f"{heads.source}: this process runs no heads engine; restart it with RBR_HEADS set")
            grader = state.stack.grader_for(model.policy, heads)
        except (HeadsError, OSError, ValueError) as exc:
            metrics.reloads.labels("error").inc()
            raise InvalidRequest(f"heads_path: {str(exc)[:500]}", field="heads_path") from None
        state.serving = ServingState(model, grader, rm_engine=old.rm_engine, generation=old.generation + 1)
        metrics.reloads.labels("ok").inc()
        log.info("reloaded: policy %s, weights %s (generation %d)", model.policy.short_version,
                 model.weights.version, old.generation + 1)
        return ReloadResponse(policy_version=model.policy.short_version, weights_version=model.weights.version,
                              generation=old.generation + 1)
