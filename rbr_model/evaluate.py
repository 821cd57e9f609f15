"""Grader accuracy against human labels: metrics, the evaluation loop, the plot and the JSON report.

The gold format is OpenAI's `gold_train.jsonl`: one JSON object a line with `prompt` (messages up to the last
user turn), `completion` (a list holding one assistant message), `response_type` and `propositions`
(`{label name: true/false}`). A policy's proposition is compared with a label through a name map
(`{our proposition: their label}`); for a policy imported from OpenAI's YAML the names already agree.

Metrics are computed with numpy alone. Thresholded metrics use P(yes) >= 0.5. AUC is the Mann-Whitney
statistic with average ranks for ties, so it reads "how often a labelled yes scores above a labelled no".
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.aio import gather_or_cancel
from rbr_model.files import read_jsonl, read_text
from rbr_model.policy import Policy, PolicyError, read_yaml

LOG_EPS = 1e-12  # probabilities are clipped to [eps, 1 - eps] for the log-loss
OPENAI_LABEL_MAP = "openai_label_map.yaml"  # packaged: our default policy's names -> OpenAI's label names


class GoldError(ValueError):
    """A gold file, label map or proposition selection is unusable; the message names the file and the line."""


# ---- metrics --------------------------------------------------------------------------------------------


def _arrays(probs: Iterable[float], labels: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(list(probs) if not isinstance(probs, np.ndarray) else probs, dtype=float).ravel()
    y = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels).astype(bool).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} labels")
    if p.size and (np.isnan(p).any() or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must lie in [0, 1]")
    return p, y


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], sorted_vals.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_of = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(values.size, dtype=float)
    ranks[order] = run_rank[run_of]
    return ranks


def roc_auc(probs: Iterable[float], labels: Iterable[Any]) -> float | None:
    """Area under the ROC curve (ties count one half); None when one class is absent."""
    p, y = _arrays(probs, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def brier_score(probs: Iterable[float], labels: Iterable[Any]) -> float | None:
    p, y = _arrays(probs, labels)
    return float(np.mean((p - y) ** 2)) if p.size else None


def log_loss(probs: Iterable[float], labels: Iterable[Any], eps: float = LOG_EPS) -> float | None:
    p, y = _arrays(probs, labels)
    if not p.size:
        return None
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def binary_metrics(probs: Iterable[float], labels: Iterable[Any], threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of P(yes) against yes/no labels. A metric that is undefined for the data is None.

    - accuracy: share right at `p >= threshold`.
    - balanced_accuracy: mean recall over the classes present (sklearn's convention when one is missing).
    - precision / recall / f1: for the yes class; precision is None with no predicted yes, recall with no
      labelled yes, f1 (= 2tp / (2tp + fp + fn)) when there is neither.
    - auc: see `roc_auc`; brier, log_loss: proper scores of the probabilities (lower is better).
    """
    p, y = _arrays(probs, labels)
    n = int(p.size)
    pred = p >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    pos, neg = tp + fn, tn + fp
    recall = tp / pos if pos else None
    specificity = tn / neg if neg else None
    present = [r for r in (recall, specificity) if r is not None]
    return {
        "n": n,
        "positives": pos,
        "predicted_positives": tp + fp,
        "accuracy": (tp + tn) / n if n else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": recall,
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None,
        "auc": roc_auc(p, y),
        "brier": brier_score(p, y),
        "log_loss": log_loss(p, y),
        "mean_p": float(p.mean()) if n else None,
    }


def reliability_curve(probs: Iterable[float], labels: Iterable[Any], bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins of P(yes): per non-empty bin its range, mean P(yes), share of labelled yes, count."""
    p, y = _arrays(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            out.append({
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "mean_p": float(p[mask].mean()),
                "frac_yes": float(y[mask].mean()),
                "n": int(mask.sum()),
            })
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


# ---- gold data and label maps ---------------------------------------------------------------------------


def load_gold(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a gold JSONL file; every problem names the file and the line."""
    rows = [_check_row(row, where) for where, row in read_jsonl(path, GoldError)]
    if not rows:
        raise GoldError(f"{path}: no rows")
    return rows


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise GoldError(f"{where}: expected a JSON object")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        raise GoldError(f"{where}: prompt: expected a list of {{'role', 'content'}} messages")
    completion = row.get("completion")
    if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict):
        completion = completion[0].get("content")
    elif isinstance(completion, dict):
        completion = completion.get("content")
    if not isinstance(completion, str):
        raise GoldError(f"{where}: completion: expected one assistant message (or a string)")
    labels = row.get("propositions")
    if not isinstance(labels, dict) or not labels:
        raise GoldError(f"{where}: propositions: expected {{name: true/false}}")
    clean: dict[str, bool] = {}
    for name, value in labels.items():
        if value is None:
            continue  # unlabelled for this row
        if isinstance(value, bool) or value in (0, 1):
            clean[str(name)] = bool(value)
        else:
            raise GoldError(f"{where}: propositions.{name}: expected true or false, got {value!r}")
    return {
        "prompt": prompt,
        "completion": completion,
        "response_type": row.get("response_type"),
        "category": row.get("category"),
        "labels": clean,
    }


