"""In-process vLLM grader engine (`AsyncLLM`): the same code on GPU and CPU.

Each judgment is one generated token at temperature 0, restricted to the yes/no tokens (`allowed_token_ids`),
with `logprob_token_ids` asking for the log-probability of every yes/no token. vLLM's default logprobs mode is
`raw_logprobs`: values from before the mask, so P(yes) is the yes share of the yes/no mass (the mask would only
rescale both sides by the same factor) and the mass itself says how much the model wanted to answer yes or no
at all. With `processed_logprobs` the mask would renormalise the mass to 1 and hide that signal.

vLLM starts a separate engine-core process, so scripts that build a `VLLMEngine` need an
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rbr_model.aio import gather_or_cancel
from rbr_model.grading.engine import Engine, GradingError, Judgment, judgment_from_logprobs
from rbr_model.grading.prompts import discover_yes_no_ids, tokenizer_encoder
from rbr_model.lifecycle import AsyncLLMOwner

log = logging.getLogger(__name__)


def _on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def default_dtype() -> str:
    """bfloat16 only where the hardware computes it natively; on other CPUs it is emulated and ~4x slower.

    Measured on a Xeon with AVX-512 but no AVX512_BF16/AMX (SmolLM2-135M): bfloat16 ~120 prompt tokens/s, float32
    ~480 tokens/s. Dev VMs differ: some have native bf16 and then run bfloat16 (benchmarks/RESULTS.md says which).
    """
    if _on_gpu():
        return "auto"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


# Prefix-cache hits are whole KV blocks. vLLM's CPU backend defaults to 128-token blocks, so up to 127 shared
# tokens are recomputed per judgment; 32 is the smallest its attention accepts and measured 3.73x vs 3.19x over the
# naive grader (benchmarks/RESULTS.md), with identical probabilities. GPU backends keep their own default.
CPU_BLOCK_SIZE = 32


# What vLLM's default message queues take of /dev/shm per CPU engine (rbr_model/grading/small_shm.py), times the
# three engines one process may run (grader, heads trunk, RM). Below it, the queues are shrunk.
DEFAULT_QUEUES_SHM_BYTES = 3 * 10 * (16 + 24) * 1024 * 1024
SMALL_SHM_CHUNK_MB = "1"
SMALL_SHM_EXTENSION = "rbr_model.grading.small_shm.SmallShmQueues"
_small_shm_warned = False


def cpu_engine_env(shm_path: str = "/dev/shm") -> dict[str, Any]:
    """Environment defaults for vLLM's CPU backend on small machines; never overrides a setting. Returns the
    engine arguments the machine calls for (merged before the caller's own).

    vLLM reserves one core for its scheduler by default, which halves the compute threads on 2 cores; letting the
    worker use every core gives it both (the scheduler is mostly idle while the worker computes).
    The KV cache size default fails vLLM's memory check on small machines, so 1 GiB unless set.
    No torch.compile unless asked (TORCHDYNAMO_DISABLE=0): see below.
    A /dev/shm smaller than the default queues need (Docker's 64 MiB without `--shm-size`): 1 MiB chunks.
    """
    if _on_gpu():
        return {}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if 0 < len(cpus) <= 4:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM wraps a few sampler helpers in torch.compile even with enforce_eager; on the CPU, Inductor then needs
    # g++, Python headers and an executable /tmp at the first logprobs request, which slim images and hardened
    # containers lack. Eager: no compile pause, no consistent speed difference (benchmarks/RESULTS.md); =0 compiles.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    return small_shm_engine_args(shm_path)


def small_shm_engine_args(shm_path: str = "/dev/shm") -> dict[str, Any]:
    """Shrink vLLM's shared-memory queues where /dev/shm cannot hold the defaults; otherwise nothing.

    Messages over a chunk then go through vLLM's socket instead of shared memory (measured in
    benchmarks/RESULTS.md, "Without --shm-size"). `VLLM_MQ_MAX_CHUNK_BYTES_MB`, when set, is kept.
    """
    global _small_shm_warned
    try:
        free = shutil.disk_usage(shm_path).free
    except OSError:  # no /dev/shm at all: vLLM skips its own check too
        return {}
    if free >= DEFAULT_QUEUES_SHM_BYTES:
        return {}
    os.environ.setdefault("VLLM_MQ_MAX_CHUNK_BYTES_MB", SMALL_SHM_CHUNK_MB)
    if not _small_shm_warned:
        _small_shm_warned = True
        log.warning("%s has %d MiB free, less than vLLM's default queues need (%d MiB): using %s MiB chunks "
                    "(VLLM_MQ_MAX_CHUNK_BYTES_MB); larger messages go through a socket. For full speed give the "
                    "container more shared memory (--shm-size 2g).", shm_path, free >> 20,
                    DEFAULT_QUEUES_SHM_BYTES >> 20, os.environ["VLLM_MQ_MAX_CHUNK_BYTES_MB"])
    return {"worker_extension_cls": SMALL_SHM_EXTENSION}


class VLLMEngine(AsyncLLMOwner, Engine):
    """A vLLM `AsyncLLM` in this process (its engine core runs in a child process it manages).

    Building it loads the model and blocks for a while (~25 s for the embedded model on CPU). Use it from one
    event loop: vLLM binds its output handler to the loop of the first request.
    """

    engine_name = "the grader engine"
    error_type = GradingError

    def __init__(
        self,
        model: str | Path,
        *,
        model_id: str | None = None,
        max_model_len: int = 4096,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = True,
        dtype: str | None = None,
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        """`enforce_eager=True` by default: on CPU, compiling costs ~90 s per start for a few percent speed.
        On GPU pass `enforce_eager=False` to get CUDA graphs. `engine_kwargs` go to `AsyncEngineArgs` as is.
        """
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise GradingError(f"vLLM is not installed: {exc}") from exc

        machine_args = cpu_engine_env()  # before the engine core is spawned: it inherits the environment
        self.model_path = str(model)
        self.model_id = model_id or Path(self.model_path.rstrip("/")).name
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.dtype = dtype or default_dtype()
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            dtype=self.dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="raw_logprobs",  # vLLM's default, stated: the yes/no mass needs unmasked values
            disable_log_stats=False,
        )
        if max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if enable_prefix_caching and not _on_gpu():
            kwargs["block_size"] = CPU_BLOCK_SIZE
        kwargs.update(machine_args)
        kwargs.update(engine_kwargs or {})
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        except Exception as exc:
            raise GradingError(f"could not start vLLM for {self.model_path}: {exc}") from exc
        self.tokenizer = self._llm.get_tokenizer()
        self.yes_ids, self.no_ids = discover_yes_no_ids(tokenizer_encoder(self.tokenizer))
        self._answer_ids = [*self.yes_ids, *self.no_ids]
        self._closed = False
        self._ids = itertools.count()
        self._prefix = f"rbr-{uuid.uuid4().hex[:8]}-{os.getpid()}"

    # ---- internals ------------------------------------------------------------------------------------
    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise GradingError(f"a prompt must be a string, got {type(prompt).__name__}")
        # The prompt was rendered with the chat template and already carries its special tokens.
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) + 1 > self.max_model_len:
            raise GradingError(
                f"prompt has {len(ids)} tokens; the grader's context is {self.max_model_len} (one is needed "
                "for the answer)"
            )
        return ids

    async def _run(self, ids: list[int], params: Any) -> Any:
        from vllm.inputs import TokensPrompt

        request_id = f"{self._prefix}-{next(self._ids)}"
        final = None
        try:
            async for out in self._llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id):
                final = out
        except asyncio.CancelledError:
            raise
        except GradingError:
            raise
        except Exception as exc:
            raise self._failure(exc) from exc
        if final is None or not final.outputs:
            raise GradingError("vLLM returned no output")
        return final

    # ---- Engine ---------------------------------------------------------------------------------------
    async def grade(self, prompts: Sequence[str]) -> list[Judgment]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_open()
        encoded = [self._encode(p) for p in prompts]
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=self._answer_ids,
            logprob_token_ids=self._answer_ids,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        outs = await gather_or_cancel([self._run(ids, params) for ids in encoded])
        return [self._judgment(out) for out in outs]

    def _judgment(self, out: Any) -> Judgment:
        logprobs = out.outputs[0].logprobs
        if not logprobs:
            raise GradingError("vLLM returned no log-probabilities for the answer token")
        step = logprobs[0]
        values = {int(t): float(lp.logprob) for t, lp in step.items()}
        return judgment_from_logprobs(
            values,
            self.yes_ids,
            self.no_ids,
            prompt_tokens=len(out.prompt_token_ids or ()),
            cached_tokens=out.num_cached_tokens,
        )

    async def generate(
        self, prompts: Sequence[str], max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None
    ) -> list[str]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._check_open()
        encoded = [self._encode(p) for p in prompts]
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                seed=None if seed is None else seed + i,  # distinct but reproducible per prompt
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            for i in range(len(encoded))
        ]
        outs = await gather_or_cancel([self._run(ids, p) for ids, p in zip(encoded, params, strict=True)])
        return [out.outputs[0].text for out in outs]
