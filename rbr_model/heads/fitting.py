"""Fitting and cross-validating heads, and the text-only baseline every report shows beside them.

A head is an L2 logistic regression on standardised pooled states, with classes weighted to balance (few
propositions are yes on half the rows), and its inverse regularisation C chosen by stratified k-fold CV on the
training rows only (best mean AUC; ties go to the smaller C, the stronger prior). `fit_heads` then calibrates each
head on its own out-of-fold logits (a Platt map folded into the head), because the balanced weighting inflates
the P(yes) of rare propositions and the class probabilities multiply them. The baseline is the same
regression on TF-IDF word 1-2 grams of the completion: on data whose labels follow the words, heads must beat it
to be worth their forward pass.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.heads.inputs import INPUT_VERSION, MEAN, POOLINGS, HeadInput, build_input
from rbr_model.metrics import roc_auc

DEFAULT_CS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
MIN_PER_CLASS = 3  # fewer labelled yes (or no) rows than this and a head is not fitted: it would be noise


@dataclass
class Task:
    """One proposition's training data: the rows that carry its label and the labels."""

    name: str
    label: str
    rows: np.ndarray  # indices into the row list
    y: np.ndarray  # bool


def tasks_from_rows(rows: Sequence[Mapping[str, Any]], mapping: Mapping[str, str], min_per_class: int = MIN_PER_CLASS,
                    ) -> tuple[list[Task], dict[str, str]]:
    """Per mapped proposition, its labelled rows; propositions with too few of a class are skipped, with why."""
    tasks, skipped = [], {}
    for name, label in mapping.items():
        idx = [i for i, r in enumerate(rows) if label in r["labels"]]
        y = np.array([bool(rows[i]["labels"][label]) for i in idx], dtype=bool)
        pos, neg = int(y.sum()), int((~y).sum())
        if min(pos, neg) < min_per_class:
            skipped[name] = f"{pos} yes / {neg} no labelled rows (need {min_per_class} of each)"
            continue
        tasks.append(Task(name, label, np.array(idx, dtype=int), y))
    return tasks, skipped


# ---- the regression -----------------------------------------------------------------------------------------


