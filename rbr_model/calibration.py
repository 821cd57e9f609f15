"""Per-proposition logistic (Platt) calibration of the grader's P(yes).

For each proposition the calibrated probability is `sigmoid(a * logit(p) + b)`, with `a` and `b` fitted on a
labelled set by Newton's method on the log-loss plus a small L2 penalty that pulls towards the identity map
(`a = 1, b = 0`): with few labels the map stays close to the grader's own numbers. A proposition with too few
labels, or with one class only, keeps the identity map. The slope is kept non-negative, so the map never
reverses the grader's ranking: where the best slope would be negative (the grader's P(yes) ranks the wrong
way), the map becomes the constant base rate instead (status `flat`), which is what the labels support.

A `Calibration` is part of the grader configuration: the `Grader` applies it to every P(yes) and its
`fingerprint` (a hash of the rounded parameters) goes into the grader's fingerprint, so cached features made
under another calibration are never reused. The file also records which grader it was fitted for.

`cross_validate` measures the effect honestly: each fold's map is fitted without that fold's labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.files import read_json
from rbr_model.metrics import binary_metrics

METHOD = "platt-logit-1"  # part of the fingerprint: bump if the formula or the clipping changes
P_EPS = 1e-6  # P(yes) is clipped to [eps, 1 - eps] before the logit
CV_NOTE = (
    "A single increasing map leaves a proposition's AUC unchanged; in cross-validation each held-out fold gets "
    "its own map (a flat one turns the fold's scores into ties), so out-of-fold AUC moves, the more the fewer "
    "labels. Pooled AUC mixes propositions, whose maps shift them against each other, so it can move either way. "
    "Calibration shows its effect in log-loss, Brier score and accuracy at 0.5, not in ranking."
)


class CalibrationError(ValueError):
    """A calibration file or its input is unusable; the message names the file or the proposition."""


@dataclass(frozen=True)
class PlattParams:
    """One proposition's map and how it came about."""

    a: float = 1.0
    b: float = 0.0
    n: int = 0
    positives: int = 0
    status: str = "identity"  # fitted | flat | too_few_labels | one_class | identity

    @property
    def is_identity(self) -> bool:
        return self.a == 1.0 and self.b == 0.0


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), P_EPS, 1.0 - P_EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))  # stable for large |z|


def _penalised_nll(theta: np.ndarray, X: np.ndarray, y: np.ndarray, prior: np.ndarray, l2: float) -> float:
    z = X @ theta
    # log(1 + e^z) - y z, computed stably
    nll = np.sum(np.logaddexp(0.0, z) - y * z)
    return float(nll + 0.5 * l2 * np.sum((theta - prior) ** 2))


def _newton(X: np.ndarray, y: np.ndarray, prior: np.ndarray, l2: float, max_iter: int = 100) -> np.ndarray:
    """Minimise the log-loss + (l2 / 2) |theta - prior|^2 by Newton steps with backtracking."""
    theta = prior.astype(float).copy()
    ridge = max(l2, 1e-9) * np.eye(X.shape[1])
    loss = _penalised_nll(theta, X, y, prior, l2)
    for _ in range(max_iter):
        q = _sigmoid(X @ theta)
        grad = X.T @ (q - y) + l2 * (theta - prior)
        hess = (X * (q * (1.0 - q))[:, None]).T @ X + ridge
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = theta - t * step
            cand_loss = _penalised_nll(cand, X, y, prior, l2)
            if cand_loss <= loss + 1e-12 or t < 1e-8:
                break
            t *= 0.5
        done = abs(loss - cand_loss) < 1e-10 * max(1.0, abs(loss)) or np.max(np.abs(t * step)) < 1e-9
        theta, loss = cand, min(cand_loss, loss)
        if done:
            break
    return theta


