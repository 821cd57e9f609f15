"""What a head reads: the grader's chat template over the conversation, then the completion's own tokens.

The sequence is `template(conversation, generation prompt) + tokens(completion)`, built from two token lists
rather than one rendered string, so the completion's span is known exactly and never shifts with how a
tokenizer merges text across the boundary. Nothing follows the completion: the model is causal, so an
end-of-turn token after it would not change any state that is averaged.

A completion with zero tokens is pooled at the last template token (the position that would predict its first
token): a defined, finite input for every head, never an empty mean.

Poolings (`POOLINGS`, recorded in the heads file): the mean over the span, or the mean and the per-dimension
maximum side by side. The maximum keeps a sentence that the mean of a long reply dilutes ("I can't help with
that" in the middle of a paragraph): on the gold set it lifts `states_inability` from AUC 0.89 to 0.98 under
nested CV (benchmarks/bench_pooling.py, docs/grader-accuracy.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rbr_model.errors import PromptError

# Part of the heads' identity: bump when the way inputs are built changes.
INPUT_VERSION = "chat-prefix+completion-1"

MEAN = "mean-over-completion"
MEAN_AND_MAX = "mean-and-max-over-completion"
POOLINGS = {MEAN: 1, MEAN_AND_MAX: 2}  # pooling: its width as a multiple of the trunk's hidden size


def pool_span(states: np.ndarray, pooling: str) -> np.ndarray:
    """One row of pooled features from a span's per-token states (T, D), in float64."""
    span = np.asarray(states, dtype=np.float64)
    if pooling == MEAN:
        return span.mean(axis=0)
    if pooling == MEAN_AND_MAX:
        return np.concatenate([span.mean(axis=0), span.max(axis=0)])
    raise ValueError(f"pooling {pooling!r}: expected one of {list(POOLINGS)}")


@dataclass(frozen=True)
class HeadInput:
    """Token ids for one (conversation, completion) and the span `[start, end)` whose states are averaged."""

    ids: tuple[int, ...]
    start: int
    end: int

    @property
    def completion_tokens(self) -> int:
        return self.end - self.start if self.end > self.start else 0


def build_input(
    tokenizer: Any, conversation: Sequence[Mapping[str, str]], completion: str, max_tokens: int
) -> HeadInput:
    """Token ids and pooling span for one item; the conversation is cut from the left to fit `max_tokens`.

    Raises `PromptError` for malformed messages or when the completion alone does not fit.
    """
    if not isinstance(completion, str):
        raise PromptError("completion: expected a string")
    messages = []
    for i, msg in enumerate(conversation):
        role = msg.get("role") if isinstance(msg, Mapping) else None
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise PromptError(f"conversation[{i}]: expected {{'role': str, 'content': str}}")
        messages.append({"role": role, "content": content})
    try:
        prefix_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors from a model's own template (unsupported role, ...)
        raise PromptError(f"conversation: the grader's chat template rejected it: {exc}") from None
    prefix = list(tokenizer.encode(prefix_text, add_special_tokens=False))
    body = list(tokenizer.encode(completion, add_special_tokens=False)) if completion else []
    if len(body) + 1 > max_tokens:
        raise PromptError(f"completion: {len(body)} tokens; the heads' context is {max_tokens}")
    room = max_tokens - len(body)
    if len(prefix) > room:
        prefix = prefix[len(prefix) - room:]  # keep the most recent context, and the assistant header
    ids = tuple(prefix + body)
    if body:
        return HeadInput(ids, len(prefix), len(ids))
    return HeadInput(ids, len(prefix) - 1, len(prefix))
