"""The scoring pipeline: validate → cache lookup → grade the misses → features → reward → cache store.

Everything that decides a reward lives here; routes only translate HTTP shapes in and out. A request works on
one `ServingState` snapshot from start to end, so a reload never mixes policies within a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from rbr_model.errors import PromptError
from rbr_model.features import CLASS_PREFIX
from rbr_model.policy import Policy
from rbr_model.reward import RewardModel
from service.cache import FeatureCache, cache_key
from service.errors import EngineUnavailable, InvalidRequest, Overloaded, PayloadTooLarge
from service.metrics import Metrics

if TYPE_CHECKING:
    from rbr_model.grading.grader import Grader
    from rbr_model.rm import RMEngine

log = logging.getLogger("rbr.scoring")


@dataclass(frozen=True)
class ServingState:
    """What one request scores against (reward model, its policy, the grader, the RM engine of the grading stack):
    replaced as a whole on reload, so a request that started on one state finishes on it."""

    model: RewardModel
    grader: Grader
    rm_engine: RMEngine | None = None  # held by the grading stack with the other engines; here to score with
    generation: int = 1

    @property
    def policy(self) -> Policy:
        return self.model.policy

    @property
    def policy_version(self) -> str:
        return self.policy.short_version

    @cached_property
    def weights_version(self) -> str:
        """Hashed once per state, not per request: the weights of a state never change (reload builds a new one)."""
        return self.model.weights.version


@dataclass
class ScoreItem:
    """One completion to score, already validated and normalised by a route (HTTP shapes stay in the routes)."""

    conversation: list[dict[str, str]]
    completion: str
    response_type: str | None  # already resolved to a policy key
    rm_score: float | None
    id: str | None = None


@dataclass
class ScoreResult:
    """One item's reward and its parts; `features`/`classes` only when asked for, `cached` when nothing was graded."""

    id: str | None
    reward: float
    rbr_reward: float
    rm_score: float
    response_type: str | None
    features: dict[str, float] = field(default_factory=dict)
    classes: dict[str, float] = field(default_factory=dict)
    cached: bool = False


class Admission:
    """Bounds the judgments in flight; a request that would pass the bound is refused at once (429).

    The 429's Retry-After is drawn between the time the judgments in flight need to make room for the request and
    the time they need to drain, at the rate they finished over the last `RATE_WINDOW_S` seconds, and kept between
    `retry_after_s` and `RETRY_AFTER_MAX_S` (or `retry_after_s`, when an operator set it larger). A fixed second
    sent every waiting client of a saturated server back at once into a bound with room for a few: in the fleet
    sweep (issue #22) 139 of 211 requests of 64 workers on one replica spent their retries that way and failed.
    Spread over the drain time, they come back as room frees.
    """

    RATE_WINDOW_S = 30.0
    RETRY_AFTER_MAX_S = 60

    def __init__(self, limit: int, metrics: Metrics, retry_after_s: int = 1,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None):
        self.limit, self.metrics, self.retry_after_s, self.clock = limit, metrics, retry_after_s, clock
        self.rng = rng or random.Random()
        self.inflight = 0
        # (when, judgments) of work that left within the window, and their sum: trimmed on every finish, so it
        # stays as long as the window's requests whether or not anything is ever refused
        self._finished: deque[tuple[float, int]] = deque()
        self._finished_sum = 0

    def _forget_before(self, now: float) -> None:
        while self._finished and self._finished[0][0] < now - self.RATE_WINDOW_S:
            self._finished_sum -= self._finished.popleft()[1]

    def finished_per_s(self) -> float | None:
        """Judgments finished per second over the window; None before any finished."""
        now = self.clock()
        self._forget_before(now)
        if not self._finished:
            return None
        return self._finished_sum / max(now - self._finished[0][0], 1.0)

    def retry_after(self, judgments: int) -> int:
        """Whole seconds to wait before asking again for `judgments` (see the class docstring)."""
        rate = self.finished_per_s()
        if not rate:
            return self.retry_after_s
        room = (self.inflight + judgments - self.limit) / rate
        drain = max(self.inflight / rate, room)
        wait = math.ceil(self.rng.uniform(room, drain))
        return int(min(max(wait, self.retry_after_s), max(self.RETRY_AFTER_MAX_S, self.retry_after_s)))

    @contextmanager
    def admit(self, judgments: int):
        if judgments > self.limit:
            raise PayloadTooLarge(
                f"request needs {judgments} judgments, more than the server admits at once "
                f"(RBR_MAX_INFLIGHT_JUDGMENTS={self.limit}); split it", field="items")
        if self.inflight + judgments > self.limit:
            self.metrics.rejected.inc()
            wait = self.retry_after(judgments)
            raise Overloaded(
                f"server busy: {self.inflight} judgments in flight (limit {self.limit}); retry in {wait} s",
                headers={"Retry-After": str(wait)})
        self.inflight += judgments
        self.metrics.inflight_judgments.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= judgments
            now = self.clock()
            self._finished.append((now, judgments))
            self._finished_sum += judgments
            self._forget_before(now)
            self.metrics.inflight_judgments.set(self.inflight)