def load_label_map(path: str | Path | None = None) -> dict[str, str]:
    """A YAML `{our proposition: gold label name}`; None loads the packaged map to OpenAI's labels."""
    if path is None:
        ref = resources.files("rbr_model") / "data" / OPENAI_LABEL_MAP
        text, source = ref.read_text(encoding="utf-8"), OPENAI_LABEL_MAP
    else:
        text, source = read_text(path, GoldError), str(path)
    try:
        data = read_yaml(text, source)
    except PolicyError as exc:
        raise GoldError(str(exc)) from None
    if not isinstance(data, dict) or not data:
        raise GoldError(f"{source}: expected a mapping {{our proposition: gold label}}")
    out = {}
    for ours, theirs in data.items():
        if not isinstance(ours, str) or not isinstance(theirs, str) or not theirs:
            raise GoldError(f"{source}: {ours!r}: expected a label name (string)")
        out[ours] = theirs
    if len(set(out.values())) != len(out):
        raise GoldError(f"{source}: two propositions map to the same label")
    return out


def resolve_label_map(
    policy: Policy,
    rows: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, str] | None = None,
    propositions: Sequence[str] | None = None,
) -> dict[str, str]:
    """Which gold label each graded proposition is compared with, in policy order.

    Without a map, every policy proposition whose name is also a gold label is used as is. Names in the map or
    in `propositions` that the policy or the gold set does not know are errors, not silently dropped.
    """
    gold_names: set[str] = set()
    for row in rows:
        gold_names |= set(row["labels"])
    if label_map is None:
        mapping = {n: n for n in policy.propositions if n in gold_names}
        if not mapping:
            raise GoldError(
                f"no proposition of policy {policy.name!r} is named like a gold label; pass a label map (--map)"
            )
    else:
        unknown = [n for n in label_map if n not in policy.propositions]
        if unknown:
            raise GoldError(f"label map: {unknown} are not propositions of policy {policy.name!r}")
        missing = [v for v in label_map.values() if v not in gold_names]
        if missing:
            raise GoldError(f"label map: {missing} are not labels in the gold set")
        mapping = {n: label_map[n] for n in policy.propositions if n in label_map}
    if propositions:
        unknown = [n for n in propositions if n not in mapping]
        if unknown:
            raise GoldError(f"--propositions: {unknown} are not mapped to gold labels (mapped: {sorted(mapping)})")
        mapping = {n: mapping[n] for n in mapping if n in set(propositions)}
    return mapping


def default_label_map(policy: Policy, rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, str] | None, str]:
    """The map to use when none is given, and a few words on why.

    Same names when every proposition of the policy is a gold label (OpenAI's YAML against OpenAI's labels);
    otherwise the packaged map to OpenAI's labels when the policy and the gold set both fit it; otherwise same
    names wherever they agree.
    """
    gold_names = {name for row in rows for name in row["labels"]}
    if set(policy.propositions) <= gold_names:
        return None, "policy names are the gold label names"
    packaged = load_label_map(None)
    if set(packaged) <= set(policy.propositions) and set(packaged.values()) <= gold_names:
        return packaged, f"packaged map rbr_model/data/{OPENAI_LABEL_MAP} ({len(packaged)} propositions)"
    return None, "only the propositions named like a gold label (no --map given)"


def subsample(rows: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """`limit` rows drawn at random (seeded) and kept in file order; all rows when `limit` is None or larger.

    Gold files are often grouped by response type, so the first rows would not be a fair sample.
    """
    if limit is None or limit >= len(rows):
        return list(rows)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=max(limit, 0), replace=False))
    return [rows[i] for i in keep]


