"""Hidden-state engines for the learned heads: token ids in, the grader trunk's states averaged over a span out.

The trunk is the grader model cut after layer L (`rbr model prepare --trunk-layer L`), served by vLLM's pooling
runner with per-token embeddings (`token_embed`, no activation), so a forward pass costs L/N of the full
model's and the caller chooses exactly which tokens are averaged. vLLM's model applies the model's final norm
to layer L's output; the heads are fitted on those very states (the effect of the norm was measured:
docs/grader-accuracy.md).

Why a second engine beside the prompted grader's: one vLLM engine runs one runner, and the generate runner
returns no hidden states while the pooling runner cannot sample; the trunk is half the model (~0.16 GB in
bfloat16), so running both costs little memory (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from rbr_model.aio import gather_or_cancel
from rbr_model.grading.engine import GradingError
from rbr_model.heads.inputs import MEAN, POOLINGS, HeadInput, pool_span
from rbr_model.lifecycle import AsyncLLMOwner, EngineLifecycle, HTTPClientOwner


class StateEngine(EngineLifecycle, ABC):
    """The trunk behind one small async interface; `pooled` never invents a number (it raises GradingError).
    Start, health, gone and close: `EngineLifecycle`."""

    engine_name = "the heads engine"

    model_id: str
    model_hash: str  # sha256 of the trunk's weights and config: heads are refused on another trunk
    dtype: str  # the precision states are computed in (part of the states cache key)
    hidden_size: int
    max_model_len: int
    tokenizer: Any

    @abstractmethod
    async def token_states(self, inputs: Sequence[HeadInput]) -> list[np.ndarray]:
        """Per-token states (len(ids), D), float32, one array per input, in order."""

    async def pooled(self, inputs: Sequence[HeadInput], pooling: str = MEAN) -> np.ndarray:
        """Each input's span pooled (`rbr_model.heads.inputs.POOLINGS`), (n, D x multiple) in float64."""
        states = await self.token_states(inputs)
        out = np.empty((len(inputs), self.hidden_size * POOLINGS[pooling]), dtype=np.float64)
        for i, (inp, st) in enumerate(zip(inputs, states, strict=True)):
            if st.ndim != 2 or st.shape[0] != len(inp.ids) or st.shape[1] != self.hidden_size:
                raise GradingError(f"the heads engine returned states of shape {st.shape} for "
                                   f"{len(inp.ids)} tokens of width {self.hidden_size}")
            out[i] = pool_span(st[inp.start:inp.end], pooling)
        if not np.all(np.isfinite(out)):
            raise GradingError("the heads engine returned non-finite hidden states")
        return out


def _check_ids(inputs: Sequence[HeadInput], max_model_len: int) -> None:
    for inp in inputs:
        if not inp.ids or len(inp.ids) > max_model_len:
            raise GradingError(f"a heads input of {len(inp.ids)} tokens; the trunk's context is {max_model_len}")


