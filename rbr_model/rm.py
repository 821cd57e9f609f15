"""Reward-model (RM) scores: the `rm_score` half of `total = rm_score + rbr`.

A request may carry its own `rm_score`; otherwise the operator can point the service at a reward model, which is
any sequence-classification model (e.g. `LlamaForSequenceClassification`) served by vLLM's pooling runner; with no
model named, the embedded helpful-only RM (`models.prepare_rm`: the embedded model with a fitted score head):

- `VLLMRMEngine`: the model in this process, through vLLM's `AsyncLLM` (`runner="pooling"`).
- `RemoteRMEngine`: a separate vLLM server (`--runner pooling`), through its `POST /classify` endpoint.

Both score a (conversation, completion) pair the same way, so they give the same number for the same model:

1. The completion is appended to the conversation as an assistant message, and the messages are rendered with the
   reward model's own chat template (no generation prompt, no extra special tokens). The in-process engine
   renders with the tokenizer here; the remote engine sends the messages and the server renders them with the
   same template.
2. The model's classification head is read raw (`use_activation=False`): no sigmoid or softmax on vLLM's side.
3. Scoring rule on the logits:
   - one label (the usual reward-model head): the raw logit. A reward model is trained on pairwise preferences
     (Bradley-Terry), so its output is an unbounded scalar whose differences are what matter; vLLM's default
     activation for a one-label head is a sigmoid, which would squash large rewards towards 0 or 1 and shrink
     the very differences a policy-gradient trainer learns from.
   - n >= 2 labels: the softmax probability of the last label (by convention the "good"/"preferred" class).

Failures raise `RMError`; an engine never makes up a score. Nothing in this module imports vLLM, torch or
httpx until an engine that needs them is built.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from rbr_model.aio import gather_or_cancel
from rbr_model.lifecycle import AsyncLLMOwner, EngineLifecycle, HTTPClientOwner

Message = Mapping[str, str]

RM_KINDS = ("none", "vllm", "remote")


class RMError(RuntimeError):
    """The reward model could not score a request (engine down, closed, bad input, bad response).

    `retryable`: the same request may succeed later (as `GradingError`'s)."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


# ---- shared rendering and scoring rule --------------------------------------------------------------------


def rm_messages(conversation: Sequence[Message], completion: str) -> list[dict[str, str]]:
    """The conversation with the completion appended as the assistant's reply, as plain role/content dicts."""
    if not isinstance(completion, str):
        raise RMError(f"completion must be a string, got {type(completion).__name__}")
    messages = []
    for i, msg in enumerate(conversation):
        role, content = (msg.get("role"), msg.get("content")) if isinstance(msg, Mapping) else (None, None)
        if not isinstance(role, str) or not isinstance(content, str):
            raise RMError(f"conversation[{i}]: expected {{'role': str, 'content': str}}")
        messages.append({"role": role, "content": content})
    messages.append({"role": "assistant", "content": completion})
    return messages


def score_from_logits(logits: Sequence[float]) -> float:
    """One label: the raw logit. n labels: softmax probability of the last label. See the module docstring."""
    if not isinstance(logits, Sequence) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in logits
    ):
        raise RMError(f"the reward model returned logits that are not a list of numbers: {logits!r:.200}")
    values = [float(v) for v in logits]
    if not values:
        raise RMError("the reward model returned no logits")
    if not all(math.isfinite(v) for v in values):
        raise RMError(f"the reward model returned a non-finite logit: {values}")
    if len(values) == 1:
        return values[0]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return exps[-1] / sum(exps)


def _check_batch(conversations: Sequence[Sequence[Message]], completions: Sequence[str]) -> None:
    if len(conversations) != len(completions):
        raise RMError(f"{len(conversations)} conversations but {len(completions)} completions")


# ---- interface --------------------------------------------------------------------------------------------


class RMEngine(EngineLifecycle, ABC):
    """Scores (conversation, completion) pairs with a reward model. Start, health, gone and close:
    `EngineLifecycle`."""

    engine_name = "the reward model engine"
    model_id: str

    @abstractmethod
    async def score(self, conversations: Sequence[list[dict[str, str]]], completions: Sequence[str]) -> list[float]:
        """One score per pair, in order. Raises `RMError` when any pair cannot be scored."""


# ---- in-process vLLM --------------------------------------------------------------------------------------


