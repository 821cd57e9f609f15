"""Every HTTP request and response model of rbr-serve, in one place.

The OpenRLHF models mirror its remote reward-model contract exactly; ours live under `/v1`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator


class Schema(BaseModel):
    """Base for all schemas: unknown fields are an error, so a typo never passes silently.

    Strict types: a JSON number is not a boolean and a string is not a number (lax mode turned
    `"return_features": 0.0` into False; the API fuzzer found it). Integers still count as floats.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class Message(Schema):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


# The completion's message form as the schema states it: only the assistant's role is accepted. The route checks it
# (a 422 naming `items[i].completion.role`), so the check and its message stay the same; this tells clients first.
_COMPLETION_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "object", "title": "AssistantMessage", "additionalProperties": False, "required": ["role", "content"],
         "properties": {"role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"}}},
    ],
    "title": "Completion",
    "description": "The assistant reply being scored: text, or one message whose role is `assistant`.",
}


class RewardItem(Schema):
    prompt: str | Annotated[list[Message], Field(min_length=1)] = Field(
        description="The conversation before the completion: plain text (one user turn) or chat messages (at "
        "least one)."
    )
    completion: Annotated[str | Message, WithJsonSchema(_COMPLETION_SCHEMA)] = Field(
        description="The assistant reply being scored: text, or one message whose role is `assistant`."
    )
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

    @field_validator("prompt", mode="before")
    @classmethod
    def _non_empty_prompt(cls, v: Any) -> Any:
        """The schema's `minItems: 1`, checked before the union so the 422 names `prompt` in one plain line."""
        if isinstance(v, list) and not v:
            raise ValueError("must hold at least one message")
        return v


class RewardsRequest(Schema):
    items: list[RewardItem] = Field(description="Completions to score; at most RBR_MAX_ITEMS per request.")
    return_features: bool = Field(default=False, description="Include proposition and class probabilities.")


class RewardResult(Schema):
    id: str | None = Field(description="The item's id, as sent (null when it sent none).")
    reward: float = Field(description="rm_score + rbr_reward: the number to train on.")
    rbr_reward: float = Field(description="The rule-based part: the weights of the response type · features; 0 "
                              "when no response type applies.")
    rm_score: float = Field(description="The reward model's part: as sent, or from the RM engine or default.")
    response_type: str | None = Field(description="The policy's key for the item's response type (aliases "
                                      "resolved); null: RM score alone.")
    features: dict[str, float] | None = Field(
        default=None, description="P(yes) per proposition of the response type (with return_features).")
    classes: dict[str, float] | None = Field(
        default=None, description="Probability per completion class (with return_features).")
    cached: bool = Field(default=False, description="True when every probability came from the feature cache.")


class RewardsResponse(Schema):
    results: list[RewardResult] = Field(description="One result per item, in the request's order.")
    policy_version: str = Field(description="Short fingerprint of the policy that scored the request.")
    weights_version: str = Field(description="Version (hash) of the weights that scored the request.")


class OpenRLHFRequest(BaseModel):
    """OpenRLHF's remote RM call. Extra keys are ignored: trainers add their own."""

    model_config = ConfigDict(extra="ignore")
    query: list[str] = Field(description="Prompt + response strings, as the trainer decoded them.")
    prompts: list[str] | None = Field(
        default=None, description="The prompts alone, one per query: exactly as many as `query` (422 otherwise).")
    labels: list[str | None] | None = Field(
        default=None, description="Response type per query (null or empty: none applies): exactly as many as "
        "`query` (422 otherwise).")


class OpenRLHFResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class PolicyInfo(Schema):
    name: str = Field(description="The policy's name.")
    version: str = Field(description="Short policy fingerprint (as in every rewards response).")
    fingerprint: str = Field(description="Full policy fingerprint: versions every cached feature.")
    grader_fingerprint: str = Field(description="Grader model, prompts, scoring, calibration and heads, hashed.")
    weights_version: str = Field(description="Version (hash) of the weights in force.")
    weights_created_at: str = Field(description="When the weights were fitted (UTC, ISO 8601).")
    response_types: dict[str, dict[str, Any]] = Field(
        description="Per response type: aliases, propositions, classes and feature names.")
    class_order: list[str] = Field(description="Completion classes, best first.")


class ReloadRequest(Schema):
    policy_path: str | None = Field(default=None, description="New policy file; default: the configured one.")
    weights_path: str | None = Field(default=None, description="New weights file; default: the configured one.")
    heads_path: str | None = Field(default=None, description="New heads file (same trunk as the running one); "
                                   "default: the configured heads.")


class ReloadResponse(Schema):
    policy_version: str = Field(description="Short fingerprint of the policy now in force.")
    weights_version: str = Field(description="Version of the weights now in force.")
    generation: int = Field(description="Counts loads since start (1: the start's own).")


class ErrorBody(Schema):
    type: str = Field(description="Stable error type, e.g. invalid_request, overloaded, engine_unavailable.")
    message: str = Field(description="What went wrong, for people; never echoes a whole payload.")
    field: str | None = Field(default=None, description="The request field at fault, e.g. items[2].response_type.")


class ErrorResponse(Schema):
    error: ErrorBody
