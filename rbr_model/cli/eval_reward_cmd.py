"""`rbr eval reward`: does the reward order completions as people do? On human-labelled rows (gold format).

Registered by eval_cmd.py as `eval_app.command("reward")(reward)`; the library is `rbr_model.reward_eval`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from rbr_model.cli.common import chosen_heads, fail, failing, stack_settings


def reward(
    gold: Annotated[Path, typer.Option("--gold", "-g", help="Labelled rows in OpenAI's gold format (prompt, "
                                       "completion, response_type, propositions {label: true/false}), e.g. "
                                       "../shared/reference/openai-rbr/gold_train.jsonl.")],
    policy_path: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML (default: packaged). "
                                                     "Its class rules turn the labels into human classes.")] = None,
    map_path: Annotated[Path | None, typer.Option("--map", help="YAML {policy proposition: gold label} (default: "
                                                  "the packaged map to OpenAI's labels, or the same names).")
                        ] = None,
    weights_path: Annotated[Path | None, typer.Option("--weights", help="Weights for the reward (default: "
                                                      "packaged). With --service-url, the weights the service "
                                                      "serves: the oracle rows use them, and the report says how "
                                                      "far the served rewards are from them.")] = None,
    service_url: Annotated[str | None, typer.Option("--service-url", envvar="RBR_SERVICE_URL", help="Take the "
                                                    "reward and features from this running rbr-serve "
                                                    "(POST /v1/rewards, rm_score 0) instead of in process.")
                           ] = None,
    service_key: Annotated[str | None, typer.Option("--service-key", envvar="RBR_API_KEY", help="Bearer key "
                                                    "for --service-url.")] = None,
    cv: Annotated[bool | None, typer.Option("--cv/--no-cv", help="--cv: heads refitted out of fold on --gold "
                                            "(plus the extra rows the heads file was fitted on), so no row is "
                                            "graded by a head that saw it; --no-cv: grade as served. Default: "
                                            "--cv when --gold is the heads' own training file (in process "
                                            "only).")] = None,
    folds: Annotated[int, typer.Option("--folds", min=2, help="Folds for --cv, stratified by response type "
                                       "and human class.")] = 5,
    heads_choice: Annotated[str, typer.Option("--heads", help="In process: a heads file, `auto` (packaged) or "
                                              "`none` (prompted grader only). With --cv, the file whose recipe "
                                              "(layer, extra rows) is refitted per fold.")] = "auto",
    calibrate: Annotated[bool | None, typer.Option("--calibrate/--no-calibrate", help="With --cv: refit the "
                                                   "heads with (or without) their out-of-fold Platt map. Default: "
                                                   "as the heads file was fitted.")] = None,
    extra: Annotated[list[Path] | None, typer.Option("--extra", help="With --cv: rows that join every training "
                                                     "fold and are never scored (default: the heads file's own "
                                                     "extra rows). Repeatable.")] = None,
    bootstrap_n: Annotated[int, typer.Option("--bootstrap", min=10, help="Bootstrap resamples (over rows, per "
                                             "response type).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Fold and bootstrap seed.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for reward_eval.json, reward_eval.png and "
                                      "reward_rows.jsonl.")] = Path("out/reward-eval"),
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Pooled-state cache for --cv (shared "
                                                   "with `rbr heads fit`).")] = Path("out/heads-cache"),
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="In-process grader context.")] = 4096,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """Does the reward rank completions the way people do? Per response type, against human classes.

    \b
    Each row's human class: its labels, as the policy's propositions (through
    the label map), through the policy's class rules; a proposition the row
    does not label counts as false. Classes rank in the policy's class_order.
    Then, per response type (95% bootstrap intervals over rows):
      pair accuracy  over pairs of rows whose human classes differ, how often
                     the better class gets the higher reward (ties half);
      AUC best       the reward of the best class present (ideal, where there
                     is one) against the rest;
      top-1          how often the most likely class is the human class;
                     and the confusion matrix.
    Each is computed twice with the same weights: on the served features
    ("served") and on the human labels as probabilities ("oracle"). The gap
    between them is what the grader loses; the oracle's gap to 1, what the
    weights and class rules lose.

    \b
    Where the probabilities come from:
      --service-url URL   a running rbr-serve, as a trainer sees it;
      in process          the grading stack of `rbr serve` (--heads);
      --cv (default on the heads' own training file): heads refitted per
                          fold without the fold's rows; propositions with no
                          head are graded by the prompted grader in process.
    Output: a table, reward_eval.json (every metric, every row), reward_eval.png.
    """
    from rbr_model import reward_eval as rev
    from rbr_model.cli.heads_cmd import load_labelled
    from rbr_model.reward import RewardModel, Weights, WeightsError, default_weights_path

    policy, gold_rows, mapping, why = load_labelled([gold], policy_path, map_path)
    labelled = rev.human_rows(policy, gold_rows, mapping)
    if not labelled.rows:
        raise fail(f"{gold}: no row has a response type of the policy and a class ({labelled.skipped})")
    with failing(WeightsError):
        weights = Weights.load(weights_path or default_weights_path())
        reward_model = RewardModel(policy, weights)
    typer.echo(f"{len(labelled.rows)} of {len(gold_rows)} rows have a human class ({why}); skipped: "
               f"{labelled.skipped or 'none'}", err=True)
    meta: dict[str, Any] = {"gold": str(gold), "rows": len(gold_rows), "classified": len(labelled.rows),
                            "skipped": labelled.skipped, "label_map": mapping, "policy": policy.short_version,
                            "weights": {"path": str(weights_path or default_weights_path()),
                                        "version": weights.version}}
    served, extra_records, row_folds = None, [], None
    if service_url is not None:
        if cv:
            raise fail("--cv grades in process; it cannot be combined with --service-url")
        probs, served, meta["served_versions"] = _through_service(labelled.rows, policy, service_url, service_key,
                                                                  progress)
        meta["grading"] = f"service {service_url}"
        if meta["served_versions"]["weights"] != [weights.version]:
            typer.echo(f"note: the service serves weights {meta['served_versions']['weights']}, --weights is "
                       f"{weights.version}: the oracle rows use --weights", err=True)
    else:
        probs, meta["grading"], extra_records, row_folds = _in_process(
            rev, policy, gold, gold_rows, labelled.rows, mapping, cv=cv, folds=folds, seed=seed,
            heads_choice=heads_choice, extra=extra, cache_dir=cache_dir, max_model_len=max_model_len,
            progress=progress, calibrate=calibrate)
    report = rev.evaluate_reward(policy, reward_model, labelled.rows, probs, served_rewards=served,
                                 n_boot=bootstrap_n, seed=seed)
    report["meta"] = meta
    typer.echo(f"grading: {meta['grading']}; weights {weights.version}")
    typer.echo(rev.format_report(report))
    out.mkdir(parents=True, exist_ok=True)
    rows = report.pop("rows")
    for rec, fold in zip(rows, row_folds or [], strict=False):
        rec["fold"] = fold  # the fold whose heads graded the row (rbr_model.reward_eval.fold_of)
    _write_json(report | {"rows": rows}, out / rev.REPORT_FILE)
    with (out / rev.ROWS_FILE).open("w", encoding="utf-8") as f:
        for rec in rows:
            f.write(json.dumps(_clean(rec)) + "\n")
    if extra_records:
        with (out / rev.EXTRA_ROWS_FILE).open("w", encoding="utf-8") as f:
            for rec in extra_records:
                f.write(json.dumps(_clean(rec)) + "\n")
        typer.echo(f"wrote the out-of-fold probabilities of {len(extra_records)} extra rows to "
                   f"{out / rev.EXTRA_ROWS_FILE}")
    png = rev.plot_report(report, out / rev.PLOT_FILE,
                          title=f"reward vs human classes: {gold.name}, {len(labelled.rows)} rows; {meta['grading']}")
    typer.echo(f"wrote {out / rev.REPORT_FILE}, {png} and {out / rev.ROWS_FILE}")


def _through_service(rows: Sequence[Any], policy: Any, url: str, key: str | None, progress: bool
                     ) -> tuple[list[dict[str, float]], list[float], dict[str, Any]]:
    """The served features and RBR rewards of every row through `rbr_client` (rm_score 0), and the versions the
    service reported."""
    import httpx
    from tqdm import tqdm

    from rbr_client import Item, RewardClient, RewardServiceError
    from rbr_model.features import FeatureBuilder

    builder = FeatureBuilder(policy)
    results = []
    try:
        with RewardClient(url, key) as client, tqdm(total=len(rows), desc="rewards", unit="row",
                                                    disable=not progress) as bar:
            for start in range(0, len(rows), 64):
                chunk = rows[start:start + 64]
                results += client.rewards([Item(r.messages, r.completion, r.response_type, 0.0) for r in chunk],
                                          return_features=True)
                bar.update(len(chunk))
    except (RewardServiceError, httpx.HTTPError) as exc:
        raise fail(f"the service at {url} failed: {type(exc).__name__}: {exc}", code=1) from None
    probs, served = [], []
    for r, res in zip(rows, results, strict=True):
        feats = res.features or {}
        missing = [p for p in builder[r.response_type].propositions if p not in feats]
        if missing:
            raise fail(f"{url}: the response has no features {missing} (does it serve this policy?)", code=1)
        probs.append({p: float(feats[p]) for p in builder[r.response_type].propositions})
        served.append(float(res.rbr_reward))
    versions = {"policy": sorted({str(r.policy_version) for r in results}),
                "weights": sorted({str(r.weights_version) for r in results})}
    return probs, served, versions


def _in_process(rev: Any, policy: Any, gold: Path, gold_rows: list, rows: Sequence[Any], mapping: Mapping[str, str],
                *, cv: bool | None, folds: int, seed: int, heads_choice: str, extra: list[Path] | None,
                cache_dir: Path | None, max_model_len: int, progress: bool, calibrate: bool | None = None
                ) -> tuple[list[dict[str, float]], str, list[dict[str, Any]], list[int] | None]:
    from rbr_model import models
    from rbr_model.cli.heads_cmd import file_sha256
    from rbr_model.features import FeatureBuilder
    from rbr_model.grading.engine import GradingError
    from rbr_model.heads import HeadsError

    settings = stack_settings(max_model_len=max_model_len, heads=heads_choice)
    heads = chosen_heads(settings, policy)
    if cv is None:
        cv = heads is not None and heads.info.get("gold_sha256") == file_sha256(gold)
    if cv and heads is None:
        raise fail("--cv refits heads: it needs --heads auto or a heads file")
    builder = FeatureBuilder(policy)
    needed = [list(builder[r.response_type].propositions) for r in rows]
    extra_records: list[dict[str, Any]] = []
    row_folds = None
    if cv:
        probs, extra_records, summary = _cv_heads(rev, heads, gold_rows, rows, mapping, folds=folds, seed=seed,
                                                  extra=extra, cache_dir=cache_dir, max_model_len=max_model_len,
                                                  progress=progress, calibrate=calibrate)
        row_folds = summary["row_folds"]
        how = (f"{folds}-fold CV, heads refitted out of fold (layer {heads.grader['layer']}; "
               f"{summary['extra_rows']} extra rows, folded by prompt; "
               f"{'calibrated' if summary['calibrated'] else 'uncalibrated'})")
    else:
        probs, how = [{} for _ in rows], f"in process, heads={heads_choice}"
    todo = [(i, [p for p in needed[i] if p not in probs[i]]) for i in range(len(rows))]
    todo = [(i, props) for i, props in todo if props]
    if todo:
        prompted = sorted({p for _, props in todo for p in props})
        if cv:
            how += f"; prompted in process: {', '.join(prompted)}"
            settings = stack_settings(max_model_len=max_model_len, heads="none")
        typer.echo(f"grading {sum(len(p) for _, p in todo)} (row, proposition) in process ...", err=True)
        try:
            graded = asyncio.run(_grade(settings, policy, rows, todo, progress))
        except (GradingError, HeadsError, models.ModelError) as exc:
            raise fail(f"grading failed: {exc}", code=1) from None
        for (i, _props), got in zip(todo, graded, strict=True):
            probs[i].update(got)
    return probs, how, extra_records, row_folds


async def _grade(settings: Any, policy: Any, rows: Sequence[Any], todo: list[tuple[int, list[str]]],
                 progress: bool) -> list[dict[str, float]]:
    from tqdm import tqdm

    from rbr_model.aio import gather_or_cancel
    from rbr_model.stack import build_stack

    async with await build_stack(settings, policy) as stack:
        gate = asyncio.Semaphore(32)
        with tqdm(total=len(todo), desc="grading", unit="row", disable=not progress) as bar:
            async def one(i: int, props: list[str]) -> dict[str, float]:
                async with gate:
                    (got,) = await stack.grader.grade([(rows[i].messages, rows[i].completion, props)])
                bar.update(1)
                return got

            return await gather_or_cancel(one(i, props) for i, props in todo)


def _cv_heads(rev: Any, heads: Any, gold_rows: list, rows: Sequence[Any], mapping: Mapping[str, str], *,
              folds: int, seed: int, extra: list[Path] | None, cache_dir: Path | None, max_model_len: int,
              progress: bool, calibrate: bool | None = None
              ) -> tuple[list[dict[str, float]], list[dict[str, Any]], dict[str, Any]]:
    """Out-of-fold P(yes) of the gold rows, records of the extra rows with theirs, and the CV summary."""
    from rbr_model import models
    from rbr_model.cli.heads_cmd import load_labelled, pooled_states
    from rbr_model.grading.engine import GradingError
    from rbr_model.stack import StackSettings, trunk_for

    extra_paths = extra if extra is not None else [Path(e["path"]) for e in heads.info.get("extra_rows", [])]
    extra_rows = load_labelled(extra_paths, None, None)[1] if extra_paths else []
    if extra_paths:
        # the heads' own label map covers the extra rows' labels too (weak labels under our names)
        mapping = dict(mapping) | {k: v for k, v in heads.info.get("label_map", {}).items() if k not in mapping}
    with failing(models.ModelError):
        trunk = trunk_for(StackSettings(), int(heads.grader["layer"]))
    try:
        pooled, _identity = asyncio.run(pooled_states(trunk, [*gold_rows, *extra_rows], max_model_len=max_model_len,
                                                      cache_dir=cache_dir, progress=progress,
                                                      pooling=heads.pooling))
    except GradingError as exc:
        raise fail(f"extracting hidden states failed: {exc}", code=1) from None
    typer.echo(f"refitting heads on {folds} folds ({len(extra_rows)} extra rows in each) ...", err=True)
    probs, extra_probs, summary = rev.cv_probabilities(pooled, gold_rows, rows, mapping, folds=folds, seed=seed,
                                                       extra=extra_rows, Cs=heads.info.get("Cs"),
                                                       calibrate=_calibrated(heads) if calibrate is None else calibrate)
    records = [{"source": str(path), "line": n, "prompt_id": raw.get("prompt_id"), "kind": raw.get("kind"),
                "response_type": r.get("response_type"), "labels": r["labels"], "fold": fold, "probabilities": p}
               for (path, n, raw), r, p, fold in zip(_located(extra_paths), extra_rows, extra_probs,
                                                     summary["extra_folds"], strict=True)]
    return probs, records, summary


def _calibrated(heads: Any) -> bool:
    """Whether a heads file was fitted with the out-of-fold Platt map (its heads' metrics record it)."""
    return any("platt" in m for m in heads.metrics.values() if isinstance(m, dict))


def _located(paths: Sequence[Path]) -> list[tuple[str, int, dict[str, Any]]]:
    """(file, line number, the raw JSON object) of every row of `paths` in order, blank lines skipped as the
    gold reader skips them; the raw object keeps what the reader drops (prompt_id, kind)."""
    return [(str(path), n, json.loads(line)) for path in paths
            for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _write_json(report: Mapping[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_clean(dict(report)), indent=1) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":  # `python -m rbr_model.cli.eval_reward_cmd --gold ...`; vLLM's engine core needs the guard
    typer.run(reward)
