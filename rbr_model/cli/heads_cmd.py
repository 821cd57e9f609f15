"""`rbr heads`: fit learned proposition heads on human-labelled rows, and show what a heads file holds."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from rbr_model.cli.common import fail, failing

heads_app = typer.Typer(
    help="Learned proposition heads: logistic regressions on the grader trunk's hidden states, fitted on "
    "human-labelled rows. One forward pass per completion grades every headed proposition.",
    no_args_is_help=True,
)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_cs(text: str) -> list[float]:
    try:
        cs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise fail(f"--C: expected comma-separated numbers, got {text!r}") from None
    if not cs or any(c <= 0 for c in cs):
        raise fail("--C: every value must be positive")
    return cs


def load_labelled(gold: Sequence[Path], policy_path: Path | None, map_path: Path | None,
                  propositions: list[str] | None = None) -> tuple[Any, list, dict, str]:
    """(policy, gold rows, {proposition: label}, why this map) with every problem as one clear error line.

    Several files are read in order and their rows joined (the label map then covers them all)."""
    from rbr_model.gold import GoldError, default_label_map, load_gold, load_label_map, resolve_label_map
    from rbr_model.policy import PolicyError, load_policy

    with failing(GoldError, PolicyError):
        rows = [row for path in gold for row in load_gold(path)]
        policy = load_policy(policy_path)
        if map_path is not None:
            label_map, why = load_label_map(map_path), f"map {map_path}"
        else:
            label_map, why = default_label_map(policy, rows)
        mapping = resolve_label_map(policy, rows, label_map, propositions)
    return policy, rows, mapping, why


def resolve_trunk(trunk: Path | None, layer: int) -> Path:
    """--trunk, or the embedded model's trunk at --layer, as the grading stack reads them (`trunk_for`)."""
    from rbr_model import models
    from rbr_model.stack import StackSettings, trunk_for

    if trunk is not None and not (trunk / "config.json").is_file():
        raise fail(f"--trunk {trunk}: not a model folder (no config.json)")
    with failing(models.ModelError):
        return trunk_for(StackSettings(heads_trunk=str(trunk) if trunk is not None else None), layer)


async def pooled_states(trunk: Path, rows: list, *, max_model_len: int, cache_dir: Path | None,
                        progress: bool, pooling: str) -> tuple[Any, dict[str, Any]]:
    """Pooled trunk states for every row through vLLM's pooling runner (cached on disk), and the trunk's identity.

    The cache is looked up before vLLM starts (tokenizer and hash come from the trunk folder), so a rerun on the
    same rows costs no engine start.
    """
    from transformers import AutoTokenizer

    from rbr_model import models
    from rbr_model.errors import PromptError
    from rbr_model.grading.engine import GradingError
    from rbr_model.heads.fitting import build_inputs, extract_pooled, read_cached_states
    from rbr_model.stack import StackSettings, build_state_engine

    try:
        inputs = build_inputs(AutoTokenizer.from_pretrained(str(trunk)), rows, max_model_len)
    except PromptError as exc:
        raise GradingError(f"a gold row cannot be read by the trunk: {exc}") from None
    identity = {"model_id": trunk.name, "model_hash": models.model_hash(trunk),
                "tokens": int(sum(len(i.ids) for i in inputs))}
    cached = read_cached_states(cache_dir, identity["model_hash"], inputs, "float32", pooling)
    if cached is not None:
        return cached, identity
    async with build_state_engine(StackSettings(max_model_len=max_model_len), trunk) as engine:
        pooled = await extract_pooled(engine, inputs, cache_dir=cache_dir, progress=progress, pooling=pooling)
    return pooled, identity


