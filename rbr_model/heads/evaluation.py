"""How good are heads against human labels, always beside a text-only baseline.

Two ways to measure:
- `cross_validated_report`: nested k-fold CV on one labelled set. In each outer fold the heads are refitted on
  the other folds' pooled states (scaler and C chosen there only) and so is the TF-IDF baseline, so every
  number is out-of-fold.
- `applied_report`: a fitted heads file applied as is to rows it was not fitted on (someone else's labels); the
  baseline is trained on the rows the heads were fitted on, so both saw the same data.
Each proposition gets AUC, balanced accuracy and Brier with bootstrap intervals, for heads and baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.heads.fitting import (
    DEFAULT_CS,
    Task,
    cross_validate,
    fit_logreg,
    pooled_features,
    tasks_from_rows,
    tfidf_features,
)
from rbr_model.metrics import binary_metrics, bootstrap_intervals

METHODS = ("heads", "tfidf")
METHOD_LABELS = {"heads": "heads (trunk states)", "tfidf": "TF-IDF baseline (completion words)",
                 "prompt": "prompted grader"}


def _scored(p: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    m = binary_metrics(p, y)
    return {k: m[k] for k in ("auc", "balanced_accuracy", "brier", "accuracy", "f1")} | {
        "ci": bootstrap_intervals(p, y, n=n_boot, seed=seed)}


def _summary(per_prop: Mapping[str, Mapping[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    out = {}
    for method in methods:
        vals = [s[method] for s in per_prop.values() if method in s]
        out[method] = {k: (float(np.mean([v[k] for v in vals if v[k] is not None])) if vals else None)
                       for k in ("auc", "balanced_accuracy", "brier")}
    return out


def cross_validated_report(pooled: np.ndarray, rows: Sequence[Mapping[str, Any]], mapping: Mapping[str, str], *,
                           folds: int = 5, seed: int = 0, Cs: Sequence[float] = DEFAULT_CS, n_boot: int = 1000,
                           progress: Callable[[str], None] | None = None,
                           extra_rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Nested CV of heads and the TF-IDF baseline on the same rows and the same outer folds.

    `extra_rows` (their pooled states follow the rows' in `pooled`) join every training fold, as they joined the
    heads' fit, and are never scored: the figures stay about `rows` alone."""
    tasks, skipped = tasks_from_rows(rows, mapping)
    extra = {t.name: Task(t.name, t.label, t.rows + len(rows), t.y)
             for t in tasks_from_rows(extra_rows, mapping, min_per_class=0)[0]}
    texts = [r["completion"] for r in [*rows, *extra_rows]]
    per_prop: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, list]] = {}
    for task in tasks:
        more = extra.get(task.name)
        p_heads = cross_validate(pooled_features(pooled), task, Cs=Cs, folds=folds, seed=seed, extra=more)
        p_text = cross_validate(tfidf_features(texts), task, Cs=Cs, folds=folds, seed=seed, extra=more)
        per_prop[task.name] = {"label": task.label, "n": int(len(task.y)), "positives": int(task.y.sum()),
                               "heads": _scored(p_heads, task.y, n_boot, seed),
                               "tfidf": _scored(p_text, task.y, n_boot, seed)}
        predictions[task.name] = {"row": task.rows.tolist(), "heads": p_heads.tolist(), "tfidf": p_text.tolist(),
                                  "y": task.y.astype(int).tolist()}
        if progress:
            progress(task.name)
    mode = f"{folds}-fold nested cross-validation"
    if extra_rows:
        mode += f"; {len(extra_rows)} extra rows in every training fold"
    return {"mode": mode, "rows": len(rows), "propositions": per_prop,
            "skipped": skipped, "overall": _summary(per_prop, METHODS), "predictions": predictions}


def applied_report(heads: Any, pooled: np.ndarray, rows: Sequence[Mapping[str, Any]], mapping: Mapping[str, str],
                   *, baseline_rows: Sequence[Mapping[str, Any]] | None, seed: int = 0,
                   Cs: Sequence[float] = DEFAULT_CS, folds: int = 5, n_boot: int = 1000) -> dict[str, Any]:
    """A fitted heads file on new rows; the baseline trained on `baseline_rows` (the heads' own training rows)."""
    tasks, skipped = tasks_from_rows(rows, mapping)
    texts = [r["completion"] for r in rows]
    base_tasks = {t.name: t for t in tasks_from_rows(baseline_rows, mapping)[0]} if baseline_rows else {}
    per_prop: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, list]] = {}
    for task in tasks:
        if task.name not in heads:
            skipped[task.name] = "no head in the heads file"
            continue
        p_heads = heads.predict(pooled[task.rows], [task.name])[:, 0]
        entry = {"label": task.label, "n": int(len(task.y)), "positives": int(task.y.sum()),
                 "heads": _scored(p_heads, task.y, n_boot, seed)}
        pred = {"row": task.rows.tolist(), "heads": p_heads.tolist(), "y": task.y.astype(int).tolist()}
        base = base_tasks.get(task.name)
        if base is not None:
            p_text = _tfidf_train_apply(baseline_rows, base, [texts[i] for i in task.rows], Cs, folds, seed)
            entry["tfidf"] = _scored(p_text, task.y, n_boot, seed)
            pred["tfidf"] = p_text.tolist()
        per_prop[task.name] = entry
        predictions[task.name] = pred
    return {"mode": "heads file applied as fitted" + ("; baseline trained on the heads' training rows"
                                                      if base_tasks else "; no baseline (training rows absent)"),
            "rows": len(rows), "propositions": per_prop, "skipped": skipped,
            "overall": _summary(per_prop, METHODS), "predictions": predictions}


