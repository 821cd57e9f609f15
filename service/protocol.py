"""Every HTTP request and response model of rbr-serve, in one place.

The OpenRLHF models mirror its remote reward-model contract exactly; ours live under `/v1`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Schema(BaseModel):
    """Base for all schemas: unknown fields are an error, so a typo never passes silently.

    Strict types: a JSON number is not a boolean and a string is not a number (lax mode turned
    `"return_features": 0.0` into False; the API fuzzer found it). Integers still count as floats.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class Message(Schema):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class RewardItem(Schema):
    prompt: str | list[Message] = Field(
        description="The conversation before the completion: plain text (one user turn) or chat messages."
    )
    completion: str | Message = Field(description="The assistant reply being scored.")
    response_type: str | None = Field(
        default=None,
        description="How the policy says to respond (comply, hard_refuse, safe_refuse or an alias). "
        "null: no rule applies and the reward is the RM score alone.",
    )
    rm_score: float | None = Field(
        default=None, description="The reward model's score; null asks the configured RM engine or default."
    )
    id: Annotated[str, Field(max_length=256)] | None = Field(default=None, description="Echoed back in the result.")

    @field_validator("rm_score")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, v: str | list[Message]) -> str | list[Message]:
        if isinstance(v, list) and not v:
            raise ValueError("must hold at least one message")
        return v


class RewardsRequest(Schema):
    items: list[RewardItem] = Field(description="Completions to score; at most RBR_MAX_ITEMS per request.")
    return_features: bool = Field(default=False, description="Include proposition and class probabilities.")


class RewardResult(Schema):
    id: str | None
    reward: float = Field(description="rm_score + rbr_reward")
    rbr_reward: float
    rm_score: float
    response_type: str | None
    features: dict[str, float] | None = None
    classes: dict[str, float] | None = None
    cached: bool = False


class RewardsResponse(Schema):
    results: list[RewardResult]
    policy_version: str
    weights_version: str


class OpenRLHFRequest(BaseModel):
    """OpenRLHF's remote RM call. Extra keys are ignored: trainers add their own."""

    model_config = ConfigDict(extra="ignore")
    query: list[str] = Field(description="Prompt + response strings, as the trainer decoded them.")
    prompts: list[str] | None = Field(default=None, description="The prompts alone, one per query.")
    labels: list[str | None] | None = Field(default=None, description="Response type per query (or null).")


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class PolicyInfo(Schema):
    name: str
    version: str
    fingerprint: str
    grader_fingerprint: str
    weights_version: str
    weights_created_at: str
    response_types: dict[str, dict[str, Any]]
    class_order: list[str]


class ReloadRequest(Schema):
    policy_path: str | None = Field(default=None, description="New policy file; default: the configured one.")
    weights_path: str | None = Field(default=None, description="New weights file; default: the configured one.")
    heads_path: str | None = Field(default=None, description="New heads file (same trunk as the running one); "
                                   "default: the configured heads.")


class ReloadResponse(Schema):
    policy_version: str
    weights_version: str
    generation: int


class ErrorBody(Schema):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(Schema):
    error: ErrorBody
