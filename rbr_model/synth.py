"""Synthetic comparison data for fitting RBR weights.

The recipe follows the RBR paper: for each prompt, and each completion label its response type defines
(`rbr_model/data/labels.yaml`: an ideal refusal, a judgemental one, full compliance, an off-topic reply ...),
a *behaviour policy* is asked to write completions of that kind; the grader turns each completion into
features; an optional reward model adds `rm_score`. The rows then feed `rbr fit`, which learns weights that
rank the labels the way `orderings.yaml` says.

How it works here:

* The behaviour policy is any `Engine` (`Engine.generate`), by default the grader's own engine. Its prompt is
  the label's instruction as a system message, then the user conversation, rendered with the model's chat
  template. Sampling is seeded per (prompt, label, sample, attempt), so a run is reproducible, except on
  vLLM's CPU backend, which cannot take per-request seeds (see `engine_takes_seeds`).
* Each completion is graded on every proposition its response type needs (`Grader.grade`), and the features
  come from `FeatureSpec`, exactly as the service computes them.
* Optional filtering (`reject_contradictions`): a completion whose most likely class is not one that its
  target label can honestly land in (`EXPECTED_CLASSES`) is rejected and sampled again, at most
  `max_resamples` times. Texts already produced for the same prompt (under any label) and empty texts are
  rejected and resampled the same way, so no prompt holds two identical completions.
* Output folder: `completions.jsonl` is the log of every attempt (text, seed, status, class probabilities,
  features); `rows.jsonl`, the fitter's input, is rebuilt from it at the end of every run (accepted
  attempts only); `synth.json` records what made the data (policy, grader, reward model, settings per run).
* Resuming: a (prompt, label, sample) key is done once it has an accepted attempt, or has used up its
  attempts. A second run on the same folder only does the keys that are not done, and refuses a folder made
  with another policy, grader or reward model (their features or scores would not mix).
* Work runs concurrently (`concurrency` keys at a time); the engine batches whatever is in flight.

Harmful material: the label instructions for the disallowed labels ask for bracketed placeholders instead of
real content, and the grader's policy examples treat such a placeholder as the material itself. Pass
`store_text=False` to keep only a hash of each completion in `completions.jsonl`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rbr_model.aio import gather_or_cancel
from rbr_model.features import CLASS_PREFIX, FeatureSpec
from rbr_model.grading.engine import Engine
from rbr_model.grading.grader import Grader
from rbr_model.policy import Policy, load_policy
from rbr_model.prompt_set import (  # noqa: F401 - synth's inputs, importable from here as before
    SPLITS,
    SynthError,
    SynthPrompt,
    check_expectations,
    default_labels_path,
    default_prompts_path,
    default_split_path,
    load_expectations,
    load_labels,
    load_prompt_split,
    load_prompts,
    policy_response_type,
)

COMPLETIONS_FILE = "completions.jsonl"
ROWS_FILE = "rows.jsonl"
META_FILE = "synth.json"
FORMAT_VERSION = 1

ACCEPTED, REJECTED, DUPLICATE, EMPTY = "accepted", "rejected", "duplicate", "empty"

GENERATION_SYSTEM = (
    "You are writing one example reply for a collection of sample assistant answers. Continue the conversation "
    "below as the assistant, and make your reply fit this description:\n\n{instruction}\n\n"
    "Write only the reply itself. Do not mention this description or say that the reply is an example."
)

# For each target label: the classes (of the policy's class order) that a completion honestly written to the
# label's instruction can fall in. `reject_contradictions` rejects a completion whose most likely class is
# outside the set. The sets are deliberately loose (a flawed refusal may or may not have an apology, so it can
# be minimum_acceptable_style or unacceptable_completion): the filter removes clear contradictions, such as a
# "disallowed" completion that the grader calls ideal, not every disagreement with a noisy grader.
_GOOD = frozenset({"ideal", "minimum_acceptable_style"})
_FLAWED = frozenset({"minimum_acceptable_style", "unacceptable_completion"})
_UNACCEPTABLE = frozenset({"unacceptable_completion"})
_OFF_TOPIC = frozenset({"illogical_completion", "unacceptable_completion"})
_HARMFUL = frozenset({"disallowed_completion", "unacceptable_completion"})
EXPECTED_CLASSES: dict[str, dict[str, frozenset[str]]] = {
    "hard_refuse": {
        "ideal_refusal": _GOOD,
        "refusal_with_judgement": _FLAWED,
        "refusal_lecturing_policy": _FLAWED,
        "refusal_extra_content": _FLAWED,
        "partial_compliance": _FLAWED | {"disallowed_completion"},
        "disallowed_compliance": _HARMFUL,
        "off_topic": _OFF_TOPIC,
    },
    "safe_refuse": {
        "ideal_safe_response": _GOOD,
        "safe_response_cold": _FLAWED,
        "safe_response_judgemental": _FLAWED,
        "safe_response_prescriptive": _FLAWED,
        "refusal_without_support": _UNACCEPTABLE,
        "harmful_compliance": _HARMFUL,
        "off_topic": _OFF_TOPIC,
    },
    "comply": {
        "ideal_compliance": _GOOD,
        "compliance_with_meta_commentary": _FLAWED,
        "compliance_with_moralising": _FLAWED,
        "partial_compliance": _UNACCEPTABLE,
        "unnecessary_refusal": _UNACCEPTABLE,
        "off_topic": _OFF_TOPIC,
    },
}


# ---- small pure pieces ------------------------------------------------------------------------------------


def generation_messages(instruction: str, conversation: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The behaviour policy's chat: the label's instruction as the system message, then the conversation.

    A system message already in the conversation is folded into ours (chat templates allow only one).
    """
    system = GENERATION_SYSTEM.format(instruction=instruction.strip())
    rest = []
    for m in conversation:
        if m["role"] == "system":
            system += f"\n\nThe assistant in this conversation was also told: {m['content']}"
        else:
            rest.append({"role": m["role"], "content": m["content"]})
    return [{"role": "system", "content": system}, *rest]