class Calibration:
    """Per-proposition Platt scaling of P(yes). Unknown propositions pass through unchanged.

    `l2` is the penalty towards the identity map (in units of summed log-loss); a proposition needs at least
    `min_labels` labels and `min_per_class` of each class to be fitted. Learned maps are in `params_`.
    """

    def __init__(
        self,
        params: Mapping[str, PlattParams] | None = None,
        *,
        l2: float = 1.0,
        min_labels: int = 20,
        min_per_class: int = 5,
        fitted_for: Mapping[str, Any] | None = None,
    ):
        if l2 < 0 or not math.isfinite(l2):
            raise CalibrationError(f"l2 must be a finite number >= 0, got {l2}")
        self.l2 = float(l2)
        self.min_labels = int(min_labels)
        self.min_per_class = int(min_per_class)
        self.params_: dict[str, PlattParams] = dict(params or {})
        self.fitted_for: dict[str, Any] = dict(fitted_for or {})
        self.created: str | None = None

    # ---- fitting ------------------------------------------------------------------------------------------
    def fit(
        self,
        probs_by_name: Mapping[str, Iterable[float]],
        labels_by_name: Mapping[str, Iterable[Any]],
    ) -> Calibration:
        """Fit one map per proposition from raw P(yes) and yes/no labels; returns self."""
        missing = sorted(set(probs_by_name) ^ set(labels_by_name))
        if missing:
            raise CalibrationError(f"probabilities and labels name different propositions: {missing}")
        params: dict[str, PlattParams] = {}
        for name in sorted(probs_by_name):
            p = np.asarray(list(probs_by_name[name]), dtype=float)
            y = np.asarray(list(labels_by_name[name])).astype(bool)
            if p.shape != y.shape:
                raise CalibrationError(f"{name}: {p.size} probabilities but {y.size} labels")
            if p.size and (np.isnan(p).any() or p.min() < 0.0 or p.max() > 1.0):
                raise CalibrationError(f"{name}: probabilities must lie in [0, 1]")
            params[name] = self._fit_one(p, y.astype(float))
        self.params_ = params
        self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return self

    def _fit_one(self, p: np.ndarray, y: np.ndarray) -> PlattParams:
        n, pos = int(y.size), int(y.sum())
        if n < self.min_labels:
            return PlattParams(n=n, positives=pos, status="too_few_labels")
        if min(pos, n - pos) == 0:
            return PlattParams(n=n, positives=pos, status="one_class")
        if min(pos, n - pos) < self.min_per_class:
            return PlattParams(n=n, positives=pos, status="too_few_labels")
        X = np.column_stack([_logit(p), np.ones(n)])
        a, b = _newton(X, y, np.array([1.0, 0.0]), self.l2)
        status = "fitted"
        if a < 0.0:  # never reverse the grader's ranking: fall back to the base rate (intercept only)
            (b,) = _newton(X[:, 1:], y, np.array([0.0]), self.l2)
            a, status = 0.0, "flat"
        return PlattParams(a=float(a), b=float(b), n=n, positives=pos, status=status)

    # ---- applying -----------------------------------------------------------------------------------------
    def apply(self, name: str, p: float) -> float:
        """The calibrated P(yes) for one proposition (the grader's hook)."""
        prm = self.params_.get(name)
        if prm is None or prm.is_identity:
            return float(p)
        return float(_sigmoid(prm.a * _logit(np.asarray(p)) + prm.b))

    def apply_many(self, name: str, probs: Iterable[float]) -> np.ndarray:
        p = np.asarray(list(probs) if not isinstance(probs, np.ndarray) else probs, dtype=float)
        prm = self.params_.get(name)
        if prm is None or prm.is_identity:
            return p.copy()
        return _sigmoid(prm.a * _logit(p) + prm.b)

    @property
    def is_identity(self) -> bool:
        return all(prm.is_identity for prm in self.params_.values())

    # ---- identity -----------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the method and the rounded non-identity maps: equal maps, equal fingerprints."""
        blob = json.dumps(
            {
                "method": METHOD,
                "eps": P_EPS,
                "params": {
                    n: [round(prm.a, 6), round(prm.b, 6)]
                    for n, prm in sorted(self.params_.items())
                    if not prm.is_identity
                },
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        fitted = sum(not prm.is_identity for prm in self.params_.values())
        return f"Calibration({fitted}/{len(self.params_)} propositions mapped, fingerprint={self.fingerprint[:12]})"

    # ---- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "fitted_for": self.fitted_for,
            "settings": {"l2": self.l2, "min_labels": self.min_labels, "min_per_class": self.min_per_class},
            "propositions": {n: asdict(prm) for n, prm in sorted(self.params_.items())},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> Calibration:
        if not isinstance(data, Mapping):
            raise CalibrationError(f"{source}: expected a JSON object")
        if data.get("method") != METHOD:
            raise CalibrationError(f"{source}: method {data.get('method')!r} is not {METHOD!r}")
        settings = data.get("settings") or {}
        props = data.get("propositions")
        if not isinstance(props, Mapping) or not isinstance(settings, Mapping):
            raise CalibrationError(f"{source}: propositions: expected {{name: {{a, b, ...}}}}")
        params = {}
        for name, spec in props.items():
            try:
                prm = PlattParams(
                    a=float(spec["a"]),
                    b=float(spec["b"]),
                    n=int(spec.get("n", 0)),
                    positives=int(spec.get("positives", 0)),
                    status=str(spec.get("status", "fitted")),
                )
            except (TypeError, KeyError, ValueError, AttributeError):
                raise CalibrationError(f"{source}: propositions.{name}: expected numbers a and b") from None
            if not (math.isfinite(prm.a) and math.isfinite(prm.b)) or prm.a < 0:
                raise CalibrationError(f"{source}: propositions.{name}: a must be finite and >= 0, b finite")
            params[str(name)] = prm
        try:
            cal = cls(
                params,
                l2=float(settings.get("l2", 1.0)),
                min_labels=int(settings.get("min_labels", 20)),
                min_per_class=int(settings.get("min_per_class", 5)),
                fitted_for=data.get("fitted_for") or {},
            )
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{source}: settings: {exc}") from None
        cal.created = data.get("created")
        stated = data.get("fingerprint")
        if stated is not None and stated != cal.fingerprint:
            raise CalibrationError(f"{source}: the stated fingerprint does not match the parameters (edited?)")
        return cal

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        data = read_json(path, CalibrationError)
        return cls.from_dict(data, source=str(path))


# ---- cross-validation -----------------------------------------------------------------------------------

_CV_METRICS = ("log_loss", "brier", "auc", "accuracy", "balanced_accuracy")


def _pick(stats: Mapping[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in _CV_METRICS}


def _stratified_folds(y: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index per example; each class is spread evenly over the folds."""
    fold_of = np.empty(y.size, dtype=int)
    offset = 0
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(y == cls))
        fold_of[idx] = (np.arange(idx.size) + offset) % folds
        offset += idx.size
    return fold_of


def _mean_of(rows: Iterable[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def cross_validate(
    probs: Mapping[str, Iterable[float]],
    labels: Mapping[str, Iterable[Any]],
    folds: int = 5,
    seed: int = 0,
    **calibration_kwargs: Any,
) -> dict[str, Any]:
    """Out-of-fold effect of calibration: metrics of the raw P(yes) and of the calibrated one, where each
    fold's map was fitted on the other folds (stratified by label, seeded).

    Returns `propositions` (per name: n, positives, folds fitted, `before` and `after`), `overall` (`pooled`
    over every judgment, and `mean` over propositions), the settings, a note on AUC, and `oof`: the
    out-of-fold calibrated probabilities per name, in input order.
    """
    if folds < 2:
        raise CalibrationError("cross-validation needs at least 2 folds")
    rng = np.random.default_rng(seed)
    per: dict[str, dict[str, Any]] = {}
    oof: dict[str, list[float]] = {}
    pooled_p: list[float] = []
    pooled_c: list[float] = []
    pooled_y: list[bool] = []
    for name in sorted(probs):
        p = np.asarray(list(probs[name]), dtype=float)
        y = np.asarray(list(labels[name])).astype(bool)
        if p.shape != y.shape:
            raise CalibrationError(f"{name}: {p.size} probabilities but {y.size} labels")
        if p.size == 0:
            continue
        k = min(folds, p.size)
        fold_of = _stratified_folds(y, k, rng)
        out = p.copy()
        fitted = 0
        for f in range(k):
            train, test = fold_of != f, fold_of == f
            if not test.any():
                continue
            cal = Calibration(**calibration_kwargs).fit({name: p[train]}, {name: y[train]})
            fitted += cal.params_[name].status in ("fitted", "flat")
            out[test] = cal.apply_many(name, p[test])
        per[name] = {
            "n": int(p.size),
            "positives": int(y.sum()),
            "folds_fitted": fitted,
            "before": _pick(binary_metrics(p, y)),
            "after": _pick(binary_metrics(out, y)),
        }
        oof[name] = out.tolist()
        pooled_p += p.tolist()
        pooled_c += out.tolist()
        pooled_y += y.tolist()
    overall = {
        "pooled": {
            "before": _pick(binary_metrics(pooled_p, pooled_y)),
            "after": _pick(binary_metrics(pooled_c, pooled_y)),
        },
        "mean": {
            side: {m: _mean_of((r[side] for r in per.values()), m) for m in _CV_METRICS}
            for side in ("before", "after")
        },
    }
    return {
        "method": METHOD,
        "folds": folds,
        "seed": seed,
        "settings": {**Calibration(**calibration_kwargs).to_dict()["settings"]},
        "note": CV_NOTE,
        "propositions": per,
        "overall": overall,
        "oof": oof,
    }