class VLLMStateEngine(AsyncLLMOwner, StateEngine):
    """vLLM `AsyncLLM` with the pooling runner on a trunk folder, in this process (engine core in a child).

    float32 by default, on every machine: the heads were fitted on float32 states, and bfloat16 (vLLM's choice
    on CPUs with native bf16) moves the pooled states by ~1e-2, enough to shift P(yes) by more than 1e-3. A
    15-layer 135M trunk costs little in float32; for a large trunk on GPU pass dtype="bfloat16" and fit the
    heads on states of that dtype.
    """

    engine_name = "the heads engine"
    error_type = GradingError

    def __init__(self, trunk: str | Path, *, model_id: str | None = None, model_hash: str | None = None,
                 max_model_len: int = 4096, max_num_seqs: int = 64, dtype: str = "float32",
                 enforce_eager: bool = True, gpu_memory_utilization: float | None = None,
                 engine_kwargs: dict[str, Any] | None = None):
        try:
            from vllm import AsyncEngineArgs
            from vllm.config import PoolerConfig
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise GradingError(f"vLLM is not installed: {exc}") from exc
        from rbr_model import models
        from rbr_model.grading.vllm_engine import cpu_engine_env

        machine_args = cpu_engine_env()
        self.path = str(trunk)
        self.model_hash = model_hash or models.model_hash(trunk)
        self.model_id = model_id or Path(self.path.rstrip("/")).name
        self.max_model_len = max_model_len
        self.dtype = dtype
        kwargs: dict[str, Any] = dict(
            model=self.path, runner="pooling",
            # Per-token states as the model computes them: no activation, no normalisation of the vectors.
            pooler_config=PoolerConfig(task="token_embed", use_activation=False),
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
            dtype=dtype, enable_prefix_caching=False, disable_log_stats=True,
        )
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(machine_args)
        kwargs.update(engine_kwargs or {})
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        except Exception as exc:
            raise GradingError(f"could not start vLLM's pooling runner on {self.path}: {exc}") from exc
        self.tokenizer = self._llm.get_tokenizer()
        self.hidden_size = int(self._llm.model_config.get_hidden_size())
        self._closed = False
        self._ids = itertools.count()
        self._prefix = f"rbr-heads-{uuid.uuid4().hex[:8]}-{os.getpid()}"

    async def _one(self, inp: HeadInput) -> np.ndarray:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        final = None
        try:
            async for out in self._llm.encode(TokensPrompt(prompt_token_ids=list(inp.ids)),
                                              PoolingParams(task="token_embed"), f"{self._prefix}-{next(self._ids)}"):
                final = out
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._failure(exc) from exc
        if final is None:
            raise GradingError("vLLM returned no hidden states")
        return final.outputs.data.float().numpy()

    async def token_states(self, inputs: Sequence[HeadInput]) -> list[np.ndarray]:
        self._check_open()
        _check_ids(inputs, self.max_model_len)
        return await gather_or_cancel(self._one(inp) for inp in inputs)


class RemoteStateEngine(HTTPClientOwner, StateEngine):
    """A vLLM server running the trunk with `--runner pooling` (its `/pooling` endpoint, task `token_embed`).

    `trunk` is a local copy of the served trunk folder: its tokenizer builds the inputs and its hash is what
    heads are checked against (the server cannot prove which weights it loaded). `batch_size`: inputs the grader
    sends in one `/pooling` request (one HTTP round trip and one server batch instead of one per completion).
    """

    def __init__(self, base_url: str, trunk: str | Path, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_model_len: int = 4096, client: httpx.AsyncClient | None = None,
                 batch_size: int = 32):
        import json

        from transformers import AutoTokenizer

        from rbr_model import models

        self.base_url = base_url.rstrip("/")
        self.tokenizer = AutoTokenizer.from_pretrained(str(trunk))
        self.model_hash = models.model_hash(trunk)
        self.model_id = Path(str(trunk).rstrip("/")).name
        self.model = model
        self.max_model_len = max_model_len
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.dtype = "float32"  # what the server is asked to return; its compute dtype is the server's setting
        self.hidden_size = int(json.loads((Path(trunk) / "config.json").read_text())["hidden_size"])
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)
        self._closed = False

    async def token_states(self, inputs: Sequence[HeadInput]) -> list[np.ndarray]:
        if self._closed:
            raise GradingError("the remote heads engine is closed")
        _check_ids(inputs, self.max_model_len)
        if not inputs:
            return []
        body = {"input": [list(inp.ids) for inp in inputs], "task": "token_embed", "add_special_tokens": False,
                "encoding_format": "base64", "embed_dtype": "float32", "endianness": "little"}
        if self.model:
            body["model"] = self.model
        try:
            resp = await self._client.post("/pooling", json=body)
        except httpx.TimeoutException as exc:
            raise GradingError(f"POST {self.base_url}/pooling timed out: {exc}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise GradingError(f"POST {self.base_url}/pooling failed: {exc!r}", retryable=True) from exc
        if resp.status_code != 200:
            raise GradingError(f"POST {self.base_url}/pooling answered {resp.status_code}: {resp.text[:300]}",
                               retryable=resp.status_code >= 500 or resp.status_code == 429)
        try:
            data = sorted(resp.json()["data"], key=lambda d: d["index"])
            out = []
            for inp, d in zip(inputs, data, strict=True):
                raw = d["data"]
                arr = (np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str)
                       else np.asarray(raw, dtype=np.float32))
                out.append(arr.reshape(len(inp.ids), self.hidden_size))
        except (KeyError, TypeError, ValueError) as exc:
            raise GradingError(f"POST {self.base_url}/pooling: unexpected answer: {exc}") from exc
        return out
