"""`POST /get_reward`: OpenRLHF's remote reward-model contract (`--remote_rm_url http://host:port/get_reward`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_reward_key
from service.chat_text import SplitError, clean, parse_conversation, split_query
from service.errors import InvalidRequest
from service.protocol import OpenRLHFRequest, OpenRLHFResponse
from service.routes.common import REWARD_ERRORS, check_count, check_text, guarded, response_type, serving_state
from service.scoring import ScoreItem
from service.state import app_state

router = APIRouter(tags=["openrlhf"])
BASE_LOGS = ("rbr_reward", "rm_score", "graded", "cached")


def _log_keys(class_order: tuple[str, ...]) -> list[str]:
    return list(BASE_LOGS) + [f"class_{c}" for c in class_order]


@router.post("/get_reward", response_model=OpenRLHFResponse, responses=REWARD_ERRORS,
             dependencies=[Depends(require_reward_key)])
async def get_reward(body: OpenRLHFRequest, request: Request) -> OpenRLHFResponse:
    """`labels` carries each sample's response type (null or "" for none); the same keys on every call."""
    app = app_state(request.app)
    settings = app.settings
    n = len(body.query)
    check_count(n, "query", settings.max_items)
    for name, values in (("prompts", body.prompts), ("labels", body.labels)):
        if values is not None and len(values) != n:
            raise InvalidRequest(f"{name}: {len(values)} entries for {n} queries", field=name)
    state = serving_state(request)
    keys = _log_keys(state.policy.class_order)
    if n == 0:
        return OpenRLHFResponse(rewards=[], scores=[], extra_logs={k: [] for k in keys})
    items = []
    for i, query in enumerate(body.query):
        check_text(query, f"query[{i}]", settings.max_chars)
        prompt = body.prompts[i] if body.prompts else None
        if prompt is not None:
            check_text(prompt, f"prompts[{i}]", settings.max_chars)
        try:
            prompt_part, completion = split_query(query, prompt)
        except SplitError as exc:
            raise InvalidRequest(f"query[{i}]: {exc}", field=f"query[{i}]") from None
        rt = response_type(state.policy, body.labels[i] if body.labels else None, f"labels[{i}]")
        items.append(ScoreItem(parse_conversation(prompt or prompt_part), clean(completion), rt, None))
    pipeline = app.pipeline
    assert pipeline is not None  # serving_state above: the lifespan has started
    pipeline.check_rm_available(state, items, field_prefix="query")
    app.metrics.request_items.observe(n)
    results = await guarded(request, pipeline.score(state, items, with_features=True, field="query"))
    logs: dict[str, list[float]] = {k: [] for k in keys}
    for r in results:
        logs["rbr_reward"].append(r.rbr_reward)
        logs["rm_score"].append(r.rm_score)
        logs["graded"].append(1.0 if r.response_type else 0.0)
        logs["cached"].append(1.0 if r.cached else 0.0)
        for c in state.policy.class_order:
            logs[f"class_{c}"].append(r.classes.get(c, 0.0))
    rewards = [r.reward for r in results]
    return OpenRLHFResponse(rewards=rewards, scores=list(rewards), extra_logs=logs)