# ---- the evaluation loop ------------------------------------------------------------------------------------


async def evaluate_grader(
    grader: Any,
    rows: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, str] | None = None,
    propositions: Sequence[str] | None = None,
    *,
    concurrency: int = 64,
    progress: bool | Callable[[int, int], None] = False,
) -> dict[str, Any]:
    """Grade every (row, mapped proposition) that has a label and compare P(yes) with the labels.

    `rows` come from `load_gold`. Judgments run `concurrency` at a time in row order, so one row's prompts
    share their conversation prefix in vLLM's cache. A judgment the engine refuses for good (a prompt longer
    than the context) is counted in `failed` and left out; an error that may pass (engine down) aborts.
    Metrics use the grader's calibration when it has one; the raw P(yes) is kept beside it for calibrating.
    """
    from rbr_model.grading.engine import GradingError

    mapping = resolve_label_map(grader.policy, rows, label_map, propositions)
    jobs = [(i, name) for i, row in enumerate(rows) for name, label in mapping.items() if label in row["labels"]]
    raw: dict[tuple[int, str], Any] = {}
    failures: list[str] = []
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="grading", unit="judgment", smoothing=0.05)
    done = 0
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        nonlocal done
        while True:
            try:
                i, name = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            row = rows[i]
            try:
                (judged,) = await grader.grade_judgments([(row["prompt"], row["completion"], [name])])
                raw[(i, name)] = judged[name]
            except GradingError as exc:
                if exc.retryable:
                    raise
                failures.append(f"row {i} / {name}: {exc}")
            done += 1
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, len(jobs))

    start = time.perf_counter()
    try:
        await gather_or_cancel(worker() for _ in range(max(1, min(concurrency, len(jobs) or 1))))
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start

    cal = getattr(grader, "calibration", None)
    per_prop: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, list]] = {}
    for name, label in mapping.items():
        idx = [i for i in range(len(rows)) if (i, name) in raw]
        p_raw = [raw[(i, name)].p_yes for i in idx]
        p = [cal.apply(name, v) for v in p_raw] if cal is not None else list(p_raw)
        y = [rows[i]["labels"][label] for i in idx]
        mass = [raw[(i, name)].yes_no_mass for i in idx]
        stats = binary_metrics(p, y)
        stats["label"] = label
        stats["mean_yes_no_mass"] = float(np.mean(mass)) if mass else None
        per_prop[name] = stats
        predictions[name] = {"row": idx, "p_raw": p_raw, "p": p, "y": y}

    all_p = [v for pr in predictions.values() for v in pr["p"]]
    all_y = [v for pr in predictions.values() for v in pr["y"]]
    n_judged = len(raw)
    tokens = [j.prompt_tokens for j in raw.values() if j.prompt_tokens is not None]
    cached = [j.cached_tokens for j in raw.values() if j.cached_tokens is not None]
    policy = grader.policy
    return {
        "grader": {
            "model_id": grader.engine.model_id,
            "fingerprint": grader.fingerprint,
            "calibration": getattr(cal, "fingerprint", None) if cal is not None else None,
        },
        "policy": {"name": policy.name, "fingerprint": policy.fingerprint, "source": policy.source},
        "rows": len(rows),
        "label_map": dict(mapping),
        "judgments": n_judged,
        "failed": len(failures),
        "failures": failures[:20],
        "wall_s": wall,
        "judgments_per_s": n_judged / wall if wall > 0 else None,
        "prompt_tokens": int(sum(tokens)) if tokens else None,
        "cached_prompt_tokens": int(sum(cached)) if cached else None,
        "propositions": per_prop,
        "overall": {
            "mean_auc": _mean(s["auc"] for s in per_prop.values()),
            "mean_balanced_accuracy": _mean(s["balanced_accuracy"] for s in per_prop.values()),
            "mean_f1": _mean(s["f1"] for s in per_prop.values()),
            "mean_accuracy": _mean(s["accuracy"] for s in per_prop.values()),
            "pooled": binary_metrics(all_p, all_y),
            "reliability": reliability_curve(all_p, all_y),
        },
        "predictions": predictions,
    }