class Pipeline:
    """Scores items against a `ServingState`: cache lookup, grading of the misses under `Admission`, features,
    reward, cache store. Shared by every route and request; per-request data stays in the call."""

    def __init__(self, cache: FeatureCache, metrics: Metrics, admission: Admission,
                 default_rm_score: float | None = None):
        self.cache, self.metrics, self.admission = cache, metrics, admission
        self.default_rm_score = default_rm_score

    @contextmanager
    def _stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage_duration.labels(name).observe(time.perf_counter() - start)

    async def score(self, state: ServingState, items: Sequence[ScoreItem],
                    with_features: bool = False, field: str = "items") -> list[ScoreResult]:
        """`field` names the request's list of items in errors (`query` for OpenRLHF)."""
        rm_scores = await self._rm_scores(state, items)
        graded = [i for i, item in enumerate(items) if item.response_type is not None]
        probs, cached = await self._probabilities(state, [items[i] for i in graded], field)
        # One matrix product per response type, not one per item: the cached path is mostly this loop.
        probs_of = dict(zip(graded, probs, strict=True))
        by_type: dict[str, list[int]] = {}
        for i in graded:
            by_type.setdefault(items[i].response_type, []).append(i)  # type: ignore[arg-type]
        rbr_of: dict[int, float] = {}
        features_of: dict[int, list[float]] = {}
        for rt, members in by_type.items():
            spec = state.model.features[rt]
            x = spec.features(spec.matrix([probs_of[i] for i in members]))
            rbr_of.update(zip(members, state.model.rbr(rt, x).tolist(), strict=True))
            if with_features:
                features_of.update(zip(members, x.tolist(), strict=True))
        cached_of = dict(zip(graded, cached, strict=True))
        results: list[ScoreResult] = []
        for i, item in enumerate(items):
            rm = rm_scores[i]
            rt = item.response_type
            if rt is None:
                results.append(ScoreResult(item.id, rm, 0.0, rm, None))
                continue
            rbr = rbr_of[i]
            res = ScoreResult(item.id, RewardModel.total(rm, rbr), rbr, rm, rt, cached=cached_of[i])
            if with_features:
                names = state.model.features[rt].feature_names
                values = dict(zip(names, features_of[i], strict=True))
                res.features = {k: v for k, v in values.items() if not k.startswith(CLASS_PREFIX)}
                res.classes = {k[len(CLASS_PREFIX):]: v for k, v in values.items() if k.startswith(CLASS_PREFIX)}
            results.append(res)
        self._observe(results)
        return results

    def _observe(self, results: Sequence[ScoreResult]) -> None:
        by_label: dict[str, list[float]] = {}
        for r in results:
            by_label.setdefault(r.response_type or "none", []).append(r.reward)
        for label, rewards in by_label.items():  # one label lookup per response type, not per item
            histogram = self.metrics.rewards.labels(label)
            for reward in rewards:
                histogram.observe(reward)
            self.metrics.items.labels(label).inc(len(rewards))

    def check_rm_available(self, state: ServingState, items: Sequence[ScoreItem], field_prefix: str = "items") -> None:
        """Fail fast (422) before any grading when an item has no way to get an RM score."""
        if state.rm_engine is not None or self.default_rm_score is not None:
            return
        for i, item in enumerate(items):
            if item.rm_score is None:
                raise InvalidRequest(
                    f"{field_prefix}[{i}].rm_score: required (no RM engine or default RM score is configured)",
                    field=f"{field_prefix}[{i}].rm_score")

    async def _rm_scores(self, state: ServingState, items: Sequence[ScoreItem]) -> list[float]:
        self.check_rm_available(state, items)
        out = [item.rm_score for item in items]
        missing = [i for i, v in enumerate(out) if v is None]
        if missing and state.rm_engine is not None:
            with self._stage("rm"):
                try:
                    scores = await state.rm_engine.score(
                        [items[i].conversation for i in missing], [items[i].completion for i in missing])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - surfaced to the caller as 503
                    raise EngineUnavailable(f"reward model engine failed: {exc}") from exc
            for i, s in zip(missing, scores, strict=True):
                out[i] = float(s)
        return [v if v is not None else float(self.default_rm_score) for v in out]  # type: ignore[arg-type]

    async def _probabilities(self, state: ServingState, items: Sequence[ScoreItem],
                             field: str = "items") -> tuple[list[dict[str, float]], list[bool]]:
        if not items:
            return [], []
        policy, grader = state.policy, state.grader
        policy_fp, grader_fp = policy.fingerprint, grader.fingerprint
        keys = [cache_key(policy_fp, grader_fp, it.conversation, it.completion) for it in items]
        with self._stage("cache_get"):
            found = await self.cache.get_many(keys)
        needed = [policy.propositions_for(it.response_type) for it in items]  # type: ignore[arg-type]
        probs: list[dict[str, float]] = [dict(f or {}) for f in found]
        todo = []  # (index, missing propositions)
        for i, props in enumerate(needed):
            missing = [p for p in props if p not in probs[i]]
            if missing:
                todo.append((i, missing))
        to_grade = {i for i, _ in todo}
        cached = [i not in to_grade for i in range(len(items))]
        if todo:
            n_judgments = sum(len(m) for _, m in todo)
            with self.admission.admit(n_judgments):
                self.metrics.judgments.inc(n_judgments)
                requests = [(items[i].conversation, items[i].completion, missing) for i, missing in todo]
                self.metrics.grading_batch_size.observe(n_judgments)
                start = time.perf_counter()
                with self._stage("grade"):
                    graded = await _grade(grader, requests, field)
                self.metrics.grading_duration.observe(time.perf_counter() - start)
            fresh: dict[str, dict[str, float]] = {}
            for (i, _), result in zip(todo, graded, strict=True):
                probs[i].update(result)
                fresh[keys[i]] = probs[i]
            with self._stage("cache_set"):
                await self.cache.set_many(fresh)
        return probs, cached


async def _grade(grader: Grader, requests: list, field: str) -> list[dict[str, float]]:
    try:
        return await grader.grade(requests)
    except asyncio.CancelledError:
        raise
    except PromptError as exc:  # the input cannot be read (e.g. a completion longer than the heads' context)
        raise InvalidRequest(f"{field}: the grader cannot judge this input: {exc}", field=field) from exc
    except Exception as exc:  # noqa: BLE001 - a grader failure is the caller's 503 or 422, never a reward
        log.error("grading failed: %s: %s", type(exc).__name__, exc)
        if getattr(exc, "retryable", True) is False and await grader.health():
            # A healthy engine that says a retry cannot help: the input is at fault (e.g. a prompt longer than the
            # grader's context). A 503 here would make clients retry the same request forever.
            raise InvalidRequest(f"{field}: the grader cannot judge this input: {exc}", field=field) from exc
        raise EngineUnavailable(f"grader engine failed: {type(exc).__name__}: {exc}") from exc

