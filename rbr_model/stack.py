"""One builder for the grading stack: the grader engine, the heads and the engine that runs their trunk, the
`Grader`, and the reward-model engine, all from one `StackSettings`.

Why one: `rbr serve`, `rbr eval`, `rbr synth` and `rbr heads` wired these by hand, and the copies drifted (`auto`
heads read two ways, the trunk chosen in three places). Now a command translates its flags into a `StackSettings`
and the service its RBR_* variables (`service.settings.Settings.stack`); what they mean is decided here only.

    settings = StackSettings(heads="auto", rm_engine="none")
    async with await build_stack(settings, policy) as stack:
        probs = await stack.grader.grade(items)

A stack closes only the engines it built; engines handed to `build_stack` stay the caller's. `unhealthy` and
`gone` ask every engine it holds (readiness and liveness read them). Heavy modules (vLLM, transformers) load only
when an engine that needs them is built.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rbr_model.lifecycle import EngineLifecycle
from rbr_model.rm import RM_KINDS

if TYPE_CHECKING:
    from rbr_model.grading.engine import Engine
    from rbr_model.grading.grader import Grader
    from rbr_model.grading.states import StateEngine
    from rbr_model.heads import Heads
    from rbr_model.policy import Policy
    from rbr_model.rm import RMEngine

log = logging.getLogger("rbr.stack")

ENGINE_KINDS = ("vllm", "remote")
GPU_FRACTIONS = {"grader": "gpu_memory_utilization", "heads": "heads_gpu_memory_utilization",
                 "rm": "rm_gpu_memory_utilization"}
GRADER_FIELDS = {"calibration_path", "grader_layout", "max_engine_requests"}  # what make_grader reads, no engine


@dataclass(frozen=True)
class StackSettings:
    """Everything that decides which engines, heads and grader are built (the service's RBR_* names, lower case).

    The GPU fractions are vLLM's share of the whole card per in-process engine; they apply on GPU only.
    """

    engine: str = "vllm"  # vllm: in process; remote: an OpenAI-compatible vLLM server at remote_url
    grader_model: str | None = None  # None: the embedded model (prepared on first use)
    remote_url: str | None = None
    remote_model: str | None = None  # None: ask the server
    remote_api_key: str | None = field(default=None, repr=False)  # a secret: never printed
    remote_timeout_s: float = 60.0  # one HTTP request to a remote grading server (grader or heads' pooling)
    max_model_len: int = 4096
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    heads: str = "auto"  # a heads file, none, or auto (see choose_heads)
    heads_trunk: str | None = None  # None: the embedded model's trunk at the heads' layer
    heads_url: str | None = None  # engine=remote: a vLLM pooling server running the trunk
    heads_gpu_memory_utilization: float = 0.05
    grader_layout: str = "proposition_first"
    calibration_path: str | None = None
    max_engine_requests: int = 256
    rm_engine: str = "none"  # none, vllm (rm_model in process) or remote (rm_url)
    rm_model: str | None = None  # rm_engine=vllm: None is the embedded helpful-only RM (prepared on first use)
    rm_url: str | None = None
    rm_api_key: str | None = field(default=None, repr=False)  # a secret: never printed
    rm_gpu_memory_utilization: float = 0.1

    @classmethod
    def from_values(cls, values: Any) -> StackSettings:
        """The fields of this class read by name from any object that has them (e.g. the service's settings)."""
        return cls(**{f.name: getattr(values, f.name) for f in fields(cls) if hasattr(values, f.name)})

    def in_process(self) -> list[str]:
        """The engines this process runs on its own accelerator: grader, heads, rm (those that may be built)."""
        engines = ["grader"] if self.engine == "vllm" else []
        # auto heads are only for the embedded grader (choose_heads); a file always runs its trunk
        if self.engine == "vllm" and self.heads != "none" and not (self.heads == "auto" and self.grader_model):
            engines.append("heads")
        if self.rm_engine == "vllm":
            engines.append("rm")
        return engines

    def problems(self, name: Callable[[str], str] = str) -> list[str]:
        """What cannot work, one line each, naming settings through `name` (the service: RBR_*; a command: flags).
        Checked before anything starts, so a bad combination fails at once instead of as a 503 later."""
        out = []
        if self.engine not in ENGINE_KINDS:
            out.append(f"{name('engine')}: {self.engine!r} is not one of {', '.join(ENGINE_KINDS)}")
        if self.rm_engine not in RM_KINDS:
            out.append(f"{name('rm_engine')}: {self.rm_engine!r} is not one of {', '.join(RM_KINDS)}")
        if self.engine == "remote" and not self.remote_url:
            out.append(f"{name('remote_url')} is required with {name('engine')}=remote")
        if self.engine == "remote" and self.heads not in ("none", "auto") and not (self.heads_url and self.heads_trunk):
            out.append(f"heads with {name('engine')}=remote need {name('heads_url')} and {name('heads_trunk')} (a "
                       f"local copy of the served trunk); or set {name('heads')}=none")
        if self.rm_engine == "remote" and not self.rm_url:
            out.append(f"{name('rm_url')} is required with {name('rm_engine')}=remote")
        shares = [(GPU_FRACTIONS[e], getattr(self, GPU_FRACTIONS[e])) for e in self.in_process()]
        if round(sum(v for _, v in shares), 9) > 1:
            out.append(" + ".join(f"{name(k)} ({v})" for k, v in shares) + " exceed 1: the in-process engines "
                       "share one GPU")
        return out

    def check(self) -> StackSettings:
        """Self, or ValueError listing every problem."""
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---- heads and trunk: one reading ----------------------------------------------------------------------------
def choose_heads(settings: StackSettings, policy: Policy) -> Heads | None:
    """The heads to grade with, or None. `auto` takes the packaged heads only where they fit (the packaged policy
    and the embedded grader in process) and quietly grades by prompt otherwise; a file must fit or it is an error
    (`HeadsError` naming file and field)."""
    from rbr_model.heads import Heads, HeadsError, packaged_heads_path

    if settings.heads == "none":
        return None
    if settings.heads == "auto":
        if settings.grader_model or settings.engine == "remote" or not packaged_heads_path().is_file():
            return None
        heads = Heads.load(packaged_heads_path())
        try:
            heads.check_policy(policy)
        except HeadsError:
            log.info("packaged heads are for the default policy; %s is graded by prompts only", policy.name)
            return None
        return heads
    heads = Heads.load(settings.heads)
    heads.check_policy(policy)
    return heads


def trunk_for(settings: StackSettings, layer: int) -> Path:
    """The trunk folder the heads of `layer` run on: `heads_trunk`, else the embedded model's (cut once)."""
    from rbr_model import models

    return Path(settings.heads_trunk) if settings.heads_trunk else models.prepare_trunk(layer)


def check_heads(settings: StackSettings, policy: Policy) -> Heads | None:
    """`choose_heads`, and the trunk they will run on prepared and checked against them: what `rbr serve` checks
    before it starts, so a bad heads file or trunk is one line, not a 503 later."""
    from rbr_model import models

    heads = choose_heads(settings, policy)
    if heads is not None:
        trunk = trunk_for(settings, int(heads.grader["layer"]))
        heads.check_model(trunk.name, models.model_hash(trunk))
    return heads


# ---- engines -------------------------------------------------------------------------------------------------
def build_engine(settings: StackSettings) -> Engine:
    """The grader engine (blocking: an in-process one loads the model)."""
    from rbr_model import models

    model = settings.grader_model or str(models.prepare())
    if settings.engine == "remote":
        from rbr_model.grading.remote_engine import RemoteEngine

        # The chat template comes from a local copy of the grader's tokenizer (same model as the server's).
        return RemoteEngine(str(settings.remote_url), model=settings.remote_model, tokenizer=model,
                            api_key=settings.remote_api_key, timeout=settings.remote_timeout_s)
    from rbr_model.grading.vllm_engine import VLLMEngine

    return VLLMEngine(model, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                      enable_prefix_caching=settings.enable_prefix_caching, enforce_eager=settings.enforce_eager,
                      gpu_memory_utilization=settings.gpu_memory_utilization)


def build_state_engine(settings: StackSettings, trunk: str | Path) -> StateEngine:
    """The engine that runs a trunk (`trunk_for`): vLLM's pooling runner in process, or with engine=remote a
    pooling server at heads_url, `trunk` being the local copy of what it serves (blocking)."""
    if settings.engine == "remote":
        from rbr_model.grading.states import RemoteStateEngine

        return RemoteStateEngine(str(settings.heads_url), trunk, api_key=settings.remote_api_key,
                                 max_model_len=settings.max_model_len, timeout=settings.remote_timeout_s)
    from rbr_model.grading.states import VLLMStateEngine
    from rbr_model.grading.vllm_engine import _on_gpu

    return VLLMStateEngine(trunk, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                           enforce_eager=settings.enforce_eager,
                           gpu_memory_utilization=settings.heads_gpu_memory_utilization if _on_gpu() else None)


def build_rm(settings: StackSettings, **extra: Any) -> RMEngine | None:
    """The reward-model engine, or None for rm_engine=none (blocking). `extra` goes to the engine (a test's
    `transport`)."""
    from rbr_model.rm import build_rm_engine

    return build_rm_engine(settings.rm_engine, settings.rm_model, settings.rm_url,
                           max_model_len=settings.max_model_len,
                           gpu_memory_utilization=settings.rm_gpu_memory_utilization,
                           api_key=settings.rm_api_key, **extra)


# ---- the stack -----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class GradingStack:
    """The engines of one process and the grader over them. `grader` grades for the policy it was built for;
    `grader_for` makes another (a reload) on the same engines."""

    settings: StackSettings
    engine: Engine
    grader: Grader
    heads: Heads | None = None
    state_engine: StateEngine | None = None
    rm_engine: RMEngine | None = None
    owned: list[EngineLifecycle] = field(default_factory=list)  # what build_stack opened: close() closes these

    def engines(self) -> dict[str, EngineLifecycle]:
        """Every engine held, by the name messages use."""
        named = {"the grader engine": self.engine, "the heads engine": self.state_engine,
                 "the reward model engine": self.rm_engine}
        return {k: v for k, v in named.items() if v is not None}

    def grader_for(self, policy: Policy, heads: Heads | None) -> Grader:
        """A grader for `policy` (and `heads`, which need the heads engine) on this stack's engines."""
        from rbr_model.heads import HeadsError

        if heads is not None and self.state_engine is None:
            raise HeadsError(f"{heads.source}: no heads engine runs here (it was built without heads)")
        return make_grader(self.settings, self.engine, policy, heads, self.state_engine)

    def grader_with(self, **changes: Any) -> Grader:
        """This stack's grader with other grader-level settings (calibration, layout, in-flight bound) on the same
        engines: `rbr eval grader` compares the fingerprints with and without the calibration it fits."""
        unknown = set(changes) - GRADER_FIELDS
        if unknown:
            raise ValueError(f"{sorted(unknown)} change the engines, not the grader: build another stack")
        return make_grader(replace(self.settings, **changes), self.engine, self.grader.policy, self.heads,
                           self.state_engine)

    async def unhealthy(self) -> list[str]:
        """The engines that cannot take work now (readiness); never raises."""
        return [name for name, ok in zip(self.engines(), await _ask(self.engines().values(), "health"), strict=True)
                if not ok]

    async def gone(self) -> list[str]:
        """The engines that will never serve again in this process: only a restart helps (liveness)."""
        return [name for name, dead in zip(self.engines(), await _ask(self.engines().values(), "gone"), strict=True)
                if dead]

    async def close(self) -> None:
        """Close what this stack opened, last built first; engines handed in stay open."""
        await _close_all(self.owned)
        self.owned.clear()

    async def __aenter__(self) -> GradingStack:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _ask(engines: Any, question: str) -> list[bool]:
    async def one(engine: EngineLifecycle) -> bool:
        try:
            return bool(await getattr(engine, question)())
        except Exception:  # noqa: BLE001 - a check that raises: unhealthy, not gone (it may answer later)
            return False

    return list(await asyncio.gather(*(one(e) for e in engines)))


async def _close_all(engines: list[EngineLifecycle]) -> None:
    for engine in reversed(engines):
        try:
            await engine.close()
        except Exception as exc:  # noqa: BLE001 - closing the others matters more
            log.warning("closing %s failed: %s: %s", engine.engine_name, type(exc).__name__, exc)


def make_grader(settings: StackSettings, engine: Engine, policy: Policy, heads: Heads | None = None,
                state_engine: StateEngine | None = None) -> Grader:
    """A `Grader` with the settings' calibration, layout and in-flight bound."""
    from rbr_model.grading.grader import Grader

    calibration = None
    if settings.calibration_path:
        from rbr_model.calibration import Calibration

        calibration = Calibration.load(settings.calibration_path)
    return Grader(engine, policy, calibration=calibration, max_in_flight=settings.max_engine_requests,
                  layout=settings.grader_layout,  # type: ignore[arg-type]
                  heads=heads if state_engine is not None else None, state_engine=state_engine)


async def build_stack(settings: StackSettings, policy: Policy, *, engine: Engine | None = None,
                      state_engine: StateEngine | None = None, rm_engine: RMEngine | None = None,
                      offload: bool = False) -> GradingStack:
    """Build and start what the settings ask for (engines passed in are used as they are and never closed), and
    the grader for `policy`. On any failure what was built is closed again and the error raised (`HeadsError`,
    `GradingError`, `RMError`, `ModelError`, `ValueError` for bad settings).

    `offload`: build the blocking parts in a worker thread, so the caller's event loop keeps answering (the
    service's probes); a command builds them on its own thread.
    """
    settings.check()

    async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args) if offload else fn(*args)

    heads = await blocking(choose_heads, settings, policy)
    owned: list[EngineLifecycle] = []
    try:
        if engine is None:
            engine = await blocking(build_engine, settings)
            owned.append(engine)
            await engine.start()
        if heads is not None and state_engine is None:
            trunk = await blocking(trunk_for, settings, int(heads.grader["layer"]))
            state_engine = await blocking(build_state_engine, settings, trunk)
            owned.append(state_engine)
            await state_engine.start()
        if rm_engine is None and settings.rm_engine != "none":
            rm_engine = await blocking(build_rm, settings)
            if rm_engine is not None:
                owned.append(rm_engine)
                await rm_engine.start()
        grader = make_grader(settings, engine, policy, heads, state_engine)
    except BaseException:
        await _close_all(owned)
        raise
    return GradingStack(settings, engine, grader, heads=heads if state_engine is not None else None,
                        state_engine=state_engine, rm_engine=rm_engine, owned=owned)