def render_generation_prompt(tokenizer: Any, instruction: str, conversation: Sequence[Mapping[str, str]]) -> str:
    """`generation_messages` in the model's chat template, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template(
        generation_messages(instruction, conversation), tokenize=False, add_generation_prompt=True
    )


def sample_seed(base: int, prompt_id: str, label: str, sample: int, attempt: int) -> int:
    """A sampling seed for one attempt, stable across runs and independent of batching (31 bits)."""
    blob = f"{base}\x1f{prompt_id}\x1f{label}\x1f{sample}\x1f{attempt}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def completion_hash(text: str) -> str:
    """Identity of a completion for de-duplication: whitespace runs collapsed, ends stripped."""
    return hashlib.sha256(re.sub(r"\s+", " ", text).strip().encode()).hexdigest()


def top_class(class_probs: Mapping[str, float]) -> str | None:
    """The most likely class (the first in order on a tie); None when there is no mass at all."""
    best, best_p = None, 0.0
    for name, p in class_probs.items():
        if p > best_p:
            best, best_p = name, p
    return best


def contradicts(class_probs: Mapping[str, float], expected: Collection[str] | None) -> bool:
    """True when the most likely class is not one the target label allows; never without an expectation."""
    if not expected:
        return False
    return top_class(class_probs) not in expected


def engine_takes_seeds(engine: Any) -> bool:
    """Whether per-request sampling seeds are safe with this engine.

    vLLM's CPU worker dies on a seeded request whose prompt is prefilled in more than one chunk: it rewinds
    the request's random generator with `set_offset`, which CPU generators do not have ("CPU Generator does
    not use offset", vllm/v1/worker/gpu_model_runner.py `_bookkeeping_sync`). An in-process vLLM engine
    without CUDA therefore samples unseeded (not reproducible); every other engine gets seeds.
    """
    from rbr_model.grading.vllm_engine import VLLMEngine

    if not isinstance(engine, VLLMEngine):
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def key_of(prompt_id: str, label: str, sample: int) -> str:
    return f"{prompt_id}|{label}|{sample}"


# ---- configuration and result ---------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """Settings of one run. `max_resamples`: extra attempts per key after a rejected or duplicate one."""

    samples: int = 2
    max_tokens: int = 128
    temperature: float = 0.8
    seed: int = 0
    reject_contradictions: bool = False
    max_resamples: int = 2
    concurrency: int = 32
    store_text: bool = True
    seeded: bool | None = None  # per-attempt sampling seeds; None: on unless the engine cannot take them


    def check(self) -> None:
        for name in ("samples", "max_tokens", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SynthError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.max_resamples, int) or self.max_resamples < 0:
            raise SynthError(f"max_resamples: expected an integer >= 0, got {self.max_resamples!r}")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise SynthError(f"temperature: expected a number in [0, 5], got {self.temperature!r}")


@dataclass
class SynthResult:
    out_dir: Path
    n_prompts: int = 0
    n_keys: int = 0  # (prompt, label, sample) keys asked for
    n_done_before: int = 0  # of those, already done by an earlier run
    n_generations: int = 0  # completions sampled in this run
    n_judgments: int = 0  # distinct grading prompts sent to the engine in this run
    n_accepted: int = 0
    n_rejected: int = 0  # contradicted their label
    n_duplicates: int = 0
    n_empty: int = 0
    n_exhausted: int = 0  # keys that used up their attempts without an accepted completion (this run)
    n_rows: int = 0  # rows in rows.jsonl after the run (all runs)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        return out


# ---- the output folder ------------------------------------------------------------------------------------


def read_completions(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of `completions.jsonl`. A truncated last line (a run killed mid-write) is dropped, and with
    `repair` also cut from the file; a bad line anywhere else is an error."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    pos = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        if line.strip():
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or "key" not in obj:
                    raise ValueError("not a completion record")
            except ValueError as exc:
                if any(rest.strip() for rest in lines[i + 1:]):
                    raise SynthError(f"{path}:{i + 1}: not a completion record: {exc}") from None
                if repair:  # the last record was cut short: drop it so the next append starts clean
                    with open(path, "r+b") as fh:
                        fh.truncate(pos)
                break
            records.append(obj)
        pos += len(line) + 1
    else:
        if repair and raw and not raw.endswith(b"\n"):  # a whole record but no newline: finish the line
            with open(path, "ab") as fh:
                fh.write(b"\n")
    return records


def row_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """A completion record as a fitter row."""
    return {
        "prompt_id": record["prompt_id"],
        "response_type": record["response_type"],
        "completion_label": record["completion_label"],
        "rm_score": float(record.get("rm_score") or 0.0),
        "features": dict(record["features"]),
    }


def write_rows(out_dir: str | Path, records: Sequence[Mapping[str, Any]] | None = None) -> int:
    """Rebuild `rows.jsonl` from the accepted records (atomically); returns the number of rows."""
    out_dir = Path(out_dir)
    if records is None:
        records = read_completions(out_dir / COMPLETIONS_FILE)
    accepted = [r for r in records if r.get("status") == ACCEPTED]
    accepted.sort(key=lambda r: (str(r["prompt_id"]), r["completion_label"], int(r["sample"]), int(r["attempt"])))
    tmp = out_dir / f".{ROWS_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in accepted:
            fh.write(json.dumps(row_of(r), sort_keys=False) + "\n")
    os.replace(tmp, out_dir / ROWS_FILE)
    return len(accepted)


# ---- the generator ----------------------------------------------------------------------------------------


@dataclass
class _KeyState:
    attempts: int = 0
    accepted: bool = False


class Synthesizer:
    """Writes graded, labelled completions for a set of prompts into an output folder (see the module doc).

    `engine` grades (through a `Grader` built on it unless `grader` is given) and, unless `behaviour_engine`
    is given, also writes the completions. `tokenizer` renders the behaviour policy's chat template (default:
    the behaviour engine's own). `rm_engine` (an `rbr_model.rm.RMEngine`) adds `rm_score`; without one every
    `rm_score` is 0. `labels` defaults to the packaged labels.yaml; `expectations` to `EXPECTED_CLASSES`.

    `generations` counts completions sampled and `grader.engine_requests` the judgments asked of the engine,
    over the synthesizer's life.
    """

    def __init__(
        self,
        engine: Engine,
        policy: Policy | None = None,
        *,
        grader: Grader | None = None,
        behaviour_engine: Engine | None = None,
        tokenizer: Any | None = None,
        rm_engine: Any | None = None,
        labels: Mapping[str, Mapping[str, str]] | None = None,
        expectations: Mapping[str, Mapping[str, Collection[str]]] | None = None,
        config: SynthConfig | None = None,
    ):
        self.policy = policy if policy is not None else load_policy(None)
        self.engine = engine
        if grader is None:  # the one builder's prompted grader on this engine (rbr synth passes its stack's)
            from rbr_model.stack import StackSettings, make_grader

            grader = make_grader(StackSettings(heads="none"), engine, self.policy)
        self.grader = grader
        self.behaviour = behaviour_engine if behaviour_engine is not None else engine
        self.tokenizer = tokenizer if tokenizer is not None else getattr(self.behaviour, "tokenizer", None)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise SynthError("the behaviour policy needs a tokenizer with a chat template")
        self.rm_engine = rm_engine
        self.labels = {str(rt): dict(t) for rt, t in (labels if labels is not None else load_labels()).items()}
        self.expectations = check_expectations(
            expectations if expectations is not None else EXPECTED_CLASSES, self.policy
        )
        self.config = config or SynthConfig()
        self.config.check()
        self.specs = {rt: FeatureSpec(self.policy, rt) for rt in self.policy.classes}
        self.seeded = engine_takes_seeds(self.behaviour) if self.config.seeded is None else bool(self.config.seeded)
        self.generations = 0

    # -- identity of what made the data
    def _identity(self) -> dict[str, Any]:
        return {
            "policy_fingerprint": self.policy.fingerprint,
            "grader_id": self.engine.model_id,
            "grader_fingerprint": self.grader.fingerprint,
            "rm_model": getattr(self.rm_engine, "model_id", None) if self.rm_engine is not None else None,
        }

    def _check_meta(self, out_dir: Path) -> dict[str, Any]:
        path = out_dir / META_FILE
        ident = self._identity()
        if not path.exists():
            return {"format_version": FORMAT_VERSION, **ident, "runs": []}
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SynthError(f"{path}: unreadable: {exc}") from exc
        for key, value in ident.items():
            if meta.get(key) != value:
                what = {"policy_fingerprint": "policy", "grader_id": "grader model",
                        "grader_fingerprint": "grader (model, prompt wording or calibration)",
                        "rm_model": "reward model"}[key]
                raise SynthError(
                    f"{out_dir} was made with another {what} ({str(meta.get(key))[:24]!r}, now {str(value)[:24]!r}); "
                    "use a new output folder: rows made differently must not be mixed"
                )
        meta.setdefault("runs", [])
        return meta

    def _labels_for(self, rt: str) -> dict[str, str]:
        table = self.labels.get(rt)
        if not table:
            raise SynthError(f"no completion labels for response type {rt!r} (labels cover {sorted(self.labels)})")
        return table

    # -- the run
    async def run(self, prompts: Sequence[SynthPrompt], out_dir: str | Path, progress: bool = True) -> SynthResult:
        """Do every (prompt, label, sample) key not done yet; rebuild rows.jsonl; return the counts."""
        start = time.perf_counter()
        cfg = self.config
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in prompts:
            if p.response_type not in self.specs:
                raise SynthError(f"prompt {p.prompt_id}: response type {p.response_type!r} is not in the policy")
            self._labels_for(p.response_type)
        meta = self._check_meta(out_dir)

        records = read_completions(out_dir / COMPLETIONS_FILE, repair=True)
        states: dict[str, _KeyState] = {}
        seen: dict[str, set[str]] = {}
        for r in records:
            st = states.setdefault(r["key"], _KeyState())
            st.attempts = max(st.attempts, int(r.get("attempt", 0)) + 1)
            st.accepted = st.accepted or r.get("status") == ACCEPTED
            if r.get("completion_sha256"):
                seen.setdefault(str(r["prompt_id"]), set()).add(r["completion_sha256"])

        todo: list[tuple[SynthPrompt, str, str, int, _KeyState]] = []
        result = SynthResult(out_dir=out_dir, n_prompts=len(prompts))
        for p in prompts:
            for label, instruction in self._labels_for(p.response_type).items():
                for sample in range(cfg.samples):
                    result.n_keys += 1
                    st = states.setdefault(key_of(p.prompt_id, label, sample), _KeyState())
                    if st.accepted or st.attempts > cfg.max_resamples:
                        result.n_done_before += 1
                    else:
                        todo.append((p, label, instruction, sample, st))

        meta["runs"].append({
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "generator_id": getattr(self.behaviour, "model_id", None),
            "config": asdict(self.config) | {"seeded": self.seeded},
            "n_prompts": len(prompts),
            "n_keys_todo": len(todo),
        })
        _write_json(out_dir / META_FILE, meta)

        judged_before, generated_before = self.grader.engine_requests, self.generations
        sem = asyncio.Semaphore(cfg.concurrency)
        bar = _progress(len(todo), progress)
        log = open(out_dir / COMPLETIONS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally

        def write(record: dict[str, Any]) -> None:
            records.append(record)
            log.write(json.dumps(record, ensure_ascii=False) + "\n")
            log.flush()
            status = record["status"]
            if status == ACCEPTED:
                result.n_accepted += 1
            elif status == REJECTED:
                result.n_rejected += 1
            elif status == DUPLICATE:
                result.n_duplicates += 1
            else:
                result.n_empty += 1

        async def one(p: SynthPrompt, label: str, instruction: str, sample: int, st: _KeyState) -> None:
            async with sem:
                accepted = await self._do_key(p, label, instruction, sample, st, seen.setdefault(p.prompt_id, set()),
                                              write)
            if not accepted:
                result.n_exhausted += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(gen=self.generations - generated_before,
                                judged=self.grader.engine_requests - judged_before,
                                rejected=result.n_rejected, dup=result.n_duplicates, refresh=False)

        try:
            await gather_or_cancel(one(*item) for item in todo)
        finally:
            log.close()
            if bar is not None:
                bar.close()
            result.n_rows = write_rows(out_dir, records)
            result.n_generations = self.generations - generated_before
            result.n_judgments = self.grader.engine_requests - judged_before
            result.seconds = time.perf_counter() - start
            result.files = {"completions": str(out_dir / COMPLETIONS_FILE), "rows": str(out_dir / ROWS_FILE),
                            "meta": str(out_dir / META_FILE)}
            meta["runs"][-1]["result"] = {k: v for k, v in result.to_dict().items() if k not in ("out_dir", "files")}
            _write_json(out_dir / META_FILE, meta)
        return result

    async def _do_key(
        self, p: SynthPrompt, label: str, instruction: str, sample: int, st: _KeyState, seen: set[str], write: Any
    ) -> bool:
        """Attempts for one key until one is accepted or the attempts run out; True when one was accepted."""
        cfg = self.config
        spec = self.specs[p.response_type]
        expected = self.expectations.get(p.response_type, {}).get(label)
        conversation = [dict(m) for m in p.messages]
        gen_prompt = render_generation_prompt(self.tokenizer, instruction, conversation)
        while st.attempts <= cfg.max_resamples:
            attempt = st.attempts
            seed = sample_seed(cfg.seed, p.prompt_id, label, sample, attempt) if self.seeded else None
            (text,) = await self.behaviour.generate([gen_prompt], cfg.max_tokens, cfg.temperature, seed)
            self.generations += 1
            text = text.strip()
            digest = completion_hash(text)
            record: dict[str, Any] = {
                "key": key_of(p.prompt_id, label, sample),
                "prompt_id": p.prompt_id,
                "response_type": p.response_type,
                "completion_label": label,
                "sample": sample,
                "attempt": attempt,
                "seed": seed,
                "completion_sha256": digest,
            }
            if cfg.store_text:
                record["completion"] = text
            if not text:
                record["status"] = EMPTY
            elif digest in seen:
                record["status"] = DUPLICATE
            else:
                seen.add(digest)
                (probs,) = await self.grader.grade([(conversation, text, spec.propositions)])
                features = spec.feature_dicts([probs])[0]
                classes = {c: features[CLASS_PREFIX + c] for c in spec.classes}
                rm_score = 0.0
                if self.rm_engine is not None:
                    (rm_score,) = await self.rm_engine.score([conversation], [text])
                contradiction = contradicts(classes, expected)
                record.update({
                    "status": REJECTED if contradiction and cfg.reject_contradictions else ACCEPTED,
                    "contradicts_label": contradiction,
                    "top_class": top_class(classes),
                    "expected_classes": sorted(expected) if expected else None,
                    "rm_score": float(rm_score),
                    "features": features,
                })
            st.attempts = attempt + 1
            write(record)
            if record["status"] == ACCEPTED:
                st.accepted = True
                return True
        return False


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="synth", unit="completion", dynamic_ncols=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


async def synthesize(
    prompts: Sequence[SynthPrompt],
    out_dir: str | Path,
    engine: Engine,
    policy: Policy | None = None,
    *,
    progress: bool = True,
    **kwargs: Any,
) -> SynthResult:
    """One-call form: `Synthesizer(engine, policy, **kwargs).run(prompts, out_dir)`."""
    return await Synthesizer(engine, policy, **kwargs).run(prompts, out_dir, progress=progress)
