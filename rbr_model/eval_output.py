"""The grader evaluation's outputs: the JSON report, the plain-text table, the plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.metrics import reliability_curve


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
