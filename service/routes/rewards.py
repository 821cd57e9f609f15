"""`POST /v1/rewards`: our own reward API."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from rbr_model.policy import Policy
from service.auth import require_reward_key
from service.errors import InvalidRequest
from service.protocol import Message, RewardItem, RewardResult, RewardsRequest, RewardsResponse
from service.routes.common import REWARD_ERRORS, check_count, check_text, guarded, response_type, serving_state
from service.scoring import ScoreItem
from service.state import app_state

router = APIRouter(tags=["rewards"])


def to_score_items(items: list[RewardItem], policy: Policy, max_chars: int) -> list[ScoreItem]:
    """Validate what pydantic cannot (limits, response types, duplicate ids) and normalise shapes."""
    out, seen_ids = [], {}
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if isinstance(item.prompt, str):
            check_text(item.prompt, f"{where}.prompt", max_chars)
            conversation = [{"role": "user", "content": item.prompt}]
        else:
            for j, m in enumerate(item.prompt):
                check_text(m.content, f"{where}.prompt[{j}].content", max_chars)
            conversation = [{"role": m.role, "content": m.content} for m in item.prompt]
        if isinstance(item.completion, Message):
            if item.completion.role != "assistant":
                raise InvalidRequest(f"{where}.completion.role: must be 'assistant'", field=f"{where}.completion.role")
            completion = item.completion.content
        else:
            completion = item.completion
        check_text(completion, f"{where}.completion", max_chars)
        rt = response_type(policy, item.response_type, f"{where}.response_type")
        if item.id is not None:
            if item.id in seen_ids:
                raise InvalidRequest(f"{where}.id: duplicate of items[{seen_ids[item.id]}].id", field=f"{where}.id")
            seen_ids[item.id] = i
        out.append(ScoreItem(conversation, completion, rt, item.rm_score, item.id))
    return out


@router.post("/v1/rewards", response_model=RewardsResponse, responses=REWARD_ERRORS,
             dependencies=[Depends(require_reward_key)])
async def rewards(body: RewardsRequest, request: Request) -> RewardsResponse:
    """Score completions: `reward = rm_score + w[response_type] · features` per item."""
    app = app_state(request.app)
    settings = app.settings
    check_count(len(body.items), "items", settings.max_items)
    state = serving_state(request)
    items = to_score_items(body.items, state.policy, settings.max_chars)
    app.metrics.request_items.observe(len(items))
    assert app.pipeline is not None  # serving_state above: the lifespan has started
    results = await guarded(request, app.pipeline.score(state, items, with_features=body.return_features))
    return RewardsResponse(
        results=[
            RewardResult(
                id=r.id, reward=r.reward, rbr_reward=r.rbr_reward, rm_score=r.rm_score,
                response_type=r.response_type, cached=r.cached,
                features=r.features if body.return_features and r.response_type else None,
                classes=r.classes if body.return_features and r.response_type else None,
            )
            for r in results
        ],
        policy_version=state.policy_version,
        weights_version=state.weights_version,
    )
