"""What the clients send and get: result types, the service's error, the retry policy, and payload shaping.

Standard library and httpx only, like the whole package.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
FAILOVER_STATUSES = frozenset({503})  # with several base URLs, these (and transport errors) move to the next one


def base_urls(base_url: str | Sequence[str]) -> list[str]:
    """One or several base URLs: a list, or a comma-separated string; trailing slashes dropped, order kept."""
    parts = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls = [str(u).strip().rstrip("/") for u in parts if str(u).strip()]
    if not urls:
        raise ValueError("base_url names no URL")
    return urls



@dataclass
class Item:
    """One completion to score. `prompt`: text or chat messages; `completion`: text or one assistant message."""

    prompt: str | Sequence[Mapping[str, Any]]
    completion: str | Mapping[str, Any]
    response_type: str | None = None
    rm_score: float | None = None
    id: str | None = None


@dataclass
class RewardResult:
    """One scored item: `reward = rm_score + rbr_reward`. `features`/`classes` only with `return_features`."""

    id: str | None
    reward: float
    rbr_reward: float
    rm_score: float
    response_type: str | None
    features: dict[str, float] | None = None
    classes: dict[str, float] | None = None
    cached: bool = False
    policy_version: str | None = None
    weights_version: str | None = None


@dataclass
class GetRewardResult:
    """The OpenRLHF `/get_reward` answer: `extra_logs` maps a name to one value per query."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = field(default_factory=dict)


class RewardServiceError(Exception):
    """The service refused or could not answer. `status` is None when no HTTP response came back."""

    def __init__(self, status: int | None, type: str, message: str, field: str | None = None,
                 retry_after: float | None = None, attempts: int = 1):
        self.status, self.type, self.message, self.field = status, type, message, field
        self.retry_after, self.attempts = retry_after, attempts
        where = f" (field: {field})" if field else ""
        super().__init__(f"{status if status is not None else 'no response'} {type}: {message}{where}")

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (Ray ships worker errors back)
        return (RewardServiceError, (self.status, self.type, self.message, self.field, self.retry_after,
                                     self.attempts))


# ---------------------------------------------------------------------------------------------------------------------
# Retry policy


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter backoff: uniform in [0, min(cap, base * 2**attempt)]; `attempt` counts from 0."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 62))
    return (rng or random).uniform(0.0, max(ceiling, 0.0))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date); None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _error_from_response(resp: httpx.Response) -> RewardServiceError:
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return RewardServiceError(resp.status_code, str(err.get("type") or "http_error"),
                                  str(err.get("message") or resp.reason_phrase), err.get("field"), retry_after)
    text = resp.text.strip()[:500] or resp.reason_phrase
    return RewardServiceError(resp.status_code, "http_error", text, None, retry_after)


def _transport_error(exc: Exception) -> RewardServiceError:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    return RewardServiceError(None, kind, f"{type(exc).__name__}: {exc}".rstrip(": "))


class _Retryable(Exception):
    def __init__(self, error: RewardServiceError):
        super().__init__(str(error))
        self.error = error


# ---------------------------------------------------------------------------------------------------------------------
# Payload shaping (shared by both clients and the adapters)