def _tfidf_train_apply(train_rows: Sequence[Mapping[str, Any]], task: Task, test_texts: list[str],
                       Cs: Sequence[float], folds: int, seed: int) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    X = vec.fit_transform([train_rows[i]["completion"] for i in task.rows])
    model, _ = fit_logreg(X, task.y, Cs, folds, seed)
    return model.predict_proba(vec.transform(test_texts))[:, 1]


def add_prompted(report: dict[str, Any], prompt_report: Mapping[str, Any], n_boot: int = 1000,
                 seed: int = 0) -> None:
    """Put the prompted grader's numbers on the same rows beside heads and baseline (`--method both`)."""
    for name, entry in report["propositions"].items():
        pr = prompt_report["predictions"].get(name)
        if not pr:
            continue
        by_row = dict(zip(pr["row"], pr["p"], strict=True))
        rows = report["predictions"][name]["row"]
        if all(r in by_row for r in rows):
            p = np.array([by_row[r] for r in rows])
            y = np.array(report["predictions"][name]["y"], dtype=bool)
            entry["prompt"] = _scored(p, y, n_boot, seed)
    report["overall"] = _summary(report["propositions"], [*METHODS, "prompt"])


def format_report(report: Mapping[str, Any]) -> str:
    methods = [m for m in ("heads", "tfidf", "prompt") if any(m in s for s in report["propositions"].values())]
    props = report["propositions"]
    width = max([len("proposition"), *(len(n) for n in props)])
    head = f"{'proposition':<{width}}  {'n':>4} {'pos':>4}  " + "  ".join(
        f"{m + ' auc [95% CI]':>22} {'bal':>5}" for m in methods)
    lines = [head]

    def cell(s: Mapping[str, Any] | None) -> str:
        if not s or s.get("auc") is None:
            return f"{'-':>22} {'-':>5}"
        ci = s["ci"]["auc"] or [float("nan")] * 2
        return f"{s['auc']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]".rjust(22) + f" {s['balanced_accuracy']:.2f}".rjust(6)

    order = sorted(props, key=lambda n: props[n]["heads"]["auc"] or 0, reverse=True)
    for name in order:
        s = props[name]
        lines.append(f"{name:<{width}}  {s['n']:>4} {s['positives']:>4}  " + "  ".join(cell(s.get(m))
                                                                                       for m in methods))
    o = report["overall"]
    lines.append(f"{'mean':<{width}}  {'':>4} {'':>4}  " + "  ".join(
        f"{o[m]['auc']:.3f}".rjust(22) + f" {o[m]['balanced_accuracy']:.2f}".rjust(6) for m in methods))
    return "\n".join(lines)


def plot_heads_report(report: Mapping[str, Any], path: str | Path, title: str) -> Path:
    """AUC per proposition with 95% bootstrap intervals: heads, TF-IDF baseline (and prompted), chance line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    props = report["propositions"]
    names = sorted(props, key=lambda n: props[n]["heads"]["auc"] or 0)
    methods = [m for m in ("heads", "tfidf", "prompt") if any(m in s for s in props.values())]
    colors = {"heads": "#3b6ea8", "tfidf": "#e0a040", "prompt": "#8e8e8e"}
    fig, ax = plt.subplots(figsize=(9, max(4.0, 0.4 * len(names) + 1.5)))
    height = 0.8 / len(methods)
    pos = np.arange(len(names))
    for k, m in enumerate(methods):
        vals = [props[n][m]["auc"] if m in props[n] and props[n][m]["auc"] is not None else np.nan for n in names]
        lo = [v - props[n][m]["ci"]["auc"][0] if m in props[n] and props[n][m]["ci"]["auc"] else 0
              for n, v in zip(names, vals, strict=True)]
        hi = [props[n][m]["ci"]["auc"][1] - v if m in props[n] and props[n][m]["ci"]["auc"] else 0
              for n, v in zip(names, vals, strict=True)]
        mean = report["overall"][m]["auc"]
        ax.barh(pos + (k - (len(methods) - 1) / 2) * height, vals, height=height, xerr=[lo, hi],
                color=colors[m], label=f"{METHOD_LABELS[m]} (mean {mean:.2f})", error_kw={"elinewidth": 0.8})
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_yticks(pos)
    ax.set_yticklabels([f"{n} ({props[n]['positives']}/{props[n]['n']})" for n in names], fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("ROC AUC against human labels, 95% bootstrap interval (labelled yes / rows)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07 - 2.5 / max(8, len(names) * 3)), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
