"""The `Grader`: (conversation, completion, propositions) items in, calibrated P(yes) per proposition out.

It renders one prompt per (item, proposition), sends each distinct prompt to the engine once, and lets the
engine batch everything in flight. Propositions that the loaded heads cover are graded instead by one forward
pass of the trunk per item (`StateEngine`), shared by all of that item's headed propositions. Two callers that
need the same prompt (or heads input) at the same time share one engine request (an in-flight map from the key
to its task). Prompts one call makes ready together go to the engine in batches of the engine's `batch_size`
(1 when it has none: the in-process engine batches by itself, and a lone prompt can be aborted alone), so a
remote grader pays one HTTP request per batch, not per judgment. A semaphore bounds how many engine calls are
in flight at once, so a burst of callers queues here instead of inside the engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from rbr_model.errors import PromptError
from rbr_model.grading.engine import Engine, GradingError, Judgment
from rbr_model.grading.prompts import DEFAULT_LAYOUT, Layout, Message, PromptRenderer
from rbr_model.policy import Policy

# How P(yes) is read from the answer token's distribution; part of the fingerprint.
SCORING_VERSION = "yes-no-sum-ratio-1"

if TYPE_CHECKING:
    from rbr_model.grading.states import StateEngine
    from rbr_model.heads import HeadInput, Heads

GradeItem = tuple[Sequence[Message], str, Sequence[str]]  # (conversation, completion, proposition names)


@runtime_checkable
class Calibration(Protocol):
    """Maps a raw P(yes) for a proposition to a calibrated one.

    `fingerprint` must change whenever the mapping does: it versions every cached feature.
    """

    fingerprint: str

    def apply(self, name: str, p: float) -> float: ...


@dataclass
class _Flight:
    task: asyncio.Task[Any]  # a Judgment (prompt) or the heads' P(yes) row (heads input)
    waiters: int = 0


@dataclass
class _Batch:
    """One engine call for several prompts (or heads inputs); cancelled only when none of them is wanted any more."""

    task: asyncio.Future[Any]  # the judgments, or the heads' P(yes) rows, in the batch's order
    wanted: int


class Grader:
    """Grades items against a policy's propositions with one engine.

    `tokenizer` supplies the grader model's chat template; by default the engine's own (`engine.tokenizer`).
    `max_in_flight` caps the engine calls in flight at once, across all callers: one prompt each, or one batch
    of up to `engine.batch_size` prompts for an engine that takes batches (`RemoteEngine`).
    `heads` (with the `state_engine` that runs their trunk) grade the propositions they cover; they are checked
    against the policy and the trunk here, so a mismatch fails at load with `HeadsError`. Calibration applies to
    prompted propositions only: heads are fitted to labels directly.
    """

    def __init__(
        self,
        engine: Engine,
        policy: Policy,
        tokenizer: Any | None = None,
        calibration: Calibration | None = None,
        *,
        layout: Layout = DEFAULT_LAYOUT,
        max_in_flight: int = 256,
        heads: Heads | None = None,
        state_engine: StateEngine | None = None,
    ):
        tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the grader needs a tokenizer with the grader model's chat template")
        if calibration is not None and not callable(getattr(calibration, "apply", None)):
            raise TypeError("calibration must have an apply(name, p) -> p method")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.engine = engine
        self.policy = policy
        self.calibration = calibration
        self.renderer = PromptRenderer(policy, tokenizer, layout)
        self.max_in_flight = max_in_flight
        self._sem = asyncio.Semaphore(max_in_flight)
        self._in_flight: dict[str | HeadInput, _Flight] = {}
        self.engine_requests = 0  # distinct prompts actually sent to the engine (for metrics and tests)
        self.head_requests = 0  # distinct forward passes sent to the heads' engine
        self.heads = heads
        self.state_engine = state_engine
        if heads is not None:
            if state_engine is None:
                raise ValueError("heads need the state_engine that runs their trunk")
            heads.check_policy(policy)
            heads.check_model(state_engine.model_id, state_engine.model_hash, state_engine.hidden_size)

    async def health(self) -> bool:
        """True when every engine this grader uses can take work now; never raises."""
        return await self.unhealthy() is None

    async def unhealthy(self) -> str | None:
        """Which engine cannot take work now ("grader engine" or "heads' engine"), or None; never raises."""
        engines = [("grader engine", self.engine)]
        if self.state_engine is not None:
            engines.append(("heads' engine", self.state_engine))
        for name, engine in engines:
            try:
                if not await engine.health():
                    return name
            except Exception:  # noqa: BLE001 - a failing health check is an unhealthy engine
                return name
        return None

    def method(self, proposition: str) -> str:
        """"head" when the loaded heads grade this proposition, else "prompt"."""
        return "head" if self.heads is not None and proposition in self.heads else "prompt"

    # ---- identity -------------------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 over what decides the numbers: grader model, prompt wording/layout, scoring, calibration.

        Computed once: every cached request keys its items with it, and none of its parts changes after
        construction (build a new Grader for another model, wording or calibration).
        """
        blob = json.dumps(
            {
                "model": self.engine.model_id,
                "template": self.renderer.version,
                "scoring": SCORING_VERSION,
                "calibration": _calibration_id(self.calibration),
                # Only present with heads, so prompted-only graders keep the fingerprint their caches hold.
                **({"heads": self.heads.fingerprint} if self.heads is not None else {}),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def in_flight(self) -> int:
        """Distinct prompts currently waiting on the engine (a gauge for metrics and back-pressure)."""
        return len(self._in_flight)

    # ---- rendering ------------------------------------------------------------------------------------
    def render(self, conversation: Sequence[Message], completion: str, proposition: str) -> str:
        return self.renderer.render(conversation, completion, proposition)

    def _prompts(self, items: Sequence[GradeItem]) -> tuple[list[list[tuple[str, str]]], list[Any]]:
        """Per item: (name, prompt) for its prompted propositions, and its heads input (None when none is headed)."""
        from rbr_model.heads import build_input

        prompted, head_inputs = [], []
        for i, item in enumerate(items):
            try:
                conversation, completion, names = item
            except (TypeError, ValueError):
                raise PromptError(f"items[{i}]: expected (conversation, completion, propositions)") from None
            if isinstance(names, str):
                raise PromptError(f"items[{i}]: propositions must be a list of names, not a string")
            headed = [n for n in names if self.method(n) == "head"]
            prompted.append([(n, self.render(conversation, completion, n)) for n in names if n not in headed])
            head_inputs.append(
                build_input(self.state_engine.tokenizer, conversation, completion, self.state_engine.max_model_len)
                if headed else None
            )
        return prompted, head_inputs

    # ---- grading --------------------------------------------------------------------------------------
    async def grade(self, items: Sequence[GradeItem]) -> list[dict[str, float]]:
        """Calibrated P(yes) per requested proposition, one dict per item, in order."""
        judged = await self.grade_judgments(items)
        cal = self.calibration
        return [
            {name: (cal.apply(name, j.p_yes) if cal and self.method(name) == "prompt" else j.p_yes)
             for name, j in per_item.items()}
            for per_item in judged
        ]

    async def grade_judgments(self, items: Sequence[GradeItem]) -> list[dict[str, Judgment]]:
        """Raw (uncalibrated) judgments with their yes/no mass, one dict per item, in order."""
        rendered, head_inputs = self._prompts(items)  # all input errors surface before any engine work
        unique_inputs = list(dict.fromkeys(h for h in head_inputs if h is not None))
        unique = list(dict.fromkeys(p for per_item in rendered for _, p in per_item))
        flights = self._join_prompts(unique) + self._join_heads(unique_inputs)
        try:
            results = await asyncio.gather(*(asyncio.shield(f.task) for f in flights), return_exceptions=True)
        except asyncio.CancelledError:
            self._leave(flights)
            raise
        self._leave(flights)
        by_key: dict[Any, Any] = {}
        for key, res in zip([*unique, *unique_inputs], results, strict=True):
            if isinstance(res, BaseException):
                if isinstance(res, GradingError):
                    raise res
                if isinstance(res, asyncio.CancelledError):
                    raise GradingError("grading was cancelled by another caller", retryable=True)
                raise GradingError(f"grading failed: {type(res).__name__}: {res}") from res
            by_key[key] = res
        out = []
        for (_, _, names), per_item, head_input in zip(items, rendered, head_inputs, strict=True):
            judged = {name: by_key[p] for name, p in per_item}
            if head_input is not None:
                row = by_key[head_input]
                for name in names:
                    if name not in judged:
                        judged[name] = Judgment(p_yes=float(row[self.heads.position(name)]),
                                                yes_no_mass=1.0, prompt_tokens=len(head_input.ids))
            out.append({name: judged[name] for name in names})
        return out

    def _join_prompts(self, prompts: Sequence[str]) -> list[_Flight]:
        """Flights for distinct `prompts`; those not in flight yet go out together, `engine.batch_size` a call."""
        new = [p for p in prompts if p not in self._in_flight]
        size = max(1, int(getattr(self.engine, "batch_size", 1) or 1))
        work: dict[str, Any] = {}
        for start in range(0, len(new), size):
            chunk = new[start : start + size]
            if len(chunk) == 1:
                work[chunk[0]] = self._send(chunk[0])
                continue
            batch = _Batch(asyncio.ensure_future(self._send_batch(chunk)), wanted=len(chunk))
            work.update({p: self._pick(batch, i) for i, p in enumerate(chunk)})
        return [self._join(p, work.get(p)) for p in prompts]

    def _join_heads(self, inputs: Sequence[HeadInput]) -> list[_Flight]:
        """Flights for distinct heads `inputs`; new ones go out together, `state_engine.batch_size` a call (one
        HTTP request per batch to a remote pooling server, as prompts do)."""
        new = [h for h in inputs if h not in self._in_flight]
        size = max(1, int(getattr(self.state_engine, "batch_size", 1) or 1))
        work: dict[HeadInput, Any] = {}
        for start in range(0, len(new), size):
            chunk = new[start : start + size]
            if len(chunk) > 1:
                batch = _Batch(asyncio.ensure_future(self._send_heads_batch(chunk)), wanted=len(chunk))
                work.update({h: self._pick(batch, i) for i, h in enumerate(chunk)})
        return [self._join(h, work.get(h)) for h in inputs]

    def _join(self, key: str | HeadInput, work: Any = None) -> _Flight:
        flight = self._in_flight.get(key)
        if flight is None:
            if work is None:
                work = self._send(key) if isinstance(key, str) else self._send_heads(key)
            flight = _Flight(asyncio.ensure_future(work))
            self._in_flight[key] = flight
            flight.task.add_done_callback(lambda _t, p=key, f=flight: self._land(p, f))
        flight.waiters += 1
        return flight

    def _land(self, prompt: str | HeadInput, flight: _Flight) -> None:
        if self._in_flight.get(prompt) is flight:
            del self._in_flight[prompt]

    def _leave(self, flights: Sequence[_Flight]) -> None:
        """A caller stops waiting; work nobody waits for any more is cancelled (vLLM aborts the request)."""
        for f in flights:
            f.waiters -= 1
            if f.waiters <= 0 and not f.task.done():
                f.task.cancel()

    async def _send(self, prompt: str) -> Judgment:
        async with self._sem:
            self.engine_requests += 1
            (judgment,) = await self.engine.grade([prompt])
            return judgment

    async def _send_batch(self, prompts: list[str]) -> list[Judgment]:
        async with self._sem:
            self.engine_requests += len(prompts)
            judged = await self.engine.grade(prompts)
            if len(judged) != len(prompts):
                raise GradingError(f"the engine answered {len(judged)} judgments for {len(prompts)} prompts")
            return judged

    @staticmethod
    async def _pick(batch: _Batch, index: int) -> Any:
        """One prompt's judgment (or heads row) out of its batch; the batch is cancelled when its last wanted
        one is."""
        try:
            return (await asyncio.shield(batch.task))[index]
        except asyncio.CancelledError:
            if not batch.task.done():
                batch.wanted -= 1
                if batch.wanted <= 0:
                    batch.task.cancel()
            raise

    async def _send_heads(self, head_input: HeadInput) -> np.ndarray:
        """P(yes) of every head for one item: one trunk forward pass, then a dot product per head."""
        async with self._sem:
            self.head_requests += 1
            pooled = await self.state_engine.pooled([head_input], self.heads.pooling)
            return self.heads.predict(pooled)[0]

    async def _send_heads_batch(self, inputs: list[HeadInput]) -> np.ndarray:
        """P(yes) of every head for several items: one call to the heads' engine, one row per item."""
        async with self._sem:
            self.head_requests += len(inputs)
            return self.heads.predict(await self.state_engine.pooled(inputs, self.heads.pooling))


def _calibration_id(calibration: Any) -> Any:
    if calibration is None:
        return None
    fp = getattr(calibration, "fingerprint", None)
    if callable(fp):
        fp = fp()
    if isinstance(fp, str) and fp:
        return fp
    # No declared fingerprint: fall back to the object's type and public state, so that two different
    # calibrations at least never share a fingerprint by accident.
    state = (
        {k: v for k, v in vars(calibration).items() if not k.startswith("_")}
        if hasattr(calibration, "__dict__")
        else repr(calibration)
    )
    return {"type": f"{type(calibration).__module__}.{type(calibration).__qualname__}", "state": _jsonable(state)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)