def _logreg(C: float, max_iter: int = 2000) -> Any:
    """liblinear: ~10x faster than lbfgs on a few hundred rows of 576 standardised columns here (0.03-0.13 s vs
    0.3-1.2 s a fit). It regularises the intercept too; a large intercept_scaling makes that negligible."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, solver="liblinear",
                              intercept_scaling=10.0)


def _folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    k = max(2, min(k, int(y.sum()), int((~y).sum())))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _auc(p: np.ndarray, y: np.ndarray) -> float:
    v = roc_auc(p, y)
    return 0.5 if v is None else v


class Standardiser:
    """Column mean and scale of a training matrix (scale floored so constant columns stay finite)."""

    def __init__(self, X: np.ndarray):
        self.mean = X.mean(axis=0)
        self.scale = np.maximum(X.std(axis=0), 1e-6)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.scale


def _oof_logits(X: np.ndarray, y: np.ndarray, Cs: Sequence[float], folds: int, seed: int) -> dict[float, np.ndarray]:
    """Per C, the out-of-fold logit of every row under stratified k-fold CV on (X, y)."""
    splits = _folds(y, folds, seed)
    out = {}
    for C in Cs:
        oof = np.empty(len(y))
        for tr, te in splits:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence notes on tiny folds; the CV score judges the fit
                oof[te] = _logreg(C).fit(X[tr], y[tr]).decision_function(X[te])
        out[C] = oof
    return out


def _pick_C(oof: Mapping[float, np.ndarray], y: np.ndarray) -> tuple[float, dict]:
    from scipy.special import expit  # as LogisticRegression.predict_proba turns its logits into P(yes)

    scores = {C: _auc(expit(z), y) for C, z in oof.items()}
    best = max(scores, key=lambda c: (round(scores[c], 6), -c))
    return best, {"C": best, "cv_auc": scores[best], "cv_auc_by_C": {str(c): scores[c] for c in scores}}


def choose_C(X: np.ndarray, y: np.ndarray, Cs: Sequence[float], folds: int, seed: int) -> tuple[float, dict]:
    """C with the best mean CV AUC on (X, y); X is already standardised."""
    return _pick_C(_oof_logits(X, y, Cs, folds, seed), y)


def fit_logreg(X: np.ndarray, y: np.ndarray, Cs: Sequence[float], folds: int, seed: int) -> tuple[Any, dict]:
    C, info = choose_C(X, y, Cs, folds, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _logreg(C).fit(X, y)
    return model, info


def platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, c) with P(yes) = sigmoid(a * z + c) fitted by maximum likelihood on out-of-fold logits `z` and labels
    `y`, unweighted: the rows' own share of yes, not the balanced weighting the heads are fitted with. A slope that
    comes out negative (the head ranks the wrong way round out of fold) becomes 0: the base rate."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e4, max_iter=1000).fit(np.asarray(z, float).reshape(-1, 1), y)
    a, c = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a <= 0:
        rate = float(np.clip(np.mean(y), 1e-6, 1 - 1e-6))
        return 0.0, float(np.log(rate / (1 - rate)))
    return a, c


# ---- heads --------------------------------------------------------------------------------------------------


def fit_heads(pooled: np.ndarray, tasks: Sequence[Task], *, Cs: Sequence[float] = DEFAULT_CS, folds: int = 5,
              seed: int = 0, progress: Callable[[str], None] | None = None, calibrate: bool = True,
              ) -> dict[str, Any]:
    """Standardiser over all rows, then one head per task: {mean, scale, weights (P, D), bias (P,), metrics}.

    `calibrate`: the balanced class weights push every head's P(yes) towards 0.5, far above the share of yes for
    a rare proposition. With it, the logits the C-choosing CV predicted out of fold (for the chosen C) fit a Platt
    map `sigmoid(a * z + c)` on the rows' own share of yes, folded into the head (weights * a, bias * a + c): the
    same ranking, probabilities that match the labels' rates (metrics record a and c)."""
    std = Standardiser(pooled)
    Z = std(pooled)
    weights, bias, metrics = [], [], {}
    for task in tasks:
        oof = _oof_logits(Z[task.rows], task.y, Cs, folds, seed)
        C, info = _pick_C(oof, task.y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _logreg(C).fit(Z[task.rows], task.y)
        w, b = model.coef_[0], float(model.intercept_[0])
        if calibrate:
            a, c = platt(oof[C], task.y)
            w, b = w * a, b * a + c
            info = {**info, "platt": {"a": a, "c": c}}
        weights.append(w)
        bias.append(b)
        metrics[task.name] = {"label": task.label, "n": int(len(task.y)), "positives": int(task.y.sum()), **info}
        if progress:
            progress(task.name)
    return {"mean": std.mean, "scale": std.scale, "weights": np.array(weights), "bias": np.array(bias),
            "metrics": metrics}


def cross_validate(
    features: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    task: Task,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
    extra: Task | None = None,
) -> np.ndarray:
    """Out-of-fold P(yes) for one task: outer stratified folds; in each, `features(train_rows, test_rows)` builds
    the matrices from the training rows only (scaler or vocabulary), and C is chosen by inner CV on them.

    `extra` rows (labelled rows that are not under evaluation, such as weak labels) join every training fold and
    are never scored."""
    oof = np.empty(len(task.y))
    for tr, te in _folds(task.y, folds, seed):
        train_rows, y = task.rows[tr], task.y[tr]
        if extra is not None:
            train_rows, y = np.concatenate([train_rows, extra.rows]), np.concatenate([y, extra.y])
        X_tr, X_te = features(train_rows, task.rows[te])
        model, _ = fit_logreg(X_tr, y, Cs, folds, seed + 1)
        oof[te] = model.predict_proba(X_te)[:, 1]
    return oof


def pooled_features(pooled: np.ndarray) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def build(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        std = Standardiser(pooled[train])
        return std(pooled[train]), std(pooled[test])

    return build


def tfidf_features(texts: Sequence[str]) -> Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]:
    """TF-IDF of word 1-2 grams (sublinear tf), the vocabulary learned on the training rows only."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def build(train: np.ndarray, test: np.ndarray) -> tuple[Any, Any]:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        return vec.fit_transform([texts[i] for i in train]), vec.transform([texts[i] for i in test])

    return build


# ---- pooled states, extracted once ------------------------------------------------------------------------


def build_inputs(tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_tokens: int) -> list[HeadInput]:
    return [build_input(tokenizer, r["prompt"], r["completion"], max_tokens) for r in rows]


def states_cache_key(model_hash: str, inputs: Sequence[HeadInput], dtype: str = "float32",
                     pooling: str = MEAN) -> str:
    h = hashlib.sha256(f"{model_hash}|{dtype}|{INPUT_VERSION}".encode() + (f"|{pooling}".encode()
                                                                            if pooling != MEAN else b""))
    for inp in inputs:
        h.update(np.asarray(inp.ids, dtype=np.int64).tobytes())
        h.update(f"|{inp.start}:{inp.end};".encode())
    return h.hexdigest()[:24]


def _cache_file(cache_dir: str | Path, model_hash: str, inputs: Sequence[HeadInput], dtype: str,
                pooling: str) -> Path:
    return Path(cache_dir) / f"pooled-{states_cache_key(model_hash, inputs, dtype, pooling)}.npy"


def read_cached_states(cache_dir: str | Path | None, model_hash: str, inputs: Sequence[HeadInput],
                       dtype: str = "float32", pooling: str = MEAN) -> Any:
    """The cached pooled states for exactly these inputs on this trunk in this dtype and pooling, or None."""
    if cache_dir is None:
        return None
    path = _cache_file(cache_dir, model_hash, inputs, dtype, pooling)
    if not path.is_file():
        return None
    cached = np.load(path)
    return cached if cached.ndim == 2 and cached.shape[0] == len(inputs) else None


async def extract_pooled(engine: Any, inputs: Sequence[HeadInput], *, cache_dir: str | Path | None = None,
                         batch: int = 16, progress: bool = False, pooling: str = MEAN) -> np.ndarray:
    """Pooled states for every input through `engine` (a StateEngine), cached on disk under `cache_dir`.

    The cache file is keyed by the trunk's hash and every input's token ids, so a changed model, tokenizer or
    row never reads stale states.
    """
    width = engine.hidden_size * POOLINGS[pooling]
    cached = read_cached_states(cache_dir, engine.model_hash, inputs, engine.dtype, pooling)
    if cached is not None and cached.shape[1] == width:
        return cached
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), desc="hidden states", unit="row")
    out = np.empty((len(inputs), width))
    try:
        for start in range(0, len(inputs), batch):
            chunk = inputs[start:start + batch]
            out[start:start + len(chunk)] = await engine.pooled(chunk, pooling)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if cache_dir is not None:
        path = _cache_file(cache_dir, engine.model_hash, inputs, engine.dtype, pooling)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
    return out