class VLLMRMEngine(AsyncLLMOwner, RMEngine):
    """A reward (sequence-classification) model in this process, on vLLM's pooling runner.

    The engine is built in `__init__` (blocking, minutes on a CPU: call it through `asyncio.to_thread` from async
    code); its output loop starts on the event loop of the first `score`, which every later call must share.
    vLLM's multiprocess engine core needs a `if __name__ == "__main__":` guard in scripts that build one.

    Stats logging is off by default (`disable_log_stats=True`): vLLM's Prometheus logger unregisters every
    `vllm:` collector when it starts, which would wipe the grader engine's series in the same process.
    """

    engine_name = "the reward model engine"
    error_type = RMError

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        max_model_len: int = 4096,
        enforce_eager: bool = True,
        *,
        dtype: str | None = None,
        max_num_seqs: int | None = None,
        served_model_name: str | None = None,
        disable_log_stats: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RMError(f"the in-process RM engine needs vLLM: {exc}") from exc
        from rbr_model.grading.vllm_engine import cpu_engine_env, default_dtype

        engine_kwargs = {**cpu_engine_env(), **engine_kwargs}
        # None: the grader engine's choice (float32 on CPUs without native bfloat16, where bfloat16 is ~4x slower)
        dtype = dtype or default_dtype()
        self.model_path = str(model_path)
        self.model_id = served_model_name or self.model_path
        self.max_model_len = max_model_len
        args = AsyncEngineArgs(
            model=self.model_path,
            # The pooling runner; `convert` stays "auto": a `*ForSequenceClassification` architecture resolves to
            # the classify task with its checkpoint's `score` head (forcing "classify" onto a causal LM would
            # bolt on an untrained head instead of failing).
            runner="pooling",
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            dtype=dtype,
            disable_log_stats=disable_log_stats,
            **({"max_num_seqs": max_num_seqs} if max_num_seqs is not None else {}),
            **({"served_model_name": [served_model_name]} if served_model_name else {}),
            **engine_kwargs,
        )
        self._llm: Any = None
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise RMError(f"cannot start the reward model engine for {self.model_path}: {exc}") from exc
        self._tokenizer = self._llm.get_tokenizer()
        if not getattr(self._tokenizer, "chat_template", None):
            self._llm.shutdown()
            raise RMError(f"{self.model_path}: the tokenizer has no chat template to render conversations with")
        self._closed = False
        self._checked = False
        self._ids = itertools.count()

    def render(self, conversation: Sequence[Message], completion: str) -> list[int]:
        """Token ids of the conversation plus the completion, in the model's chat template."""
        text = self._tokenizer.apply_chat_template(
            rm_messages(conversation, completion), tokenize=False, add_generation_prompt=False
        )
        # The template writes any BOS itself; adding special tokens again would double it.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    async def _check_task(self) -> None:
        if self._checked:
            return
        tasks = await self._llm.get_supported_tasks()
        if "classify" not in tasks:
            raise RMError(f"{self.model_path} is not a classification model (vLLM supports {list(tasks)})")
        self._checked = True

    async def _score_one(self, engine_input: Any) -> float:
        from vllm import PoolingParams

        params = PoolingParams(task="classify", use_activation=False)
        final = None
        async for out in self._llm.encode(engine_input, params, f"rm-{next(self._ids)}"):
            final = out
        if final is None:
            raise RMError("the reward model engine returned nothing")
        if getattr(final, "error", None) is not None:
            raise RMError(f"the reward model engine failed the request: {final.error}")
        data = final.outputs.data
        return score_from_logits(data.reshape(-1).tolist())

    async def score(self, conversations: Sequence[list[dict[str, str]]], completions: Sequence[str]) -> list[float]:
        self._check_open()
        _check_batch(conversations, completions)
        if not completions:
            return []
        try:
            await self._check_task()
            # Templating and tokenising a large batch is real CPU work: keep it off the event loop.
            rendered = await asyncio.to_thread(
                lambda: [self.render(c, r) for c, r in zip(conversations, completions, strict=True)]
            )
            for i, ids in enumerate(rendered):
                if len(ids) > self.max_model_len:
                    raise RMError(f"item {i}: {len(ids)} tokens is over max_model_len={self.max_model_len}")
            # vLLM's renderer turns token ids into engine inputs (raw prompts to `encode` are deprecated).
            inputs = await self._llm.renderer.render_cmpl_async([{"prompt_token_ids": ids} for ids in rendered])
            # One gather: every pair is in flight at once and vLLM's scheduler batches them.
            return await gather_or_cancel([self._score_one(x) for x in inputs])
        except (RMError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._failure(exc) from exc


# ---- remote vLLM server -----------------------------------------------------------------------------------


class RemoteRMEngine(HTTPClientOwner, RMEngine):
    """A reward model on a vLLM server started with `--runner pooling`, through `POST {base_url}/classify`.

    Each pair is one chat-form request (`messages`: the conversation plus the completion as the assistant's
    turn), rendered by the server with the model's chat template: this process needs no tokenizer, and the
    text matches what `VLLMRMEngine` renders. Requests go out concurrently, at most `max_concurrency` at a
    time, with `use_activation: false` so the server returns raw logits.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        max_concurrency: int = 64,
        transport: Any = None,
    ) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = model or self.base_url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            transport=transport,
        )
        self._owns_client = True  # made here; a caller's transport is only the client's way out
        self._slots = asyncio.Semaphore(max_concurrency)
        self._closed = False

    async def _score_one(self, conversation: Sequence[Message], completion: str) -> float:
        import httpx

        body: dict[str, Any] = {
            "messages": rm_messages(conversation, completion),
            "use_activation": False,
            "add_generation_prompt": False,
        }
        if self.model:
            body["model"] = self.model
        async with self._slots:
            try:
                resp = await self._client.post("/classify", json=body)
            except httpx.HTTPError as exc:
                raise RMError(f"reward model server {self.base_url}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise RMError(f"reward model server {self.base_url} answered {resp.status_code}: {resp.text[:500]}")
        try:
            data = resp.json()["data"]
            if len(data) != 1:
                raise ValueError(f"expected one result, got {len(data)}")
            probs = data[0]["probs"]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise RMError(f"reward model server {self.base_url}: unexpected response: {resp.text[:500]}") from exc
        return score_from_logits(probs)

    async def score(self, conversations: Sequence[list[dict[str, str]]], completions: Sequence[str]) -> list[float]:
        if self._closed:
            raise RMError("the reward model engine is closed")
        _check_batch(conversations, completions)
        return await gather_or_cancel([self._score_one(c, r) for c, r in zip(conversations, completions, strict=True)])


# ---- factory ----------------------------------------------------------------------------------------------

_VLLM_KW = {"max_model_len", "enforce_eager", "dtype", "max_num_seqs", "served_model_name", "disable_log_stats",
            "gpu_memory_utilization", "enable_prefix_caching", "max_num_batched_tokens", "tensor_parallel_size"}
_REMOTE_KW = {"api_key", "timeout", "max_concurrency", "transport"}


def build_rm_engine(kind: str, model: str | None, url: str | None, **kw: Any) -> RMEngine | None:
    """The RM engine for `kind`: "none" (None), "vllm" (`model` is a local path; None: the embedded helpful-only
    RM, `models.prepare_rm`) or "remote" (`url`).

    `kw` may carry settings for either kind; each engine takes the ones it knows (so a caller can pass
    `max_model_len` whatever the kind). For "remote", `model` is the served model name to ask for, if any.
    """
    kind = (kind or "none").lower()
    if kind == "none":
        return None
    if kind == "vllm":
        if not model:  # the embedded helpful-only RM, built once from the packaged head (rbr model prepare --rm)
            from rbr_model import models

            try:
                model = str(models.prepare_rm())
            except models.ModelError as exc:
                raise RMError(f"cannot prepare the embedded reward model: {exc}") from exc
        return VLLMRMEngine(model, **{k: v for k, v in kw.items() if k in _VLLM_KW})
    if kind == "remote":
        if not url:
            raise ValueError("rm engine 'remote' needs a base URL")
        return RemoteRMEngine(url, model=model, **{k: v for k, v in kw.items() if k in _REMOTE_KW})
    raise ValueError(f"unknown rm engine {kind!r}: expected one of {', '.join(RM_KINDS)}")


__all__ = [
    "RMEngine",
    "RMError",
    "RM_KINDS",
    "RemoteRMEngine",
    "VLLMRMEngine",
    "build_rm_engine",
    "rm_messages",
    "score_from_logits",
]