def _text(content: Any) -> str:
    """Message content as text: strings pass; multimodal part lists keep their text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text", ""))
    if isinstance(content, Iterable):
        parts = [p if isinstance(p, str) else p.get("text", "") for p in content
                 if isinstance(p, str) or (isinstance(p, Mapping) and p.get("type", "text") == "text")]
        return "".join(parts)
    return str(content)


def _message(m: Any) -> dict[str, str]:
    if not isinstance(m, Mapping):
        raise TypeError(f"a chat message must be a mapping with 'role' and 'content', not {type(m).__name__}")
    return {"role": str(m.get("role", "user")), "content": _text(m.get("content"))}


def _messages(seq: Any) -> list[dict[str, str]]:
    return [_message(m) for m in seq]


def _split(prompt: Any, completion: Any) -> tuple[str | list[dict[str, str]], str | dict[str, str]]:
    """Normalise to the wire shapes. A completion given as a list of messages (TRL's conversational form) is
    scored on its last message; any messages before it (tool calls and results) join the prompt."""
    p: str | list[dict[str, str]] = prompt if isinstance(prompt, str) else _messages(prompt)
    if isinstance(completion, str):
        return p, completion
    if isinstance(completion, Mapping):
        return p, _message(completion)
    turns = _messages(completion)
    if not turns:
        raise ValueError("completion holds no message")
    if len(turns) > 1:
        p = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + turns[:-1]
    return p, turns[-1]


def _opt_label(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v)
    return s if s.strip() else None


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _item_payload(item: Item | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, Item):
        raw: dict[str, Any] = {"prompt": item.prompt, "completion": item.completion,
                               "response_type": item.response_type, "rm_score": item.rm_score, "id": item.id}
    elif isinstance(item, Mapping):
        raw = dict(item)
    else:
        raise TypeError(f"an item is a dict or an Item, not {type(item).__name__}")
    if "prompt" in raw and "completion" in raw:
        raw["prompt"], raw["completion"] = _split(raw["prompt"], raw["completion"])
    if raw.get("rm_score") is not None:
        raw["rm_score"] = _opt_float(raw["rm_score"])
    # Unknown keys are kept so the server's strict validation names them (422) rather than dropping them silently.
    return {k: v for k, v in raw.items() if v is not None or k in ("prompt", "completion")}


def _chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _parse_results(data: Any, expected: int) -> list[RewardResult]:
    try:
        rows = data["results"]
        pv, wv = data.get("policy_version"), data.get("weights_version")
        out = [RewardResult(id=r.get("id"), reward=float(r["reward"]), rbr_reward=float(r["rbr_reward"]),
                            rm_score=float(r["rm_score"]), response_type=r.get("response_type"),
                            features=r.get("features"), classes=r.get("classes"), cached=bool(r.get("cached")),
                            policy_version=pv, weights_version=wv) for r in rows]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RewardServiceError(200, "protocol_error", f"unexpected /v1/rewards answer: {exc!r}") from None
    if len(out) != expected:
        raise RewardServiceError(200, "protocol_error", f"{len(out)} results for {expected} items")
    return out


def _get_reward_bodies(query: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[str | None] | None,
                       chunk_size: int) -> list[dict[str, Any]]:
    n = len(query)
    for name, values in (("prompts", prompts), ("labels", labels)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: {len(values)} entries for {n} queries")
    bodies = []
    for start in range(0, max(n, 1), chunk_size):
        end = min(start + chunk_size, n)
        body: dict[str, Any] = {"query": list(query[start:end])}
        if prompts is not None:
            body["prompts"] = list(prompts[start:end])
        if labels is not None:
            body["labels"] = list(labels[start:end])
        bodies.append(body)
    return bodies


def _merge_get_reward(parts: list[Any]) -> GetRewardResult:
    out = GetRewardResult([], [], {})
    for part in parts:
        out.rewards.extend(float(x) for x in part["rewards"])
        out.scores.extend(float(x) for x in part["scores"])
        for k, v in (part.get("extra_logs") or {}).items():
            out.extra_logs.setdefault(k, []).extend(v)
    return out


def _score_items(prompts: Sequence[Any], completions: Sequence[Any], response_types: Sequence[Any] | None,
                 rm_scores: Sequence[Any] | None) -> list[dict[str, Any]]:
    n = len(prompts)
    for name, values in (("completions", completions), ("response_types", response_types), ("rm_scores", rm_scores)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: {len(values)} entries for {n} prompts")
    return [_item_payload(Item(prompts[i], completions[i],
                               _opt_label(response_types[i]) if response_types is not None else None,
                               _opt_float(rm_scores[i]) if rm_scores is not None else None)) for i in range(n)]


