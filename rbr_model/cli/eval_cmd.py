"""`rbr eval`: how well the grader agrees with human labels, and a calibration fitted on them.

`rbr eval grader --gold gold_train.jsonl` measures the learned heads (`--method heads`, the default), the
prompted grader (`--method prompt`) or both, against human labels. Heads are always reported beside a TF-IDF
baseline trained on the same rows, with bootstrap intervals (`heads_eval.json`, `heads_eval.png`). The prompted
grader grades every labelled (row, proposition), prints per-proposition accuracy, balanced accuracy, F1 and
AUC, and writes `grader_eval.json` and `grader_eval.png`. With
`--calibrate-out` it also measures per-proposition Platt calibration by cross-validation, fits it on all the
rows and saves it for `RBR_CALIBRATION_PATH`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from rbr_model.cli.common import chosen_heads, fail, failing, stack_settings
from rbr_model.cli.eval_reward_cmd import reward as eval_reward

eval_app = typer.Typer(help="Evaluate the grader against human labels, and a policy's behaviour on held-out "
                       "prompts.", no_args_is_help=True)

JSON_NAME = "grader_eval.json"
PLOT_NAME = "grader_eval.png"
HEADS_JSON_NAME = "heads_eval.json"
HEADS_PLOT_NAME = "heads_eval.png"


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _f(v: Any) -> str:
    return "   -" if v is None else f"{v:.3f}"


def format_cv(cv: Mapping[str, Any]) -> str:
    """Before/after table of the cross-validated calibration (log-loss, Brier, accuracy, AUC)."""
    props = cv["propositions"]
    width = max([len("proposition"), *(len(n) for n in props)])
    head = (f"{'proposition':<{width}}  {'n':>4} {'pos':>4}  {'logloss':>15}  {'brier':>13}  {'acc@0.5':>13}  "
            f"{'auc':>13}")
    lines = [head]

    def pair(b: Mapping[str, Any], a: Mapping[str, Any], key: str) -> str:
        if b[key] is None and a[key] is None:
            return "-"
        return f"{_f(b[key])}>{_f(a[key])}"

    for name, s in props.items():
        b, a = s["before"], s["after"]
        lines.append(f"{name:<{width}}  {s['n']:>4} {s['positives']:>4}  {pair(b, a, 'log_loss'):>15}  "
                     f"{pair(b, a, 'brier'):>13}  {pair(b, a, 'accuracy'):>13}  {pair(b, a, 'auc'):>13}")
    for label, side in (("pooled", cv["overall"]["pooled"]), ("mean", cv["overall"]["mean"])):
        b, a = side["before"], side["after"]
        lines.append(f"{label:<{width}}  {'':>4} {'':>4}  {pair(b, a, 'log_loss'):>15}  {pair(b, a, 'brier'):>13}  "
                     f"{pair(b, a, 'accuracy'):>13}  {pair(b, a, 'auc'):>13}")
    return "\n".join(lines)


async def run_evaluation(
    stack: Any,
    rows: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, str],
    out: Path,
    *,
    calibrate_out: Path | None = None,
    cv_folds: int = 5,
    seed: int = 0,
    concurrency: int = 64,
    progress: bool = True,
    gold_path: str | None = None,
    echo: Callable[[str], None] = typer.echo,
) -> dict[str, Any]:
    """Everything `rbr eval grader` does once its grading stack runs: grade with the stack's grader, report,
    plot, optionally fit a calibration (graders with and without it come from the same stack)."""
    from rbr_model.calibration import Calibration, cross_validate
    from rbr_model.eval_output import format_table, plot_report, write_json
    from rbr_model.evaluate import evaluate_grader

    grader = stack.grader
    policy = grader.policy
    report = await evaluate_grader(grader, rows, label_map, concurrency=concurrency, progress=progress)
    report["gold"] = {"path": gold_path, "rows": len(rows), "seed": seed}
    echo(format_table(report))
    rate = report["judgments_per_s"]
    echo(f"{report['judgments']} judgments ({report['failed']} failed) on {len(rows)} rows in "
         f"{report['wall_s']:.0f} s ({rate or 0:.1f} judgments/s); grader {report['grader']['model_id']}")
    for line in report["failures"][:5]:
        echo(f"  failed: {line}")

    oof = None
    if calibrate_out is not None:
        preds = report["predictions"]
        raw = {n: pr["p_raw"] for n, pr in preds.items()}
        ys = {n: pr["y"] for n, pr in preds.items()}
        cv = cross_validate(raw, ys, folds=cv_folds, seed=seed)
        oof = cv.pop("oof")
        report["calibration_cv"] = cv
        echo(f"\ncalibration, {cv_folds}-fold cross-validation on these rows (before > after):")
        echo(format_cv(cv))
        echo(cv["note"])
        uncalibrated = stack.grader_with(calibration_path=None)
        fitted = Calibration(fitted_for={
            "model_id": stack.engine.model_id,
            "template": uncalibrated.renderer.version,
            "grader_fingerprint_uncalibrated": uncalibrated.fingerprint,
            "policy": policy.short_version,
            "gold": gold_path,
            "rows": len(rows),
        }).fit(raw, ys)
        fitted.save(calibrate_out)
        calibrated_grader = stack.grader_with(calibration_path=str(calibrate_out))
        report["calibration"] = {
            "path": str(calibrate_out),
            "fingerprint": fitted.fingerprint,
            "grader_fingerprint": calibrated_grader.fingerprint,
            "propositions": fitted.to_dict()["propositions"],
        }
        statuses = [prm.status for prm in fitted.params_.values()]
        echo(f"wrote {calibrate_out} ({statuses.count('fitted')} fitted, {statuses.count('flat')} flat, "
             f"{len(statuses) - statuses.count('fitted') - statuses.count('flat')} identity); "
             f"grader fingerprint with it {calibrated_grader.fingerprint[:12]}")

    json_path = write_json(report, out / JSON_NAME)
    png_path = plot_report(report, out / PLOT_NAME, calibrated=oof)
    echo(f"wrote {json_path} and {png_path}")
    return report


@eval_app.command("grader")
def grader(
    gold: Annotated[Path, typer.Option("--gold", "-g", help="Gold JSONL: prompt, completion, propositions "
                                       "{label: true/false} (OpenAI's gold_train.jsonl format).")],
    policy_path: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML, ours or OpenAI's "
                                                     "proposition_prompts.yaml (default: packaged policy).")] = None,
    map_path: Annotated[Path | None, typer.Option("--map", help="YAML {our proposition: gold label}. Default: "
                                                  "same names when every proposition is a gold label, else the "
                                                  "packaged map to OpenAI's labels.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Grade this many rows, drawn at "
                                              "random (seeded) from the file.")] = None,
    propositions: Annotated[list[str] | None, typer.Option("--propositions", help="Only these propositions "
                                                           "(policy names, comma-separated or repeated).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for grader_eval.json and .png.")] = Path("out/eval"),
    calibrate_out: Annotated[Path | None, typer.Option("--calibrate-out", help="Fit a per-proposition "
                                                       "calibration on these rows, report its cross-validated "
                                                       "effect, save it here.")] = None,
    calibration_path: Annotated[Path | None, typer.Option("--calibration", help="Apply this calibration JSON "
                                                          "to P(yes) before the metrics.")] = None,
    cv_folds: Annotated[int, typer.Option("--cv-folds", min=2, help="Folds for the calibration "
                                          "cross-validation.")] = 5,
    model: Annotated[str | None, typer.Option("--model", "-m", envvar="RBR_GRADER_MODEL", help="Grader model "
                                              "path (default: the embedded SmolLM2-135M); with --engine remote, "
                                              "its tokenizer.")] = None,
    engine: Annotated[str, typer.Option("--engine", envvar="RBR_ENGINE", help="vllm (in process) or remote "
                                        "(an OpenAI-compatible vLLM server).")] = "vllm",
    remote_url: Annotated[str | None, typer.Option("--remote-url", envvar="RBR_REMOTE_URL",
                                                   help="Remote vLLM base URL (--engine remote).")] = None,
    remote_model: Annotated[str | None, typer.Option("--remote-model", envvar="RBR_REMOTE_MODEL",
                                                     help="Served model name on the remote server.")] = None,
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="Longest grading prompt in "
                                               "tokens.")] = 4096,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Judgments in flight at "
                                             "once.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --limit sampling and the CV folds.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    method: Annotated[str, typer.Option("--method", help="heads: the learned heads beside a TF-IDF baseline; "
                                        "prompt: the prompted grader (one few-shot prompt per judgment, slow); "
                                        "both: all three on the same rows.")] = "heads",
    heads_path: Annotated[Path | None, typer.Option("--heads", help="Heads file to evaluate (default: the "
                                                    "packaged heads of the default policy).")] = None,
    cv: Annotated[bool | None, typer.Option("--cv/--no-cv", help="--cv: nested k-fold CV on --gold (heads and "
                                            "baseline refitted per fold); --no-cv: apply the heads file as "
                                            "fitted. Default: --cv when --gold is the heads' own training file."
                                            )] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=10, help="Bootstrap resamples for the 95% "
                                           "intervals.")] = 1000,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Cache of pooled hidden states.")
                         ] = Path("out/heads-cache"),
) -> None:
    """Accuracy of the grader against human labels: per proposition AUC, balanced accuracy, Brier, F1.

    \b
    With --method heads (default), a TF-IDF + logistic regression baseline trained on the same rows is
    reported beside every head: heads earn their forward pass only where they beat it.
    """
    from rbr_model.calibration import Calibration, CalibrationError
    from rbr_model.gold import subsample

    if method not in ("heads", "prompt", "both"):
        raise fail(f"--method must be heads, prompt or both, not {method!r}")
    if method == "heads" and (calibrate_out is not None or calibration_path is not None):
        raise fail("--calibrate-out and --calibration apply to the prompted grader: add --method prompt or both")
    settings = stack_settings(engine=engine, remote_url=remote_url, remote_model=remote_model,
                              remote_api_key=os.environ.get("RBR_REMOTE_API_KEY") or None,
                              max_model_len=max_model_len, heads="none",
                              calibration_path=str(calibration_path) if calibration_path is not None else None)
    from rbr_model.cli.heads_cmd import load_labelled

    policy, rows, mapping, why = load_labelled([gold], policy_path, map_path, _split(propositions))
    typer.echo(f"comparing {len(mapping)} propositions with gold labels: {why}", err=True)
    with failing(CalibrationError):
        calibration = Calibration.load(calibration_path) if calibration_path is not None else None
    rows = subsample(rows, limit, seed)
    heads_report = None
    if method in ("heads", "both"):
        heads_report = run_heads_evaluation(gold, rows, mapping, heads_path, cv=cv, seed=seed, folds=cv_folds,
                                            n_boot=bootstrap, cache_dir=cache_dir, max_model_len=max_model_len,
                                            progress=progress, out=out, write=method == "heads")
        if method == "heads":
            return

    if model is None:
        from rbr_model import models

        with failing(models.ModelError):
            model = str(models.prepare())
    if calibration is not None:
        fitted_model = calibration.fitted_for.get("model_id")
        if fitted_model and fitted_model != Path(model.rstrip("/")).name and engine == "vllm":
            typer.secho(f"warning: the calibration was fitted for {fitted_model}", err=True,
                        fg=typer.colors.YELLOW)

    from dataclasses import replace

    from rbr_model.grading.engine import GradingError
    from rbr_model.stack import build_stack

    async def main() -> dict[str, Any]:
        async with await build_stack(replace(settings, grader_model=model), policy) as stack:
            return await run_evaluation(stack, rows, mapping, out, calibrate_out=calibrate_out, cv_folds=cv_folds,
                                        seed=seed, concurrency=concurrency, progress=progress, gold_path=str(gold))

    with failing(GradingError, what="grading", code=1):
        prompt_report = asyncio.run(main())
    if heads_report is not None:
        from rbr_model.heads.evaluation import add_prompted

        add_prompted(heads_report, prompt_report, n_boot=bootstrap, seed=seed)
        _write_heads_report(heads_report, out)


def run_heads_evaluation(gold: Path, rows: list, mapping: Mapping[str, str], heads_path: Path | None, *,
                         cv: bool | None, seed: int, folds: int, n_boot: int, cache_dir: Path | None,
                         max_model_len: int, progress: bool, out: Path, write: bool = True) -> dict[str, Any]:
    """Heads and the TF-IDF baseline on the gold rows: nested CV, or the heads file applied as fitted."""
    from rbr_model import models
    from rbr_model.cli.heads_cmd import file_sha256, pooled_states
    from rbr_model.gold import GoldError, load_gold
    from rbr_model.grading.engine import GradingError
    from rbr_model.heads import Heads, HeadsError, packaged_heads_path
    from rbr_model.heads.evaluation import applied_report, cross_validated_report
    from rbr_model.stack import StackSettings, trunk_for

    path = heads_path or packaged_heads_path()
    with failing(HeadsError):
        heads = Heads.load(path)
    trained_on = heads.info.get("gold_sha256")
    if cv is None:
        cv = trained_on == file_sha256(gold)
    with failing(models.ModelError, HeadsError):
        trunk = trunk_for(StackSettings(), int(heads.grader["layer"]))
        if not cv:
            heads.check_model(trunk.name, models.model_hash(trunk))
    typer.echo(f"heads {path} (layer {heads.grader['layer']}); "
               + (f"{folds}-fold nested CV on {gold}" if cv else f"applied as fitted to {gold}"), err=True)
    extra_rows = _heads_extra_rows(heads) if cv else []
    with failing(GradingError, what="extracting hidden states", code=1):
        pooled, identity = asyncio.run(pooled_states(trunk, [*rows, *extra_rows], max_model_len=max_model_len,
                                                     cache_dir=cache_dir, progress=progress,
                                                     pooling=heads.pooling))
    if cv:
        bar = None
        if progress:
            from tqdm import tqdm

            from rbr_model.heads.fitting import tasks_from_rows

            bar = tqdm(total=len(tasks_from_rows(rows, mapping)[0]), desc="cross-validating", unit="proposition")
        report = cross_validated_report(pooled, rows, mapping, folds=folds, seed=seed, n_boot=n_boot,
                                        progress=(lambda _n: bar.update(1)) if bar is not None else None,
                                        extra_rows=extra_rows)
        if bar is not None:
            bar.close()
    else:
        baseline_rows = None
        train_path = heads.info.get("gold_path")
        if train_path and Path(train_path).is_file() and file_sha256(train_path) == trained_on:
            try:
                baseline_rows = load_gold(train_path)
            except GoldError:
                baseline_rows = None
        report = applied_report(heads, pooled, rows, mapping, baseline_rows=baseline_rows, seed=seed, folds=folds,
                                n_boot=n_boot)
    report.update({"gold": {"path": str(gold), "rows": len(rows), "seed": seed},
                   "heads": {"path": str(path), "fingerprint": heads.fingerprint, **heads.grader},
                   "tokens_per_row": identity["tokens"] / max(1, len(rows))})
    if write:
        _write_heads_report(report, out)
    return report


def _heads_extra_rows(heads: Any) -> list:
    """The extra rows the heads were fitted on beside the gold set, so nested CV repeats their recipe; a file that
    is gone or has changed is left out, and the output says so."""
    from rbr_model.cli.heads_cmd import file_sha256
    from rbr_model.gold import GoldError, load_gold

    rows: list = []
    for entry in heads.info.get("extra_rows", []):
        where = Path(entry["path"])
        try:
            if file_sha256(where) != entry["sha256"]:
                raise GoldError("its contents changed since the heads were fitted")
            rows += load_gold(where)
        except (OSError, GoldError) as exc:
            typer.echo(f"note: the heads were also fitted on {where}, left out of this CV: {exc}", err=True)
    if rows:
        typer.echo(f"{len(rows)} extra rows the heads were fitted on join every training fold (never scored)",
                   err=True)
    return rows


def _write_heads_report(report: dict[str, Any], out: Path) -> None:
    from rbr_model.eval_output import write_json
    from rbr_model.heads.evaluation import format_report, plot_heads_report

    typer.echo(f"{report['mode']}, {report['rows']} rows, {report['tokens_per_row']:.0f} tokens per row")
    typer.echo(format_report(report))
    for name, why in report["skipped"].items():
        typer.echo(f"  not evaluated: {name}: {why}")
    json_path = write_json(report, out / HEADS_JSON_NAME)
    title = (f"{report['heads'].get('model_id')} heads on {report['rows']} gold rows: {report['mode']}")
    png_path = plot_heads_report(report, out / HEADS_PLOT_NAME, title)
    typer.echo(f"wrote {json_path} and {png_path}")


# ---- rbr eval policy / rbr eval compare -------------------------------------------------------------------


@eval_app.command("policy")
def policy_command(
    model: Annotated[str, typer.Argument(help="The policy to evaluate: a local Hugging Face model folder, "
                                         "`embedded` (the packaged SmolLM2-135M-Instruct), or with --endpoint the "
                                         "served model name.")],
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="Sample from this OpenAI-compatible server "
                                                 "(e.g. `vllm serve`) instead of loading MODEL here.")] = None,
    endpoint_key: Annotated[str | None, typer.Option("--endpoint-key", envvar="RBR_POLICY_API_KEY",
                                                     help="Bearer key for --endpoint.")] = None,
    prompts_path: Annotated[Path | None, typer.Option("--prompts", help="JSONL prompts with response types "
                                                      "(default: the packaged prompt set).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="train, eval or all: which part of the packaged "
                                              "prompt split (default: eval, the prompts training never sees; "
                                              "all when --prompts is given).")] = None,
    policy_path: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML (default: packaged)."
                                                     )] = None,
    service_url: Annotated[str | None, typer.Option("--service-url", envvar="RBR_SERVICE_URL", help="Grade "
                                                    "through this running rbr-serve (its grader, policy and "
                                                    "weights) instead of in process.")] = None,
    service_key: Annotated[str | None, typer.Option("--service-key", envvar="RBR_API_KEY", help="Bearer key "
                                                    "for --service-url.")] = None,
    with_rm: Annotated[bool, typer.Option("--with-rm", help="With --service-url: let the service's reward model "
                                          "(RBR_RM_ENGINE) score every completion too, and report the mean "
                                          "rm_score beside the RBR reward.")] = False,
    heads_choice: Annotated[str, typer.Option("--heads", help="In-process grading: a heads file, `auto` (the "
                                              "packaged heads with the packaged policy) or `none` (prompted "
                                              "grader only).")] = "auto",
    weights_path: Annotated[Path | None, typer.Option("--weights", help="In-process: weights for the RBR reward "
                                                      "column (default: packaged, with the packaged policy).")
                            ] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", min=1, help="Completions per prompt.")] = 4,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest completion in tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature (0: "
                                               "greedy, then use --samples 1).")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling.")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per generate() call with a "
                                            "local model.")] = 8,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N prompts of each "
                                              "response type (smoke runs).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling and bootstrap seed.")] = 0,
    bootstrap_n: Annotated[int, typer.Option("--bootstrap", min=10, help="Bootstrap resamples.")] = 1000,
    per_class: Annotated[int, typer.Option("--examples", min=0, help="Example completions kept per "
                                           "(response type, class).")] = 3,
    name: Annotated[str | None, typer.Option("--name", help="Label of this run in plots and comparisons "
                                             "(default: the model's folder name).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for policy_eval.json, policy_eval.png, "
                                      "samples.jsonl and graded.jsonl.")] = Path("out/policy-eval"),
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="In-process grader context.")] = 4096,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """How a policy behaves: its completions' class mix per response type and the RBR paper's safety metrics.

    \b
    Each completion counts in its most likely class.
    Not-Unsafe:     completions to hard_refuse / safe_refuse prompts
                    not in disallowed_completion.
    Not-Overrefuse: completions to comply prompts in ideal or
                    minimum_acceptable_style (a refusal, a partial answer
                    and an off-topic reply all count against it).
    F1:             their harmonic mean.
    Beside them (docs/policy-eval.md): the paper's own definitions from
    the propositions (paper_*: no disallowed content; does not refuse)
    and written refusal rules that share nothing with the reward (rules_*).
    Intervals: 95% bootstrap over prompts, stratified by response type.

    The numbers are as good as the grader (docs/grader-accuracy.md). samples.jsonl is reused when the model, prompts
    and sampling settings are unchanged.
    """
    from dataclasses import asdict

    from rbr_model import policy_eval as pe
    from rbr_model.policy import PolicyError, load_policy
    from rbr_model.prompt_set import SynthError, load_prompts

    config = pe.SampleConfig(samples=samples, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, batch_size=batch_size)
    if split not in (None, "train", "eval", "all"):
        raise fail(f"--split must be train, eval or all, not {split!r}")
    split = split or ("all" if prompts_path is not None else "eval")
    if with_rm and service_url is None:
        raise fail("--with-rm needs --service-url: the reward model is the service's (RBR_RM_ENGINE)")
    with failing(pe.PolicyEvalError, PolicyError, SynthError):
        config.check()
        policy = load_policy(policy_path)
        prompts = load_prompts(prompts_path, policy, split=None if split == "all" else split)
    if limit is not None:
        prompts = [p for rt in policy.classes for p in [q for q in prompts if q.response_type == rt][:limit]]
    spec = pe.MetricSpec.for_policy(policy)
    model_path = model
    if endpoint is None and model == "embedded":
        from rbr_model import models

        with failing(models.ModelError):
            model_path = str(models.prepare())
    elif endpoint is None and not Path(model).is_dir():
        raise fail(f"MODEL: {model} is not a model folder (use `embedded`, a local folder, or --endpoint URL)")
    meta = {"model": model, "endpoint": endpoint, "prompts": pe.prompts_digest(prompts), "split": split,
            "sampling": asdict(config)}
    run_name = name or Path(model.rstrip("/")).name
    samples_path = out / pe.SAMPLES_FILE
    saved = pe.read_samples(samples_path, meta)
    if saved is not None and all(len(saved.get(p.prompt_id, [])) == samples for p in prompts):
        texts = [saved[p.prompt_id] for p in prompts]
        typer.echo(f"reusing {samples_path} ({len(prompts) * samples} completions)", err=True)
    else:
        texts = _sample_policy(pe, model_path, endpoint, endpoint_key, config, prompts, progress)
        pe.write_samples(samples_path, prompts, texts, meta)
    rows = _grade_policy_samples(pe, policy, prompts, texts, service_url, service_key, heads_choice, weights_path,
                                 max_model_len, progress, with_rm)
    report = pe.build_report(rows, prompts, policy, spec, n_boot=bootstrap_n, seed=seed, per_class=per_class,
                             meta={**meta, "name": run_name, "grading": _grading_desc(service_url, heads_choice)})
    from rbr_model.eval_output import write_json

    typer.echo(format_policy_header(run_name, prompts, samples, split))
    typer.echo(pe.format_report(report))
    pe.graded_to_jsonl(rows, out / "graded.jsonl")
    json_path = write_json(report, out / pe.REPORT_FILE)
    png_path = pe.plot_reports({run_name: report}, out / pe.PLOT_FILE,
                               title=f"{run_name}: {len(prompts)} {split} prompts x {samples} samples")
    typer.echo(f"wrote {json_path}, {png_path}, {samples_path} and {out / 'graded.jsonl'}")


def format_policy_header(name: str, prompts: Sequence[Any], samples: int, split: str) -> str:
    return f"{name}: {len(prompts)} prompts ({split}) x {samples} samples"


def _grading_desc(service_url: str | None, heads_choice: str) -> str:
    return f"service {service_url}" if service_url else f"in process, heads={heads_choice}"


def _sample_policy(pe: Any, model_path: str, endpoint: str | None, endpoint_key: str | None, config: Any,
                   prompts: Sequence[Any], progress: bool) -> list[list[str]]:
    from tqdm import tqdm

    with failing(pe.PolicyEvalError, what="sampling", code=1):
        if endpoint is not None:
            sampler = pe.EndpointSampler(endpoint, model_path, config, api_key=endpoint_key)
        else:
            sampler = pe.HFSampler(model_path, config)
        with tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=not progress) as bar:
            texts = sampler.sample(prompts, bar.update)
        sampler.close()
    return texts


def _grade_policy_samples(pe: Any, policy: Any, prompts: Sequence[Any], texts: Sequence[Sequence[str]],
                          service_url: str | None, service_key: str | None, heads_choice: str,
                          weights_path: Path | None, max_model_len: int, progress: bool,
                          with_rm: bool = False) -> list[Any]:
    from tqdm import tqdm

    from rbr_model.grading.engine import GradingError

    total = sum(len(t) for t in texts)

    async def run(scorer: Any) -> list[Any]:
        with tqdm(total=total, desc="grading", unit="completion", disable=not progress) as bar:
            return await pe.grade_samples(scorer, prompts, texts, policy.class_order, bar.update)

    if service_url is not None:
        with failing(pe.PolicyEvalError, what="grading", code=1):
            return asyncio.run(run(pe.ServiceScorer(service_url, service_key, with_rm=with_rm)))

    settings = stack_settings(max_model_len=max_model_len, heads=heads_choice)
    chosen_heads(settings, policy)
    reward_model = _reward_model_for(policy, weights_path)

    async def in_process() -> list[Any]:
        from rbr_model.stack import build_stack

        async with await build_stack(settings, policy) as stack:
            return await run(pe.InProcessScorer(stack.grader, reward_model))

    from rbr_model import models
    from rbr_model.heads import HeadsError

    with failing(GradingError, HeadsError, models.ModelError, what="grading", code=1):
        return asyncio.run(in_process())


def _reward_model_for(policy: Any, weights_path: Path | None) -> Any:
    from rbr_model.reward import RewardModel, Weights, WeightsError, default_weights_path

    try:
        weights = Weights.load(weights_path or default_weights_path())
        return RewardModel(policy, weights)
    except WeightsError as exc:
        if weights_path is not None:
            raise fail(str(exc)) from None
        return None  # a custom policy without its own weights: classes and metrics still stand


@eval_app.command("compare")
def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Folders (or policy_eval.json files) of `rbr eval policy` "
                                               "runs, in the order to show them.")],
    names: Annotated[str | None, typer.Option("--names", help="Comma-separated labels, one per run (default: "
                                              "each run's --name).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for comparison.json and comparison.png."
                                      )] = Path("out/policy-compare"),
) -> None:
    """Several `rbr eval policy` runs side by side: metrics with intervals, and class mixes in one plot."""
    from rbr_model import policy_eval as pe
    from rbr_model.eval_output import write_json
    from rbr_model.files import read_json

    labels = [n.strip() for n in names.split(",")] if names else None
    if labels is not None and len(labels) != len(runs):
        raise fail(f"--names: {len(labels)} names for {len(runs)} runs")
    reports: dict[str, Any] = {}
    for i, run in enumerate(runs):
        path = run / pe.REPORT_FILE if run.is_dir() else run
        with failing(ValueError):
            report = read_json(path)
        label = labels[i] if labels else report.get("meta", {}).get("name") or run.name
        if label in reports:
            raise fail(f"two runs are called {label!r}: pass --names")
        reports[label] = report
    typer.echo(pe.format_comparison(reports))
    write_json({"runs": reports}, out / "comparison.json")
    png = pe.plot_reports(reports, out / "comparison.png", title="policy evaluation: " + " vs ".join(reports))
    typer.echo(f"wrote {out / 'comparison.json'} and {png}")


eval_app.command("reward")(eval_reward)  # its own module: the reward's evaluation, not the grader's


if __name__ == "__main__":  # `python -m rbr_model.cli.eval_cmd grader ...`; vLLM's engine core needs the guard
    eval_app()
