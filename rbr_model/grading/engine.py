"""The grader engine interface: everything above it (the `Grader`, the service, the offline tools) sees only this.

An engine turns finished prompt texts (already in the grader's chat template) into yes/no judgments, and can
also sample free text (the synthetic-data generator needs that). Two implementations exist: `VLLMEngine`
(in-process vLLM) and `RemoteEngine` (an OpenAI-compatible vLLM server). An engine never invents a number:
when it cannot produce a judgment it raises `GradingError`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rbr_model.lifecycle import EngineLifecycle


class GradingError(RuntimeError):
    """A judgment could not be produced (engine down or closed, prompt rejected, malformed answer).

    `retryable` is True when the same request may succeed later (a timeout, an overloaded or restarting
    server), False when it will fail again (a prompt longer than the model's context).
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Judgment:
    """The grader's answer to one prompt.

    `p_yes` is P(yes) among the yes/no answers only: sum of yes-token probabilities over the sum of yes and no
    ones. `yes_no_mass` is how much of the model's unmasked next-token probability fell on any yes/no token; a
    low mass means the model wanted to say something else, so `p_yes` is less trustworthy.
    """

    p_yes: float
    yes_no_mass: float
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache, when the engine says


def _logsumexp(values: Iterable[float]) -> float:
    vals = [v for v in values if v != -math.inf]
    if not vals:
        return -math.inf
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals))


def judgment_from_logprobs(
    logprobs: Mapping[int, float],
    yes_ids: Sequence[int],
    no_ids: Sequence[int],
    prompt_tokens: int | None = None,
    cached_tokens: int | None = None,
) -> Judgment:
    """Combine per-token log-probabilities (unmasked, natural log) into a `Judgment`.

    Every yes/no id must be present: a missing one would silently bias the ratio, so it is an error.
    """
    missing = [t for t in (*yes_ids, *no_ids) if t not in logprobs]
    if missing:
        raise GradingError(f"the engine returned no log-probability for yes/no token ids {missing}")
    for t in (*yes_ids, *no_ids):
        v = logprobs[t]
        if math.isnan(v) or v > 1e-4:
            raise GradingError(f"invalid log-probability {v!r} for token id {t}")
    lse_yes = _logsumexp(float(logprobs[t]) for t in yes_ids)
    lse_no = _logsumexp(float(logprobs[t]) for t in no_ids)
    lse_all = _logsumexp((lse_yes, lse_no))
    if lse_all == -math.inf:
        raise GradingError("the model gave zero probability to every yes/no token")
    p_yes = math.exp(lse_yes - lse_all)
    return Judgment(
        p_yes=min(max(p_yes, 0.0), 1.0),
        yes_no_mass=min(math.exp(lse_all), 1.0),
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
    )


class Engine(EngineLifecycle, ABC):
    """A grader model behind one small async interface (start, health, gone and close: `EngineLifecycle`)."""

    engine_name = "the grader engine"

    model_id: str
    """Identifies the model (and so the meaning of its probabilities): part of the grader fingerprint."""

    batch_size: int = 1
    """Prompts worth sending in one `grade` call: above 1 where each call has a cost of its own (an HTTP request)."""

    @abstractmethod
    async def grade(self, prompts: Sequence[str]) -> list[Judgment]:
        """One judgment per prompt, in order. Raises `GradingError` if any prompt cannot be judged."""

    @abstractmethod
    async def generate(
        self, prompts: Sequence[str], max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None
    ) -> list[str]:
        """Sample one continuation per prompt (text only). Raises `GradingError` on failure."""