@heads_app.command("fit")
def fit(
    gold: Annotated[list[Path], typer.Option("--gold", "-g", help="Labelled rows (OpenAI's gold_train.jsonl "
                                             "format: prompt, completion, propositions {label: true/false}; a "
                                             "row may leave labels out). Repeatable: the first file is the "
                                             "human-labelled set `rbr eval grader` knows the heads by; later "
                                             "files add rows, such as rbr_model/data/"
                                             "weak_disallowed_rows.jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Heads file to write (.npz with a JSON header); "
                                      "serve it with RBR_HEADS.")] = Path("out/heads.npz"),
    policy_path: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML (default: the packaged "
                                                     "policy). The heads are bound to its fingerprint.")] = None,
    map_path: Annotated[Path | None, typer.Option("--map", help="YAML {policy proposition: gold label}. Default: "
                                                  "same names when every proposition is a label, else the "
                                                  "packaged map to OpenAI's labels.")] = None,
    layer: Annotated[int, typer.Option("--layer", min=1, help="Cut the embedded grader after this decoder "
                                       "layer (its trunk is prepared once in the models folder); 20 ranks better "
                                       "on the gold set at 4/3 of the cost.")] = 15,
    trunk: Annotated[Path | None, typer.Option("--trunk", help="A trunk folder of your own (a model cut with "
                                               "`rbr model prepare --trunk-layer`); overrides --layer.")] = None,
    folds: Annotated[int, typer.Option("--folds", min=2, help="Stratified CV folds for choosing C.")] = 5,
    cs: Annotated[str, typer.Option("--C", help="Inverse L2 strengths to try (comma-separated); the best mean "
                                    "CV AUC wins, ties go to the smaller.")] = "0.001,0.003,0.01,0.03,0.1,0.3,1",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where pooled states are cached (keyed by "
                                                   "the trunk's hash and the token ids).")] = Path("out/heads-cache"),
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="Longest input in tokens; longer "
                                               "conversations are cut from the left.")] = 4096,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the CV folds.")] = 0,
    pooling: Annotated[str, typer.Option("--pooling", help="How the completion's per-token states become one "
                                         "row: mean-and-max-over-completion (their mean and per-dimension "
                                         "maximum, which keeps one sentence of a long reply) or "
                                         "mean-over-completion (the mean alone, as heads before 2026-12).")
                       ] = "mean-and-max-over-completion",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """Fit one logistic head per mapped proposition on the trunk's pooled hidden states.

    \b
    What happens:
      1. every row becomes the grader's chat template over its conversation plus the completion's tokens;
      2. the trunk (the grader model cut after --layer, run by vLLM's pooling runner) computes per-token
         states once; their --pooling over the completion's tokens is cached under --cache-dir;
      3. per proposition with at least 3 labelled yes and 3 no rows: states standardised, L2 logistic
         regression with balanced class weights, C chosen by --folds-fold stratified CV on these rows;
      4. the heads file records the trunk (id, hash, layer), the pooling, the policy fingerprint and each
         head's CV AUC. Propositions without a head keep the prompted grader.
    Honest accuracy on these rows needs nested CV: `rbr eval grader --method heads --cv`.
    """
    from rbr_model.grading.engine import GradingError
    from rbr_model.heads import INPUT_VERSION, POOLINGS, Heads
    from rbr_model.heads.fitting import fit_heads, tasks_from_rows

    if pooling not in POOLINGS:
        raise fail(f"--pooling: {pooling!r} is not one of {list(POOLINGS)}")
    Cs = parse_cs(cs)
    policy, rows, mapping, why = load_labelled(gold, policy_path, map_path)
    typer.echo(f"{len(rows)} rows from {len(gold)} file(s), {len(mapping)} mapped propositions ({why})", err=True)
    tasks, skipped = tasks_from_rows(rows, mapping)
    if not tasks:
        raise fail(f"no proposition has enough labelled rows: {skipped}")
    trunk_dir = resolve_trunk(trunk, layer)
    start = time.perf_counter()
    with failing(GradingError, what="extracting hidden states", code=1):
        pooled, identity = asyncio.run(pooled_states(trunk_dir, rows, max_model_len=max_model_len,
                                                     cache_dir=cache_dir, progress=progress, pooling=pooling))
    extract_s = time.perf_counter() - start
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="fitting heads", unit="head")
    tick = (lambda _name: bar.update(1)) if bar is not None else None
    fitted = fit_heads(pooled, tasks, Cs=Cs, folds=folds, seed=seed, progress=tick)
    if bar is not None:
        bar.close()
    from rbr_model import models

    marker = models._read_marker(trunk_dir)
    heads = Heads(
        propositions=[t.name for t in tasks], mean=fitted["mean"], scale=fitted["scale"],
        weights=fitted["weights"], bias=fitted["bias"],
        grader={"model_id": identity["model_id"], "model_hash": identity["model_hash"],
                "layer": marker.get("layer", layer if trunk is None else None),
                "source_model_hash": marker.get("source_hash"), "pooling": pooling, "input": INPUT_VERSION,
                "final_norm": True, "dtype": "float32"},
        policy={"name": policy.name, "fingerprint": policy.fingerprint},
        metrics=fitted["metrics"],
        info={"gold_path": str(gold[0]), "gold_sha256": file_sha256(gold[0]), "rows": len(rows),
              "extra_rows": [{"path": str(path), "sha256": file_sha256(path)} for path in gold[1:]],
              "label_map": mapping,
              "skipped": skipped, "folds": folds, "Cs": Cs, "seed": seed, "tokens": identity["tokens"],
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    heads.save(out)
    typer.echo(format_heads(heads))
    typer.echo(f"hidden states: {len(rows)} rows, {identity['tokens']} tokens in {extract_s:.1f} s; "
               f"wrote {out} ({out.stat().st_size // 1024} KiB, fingerprint {heads.fingerprint[:12]})")
    for name, reason in skipped.items():
        typer.echo(f"  no head for {name}: {reason} (it keeps the prompted grader)")


def format_heads(heads: Any) -> str:
    width = max([len("proposition"), *(len(n) for n in heads.propositions)])
    lines = [f"{'proposition':<{width}}  {'n':>4} {'pos':>4}  {'C':>6}  {'cv auc':>6}  gold label"]
    for name in heads.propositions:
        m = heads.metrics.get(name, {})
        auc = m.get("cv_auc")
        lines.append(f"{name:<{width}}  {m.get('n', 0):>4} {m.get('positives', 0):>4}  {m.get('C', 0):>6g}  "
                     f"{'-' if auc is None else f'{auc:.3f}':>6}  {m.get('label', '')}")
    return "\n".join(lines)


@heads_app.command("show")
def show(path: Annotated[Path | None, typer.Argument(help="Heads file (default: the packaged one).")] = None) -> None:
    """Print a heads file's trunk, policy and per-head CV metrics."""
    from rbr_model.heads import Heads, HeadsError, packaged_heads_path

    with failing(HeadsError):
        heads = Heads.load(path or packaged_heads_path())
    g = heads.grader
    typer.echo(f"{heads.source}\n  trunk {g.get('model_id')} (layer {g.get('layer')}, hash {g['model_hash'][:12]}), "
               f"{g.get('pooling')}\n  policy {heads.policy.get('name')} ({heads.policy['fingerprint'][:12]}); "
               f"fingerprint {heads.fingerprint[:12]}")
    info = heads.info
    if info.get("gold_path"):
        extra = "".join(f" + {Path(e['path']).name}" for e in info.get("extra_rows", []))
        typer.echo(f"  fitted on {info.get('rows')} rows: {Path(info['gold_path']).name}{extra}")
    typer.echo(format_heads(heads))