# ---- output -------------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to null."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(report), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table: one line per proposition, sorted by AUC, then the means."""

    def f(v: Any) -> str:
        return "   -" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    props = report["propositions"]
    width = max([len("proposition"), *(len(n) for n in props)])
    lines = [f"{'proposition':<{width}}  {'n':>4} {'pos':>4}  {'acc':>5} {'bal':>5} {'f1':>5} {'auc':>5} "
             f"{'brier':>5}  gold label (if named otherwise)"]
    order = sorted(props, key=lambda n: -1.0 if props[n]["auc"] is None else props[n]["auc"], reverse=True)
    for name in order:
        s = props[name]
        lines.append(
            f"{name:<{width}}  {s['n']:>4} {s['positives']:>4}  {f(s['accuracy']):>5} {f(s['balanced_accuracy']):>5} "
            f"{f(s['f1']):>5} {f(s['auc']):>5} {f(s['brier']):>5}  {'' if s['label'] == name else s['label']}".rstrip()
        )
    o = report["overall"]
    lines.append(
        f"{'mean':<{width}}  {'':>4} {'':>4}  {f(o['mean_accuracy']):>5} {f(o['mean_balanced_accuracy']):>5} "
        f"{f(o['mean_f1']):>5} {f(o['mean_auc']):>5}"
    )
    return "\n".join(lines)


def plot_report(report: Mapping[str, Any], path: str | Path,
                calibrated: Mapping[str, Sequence[float]] | None = None) -> Path:
    """Left: AUC and balanced accuracy per proposition (sorted by AUC) with the 0.5 chance line. Right: the
    reliability diagram of P(yes) pooled over propositions; `calibrated` (out-of-fold calibrated P(yes) per
    proposition, aligned with `report["predictions"]`) adds a second curve.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    props = report["propositions"]
    names = sorted(props, key=lambda n: -1.0 if props[n]["auc"] is None else props[n]["auc"])
    auc = [np.nan if props[n]["auc"] is None else props[n]["auc"] for n in names]
    bal = [np.nan if props[n]["balanced_accuracy"] is None else props[n]["balanced_accuracy"] for n in names]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.32 * len(names) + 1.5)),
                                   gridspec_kw={"width_ratios": [1.4, 1]})
    pos = np.arange(len(names))
    ax1.barh(pos + 0.2, auc, height=0.4, label="ROC AUC", color="#3b6ea8")
    ax1.barh(pos - 0.2, bal, height=0.4, label="balanced accuracy (p >= 0.5)", color="#e0a040")
    for y_pos, value in zip(pos, auc, strict=True):
        if np.isnan(value):
            ax1.text(0.01, y_pos + 0.2, "AUC n/a (one class only)", va="center", fontsize=7, color="#3b6ea8")
    ax1.axvline(0.5, color="black", linestyle="--", linewidth=1, label="chance")
    ax1.set_yticks(pos)
    ax1.set_yticklabels([f"{n} ({props[n]['positives']}/{props[n]['n']})" for n in names], fontsize=8)
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("score (labelled yes / judged, in brackets)")
    ax1.set_title(f"{report['grader']['model_id']} on {report['rows']} gold rows: per proposition")
    ax1.legend(loc="lower right", fontsize=8)

    ax2.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    preds = report.get("predictions") or {}
    raw_p = [v for pr in preds.values() for v in pr["p"]]
    ys = [v for pr in preds.values() for v in pr["y"]]
    curves = []
    if calibrated:
        cal_p = [v for n in preds for v in calibrated.get(n, [])]
        if len(cal_p) == len(ys):
            curves.append(("calibrated (out-of-fold)", cal_p, "#c0392b", "--", "s"))
    curves.append(("grader P(yes)", raw_p, "#3b6ea8", "-", "o"))  # drawn last: visible where they coincide
    for label, p, color, style, marker in curves:
        if not p:
            continue
        curve = reliability_curve(p, ys)
        ax2.plot([b["mean_p"] for b in curve], [b["frac_yes"] for b in curve], marker=marker, color=color,
                 linestyle=style, label=label)
        ax2.scatter([b["mean_p"] for b in curve], [b["frac_yes"] for b in curve],
                    s=[8 + 120 * b["n"] / len(p) for b in curve], color=color, alpha=0.3)
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("predicted P(yes) (bin mean; marker area ~ count)")
    ax2.set_ylabel("share labelled yes")
    ax2.set_title("reliability, pooled over propositions")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
