"""Metrics of probabilities against yes/no labels, with numpy alone; every layer that scores something uses them.

Thresholded metrics use P(yes) >= 0.5. AUC is the Mann-Whitney statistic with average ranks for ties, so it
reads "how often a labelled yes scores above a labelled no". Intervals are percentile bootstraps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

LOG_EPS = 1e-12  # probabilities are clipped to [eps, 1 - eps] for the log-loss


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
    """Mean squared error of P(yes) against 0/1 labels; None for no rows."""
    p, y = _arrays(probs, labels)
    return float(np.mean((p - y) ** 2)) if p.size else None


def log_loss(probs: Iterable[float], labels: Iterable[Any], eps: float = LOG_EPS) -> float | None:
    """Mean negative log-likelihood with P(yes) clipped to [eps, 1 - eps]; None for no rows."""
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


def mean_finite(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are defined: a per-proposition metric may be None (one class only)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def percentile_intervals(draws: Mapping[str, Sequence[float]], keys: Iterable[str], level: float = 0.95
                         ) -> dict[str, list[float] | None]:
    """`[lo, hi]` percentiles of each key's bootstrap draws at `level`; None for a key that was never defined."""
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: ([float(np.percentile(draws[k], lo)), float(np.percentile(draws[k], hi))] if draws.get(k) else None)
            for k in keys}


def bootstrap_intervals(p: np.ndarray, y: np.ndarray, n: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile intervals of AUC, balanced accuracy and Brier over rows resampled with replacement."""
    rng = np.random.default_rng(seed)
    keys = ("auc", "balanced_accuracy", "brier")
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        m = binary_metrics(p[i], y[i])
        for k in keys:
            if m[k] is not None:
                draws[k].append(m[k])
    return percentile_intervals(draws, keys, level)
