"""`HingeFitter`: one weight vector per response type from rows and orderings (see `rbr_model.fit`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rbr_model.fit.data import (
    Callback,
    Rows,
    _check_label_margins,
    _Columns,
    _columns,
    _feature_matrix,
    _finite_number,
    _label_codes,
    _label_order,
    _margin_table,
    _pad,
    _pair_stats,
    _pick_feature_names,
    _resolve,
    build_pairs,
    split_prompts,
    validate_orderings,
)
from rbr_model.fit.solvers import DEFAULT_STEPS, SOLVERS, _Problem, _solve_adam, _solve_newton
from rbr_model.policy import Policy
from rbr_model.reward import Weights

# ---- the fitter ----------------------------------------------------------------------------------------


class HingeFitter:
    """Fits one weight vector per response type by the pairwise hinge loss (see the module docstring).

    Parameters: ``margin`` (reward units) and ``label_margins`` (overrides, keyed ``"better"`` or
    ``"better>worse"``); ``weight_decay``, the L2 penalty, tiny by default so that the optimum is unique
    without pulling the weights away from the hinge optimum (the paper's fitter uses none); ``no_rm`` fits
    the weights as if every rm_score were 0; ``heldout_fraction`` and ``seed`` pick the held-out prompts;
    ``steps`` caps solver iterations per response type (None: 200 Newton / 3000 Adam; both stop early);
    ``lr`` is Adam's learning rate; ``tol`` the stopping tolerance; ``prior`` ({response type: {feature:
    weight}} or a `Weights`) is what the L2 penalty pulls toward instead of zero;
    ``callback(response_type, step, budget)`` is called after each step (for progress bars).

    Learned values end in ``_``: ``weights_`` (a `Weights`, ready to save; its ``metrics`` hold
    ``settings``, ``response_types`` and ``skipped_response_types``), ``metrics_`` (per response type),
    ``feature_names_``, ``heldout_prompts_`` and ``train_prompts_``.
    """

    def __init__(
        self,
        margin: float = 1.0,
        label_margins: Mapping[str, float] | None = None,
        weight_decay: float = 1e-6,
        no_rm: bool = False,
        heldout_fraction: float = 0.2,
        seed: int = 0,
        steps: int | None = None,
        lr: float = 0.05,
        solver: str = "newton",
        tol: float = 1e-6,
        callback: Callback | None = None,
        prior: Weights | Mapping[str, Mapping[str, float]] | None = None,
    ):
        self.margin = margin
        self.label_margins = label_margins
        self.weight_decay = weight_decay
        self.no_rm = no_rm
        self.heldout_fraction = heldout_fraction
        self.seed = seed
        self.steps = steps
        self.lr = lr
        self.solver = solver
        self.tol = tol
        self.callback = callback
        self.prior = prior

    # -- parameter checks, at the boundary
    def _settings(self) -> dict[str, Any]:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {SOLVERS}, got {self.solver!r}")
        if not _finite_number(self.margin) or self.margin < 0:
            raise ValueError(f"margin: expected a finite number >= 0, got {self.margin!r}")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay!r}")
        if not _finite_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        steps = DEFAULT_STEPS[self.solver] if self.steps is None else self.steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps!r}")
        if not _finite_number(self.tol) or self.tol <= 0:
            raise ValueError(f"tol: expected a positive number, got {self.tol!r}")
        if not _finite_number(self.heldout_fraction) or not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: expected a number in [0, 1), got {self.heldout_fraction!r}")
        return {
            "loss": "pairwise hinge",
            "margin": float(self.margin),
            "weight_decay": float(self.weight_decay),
            "no_rm": bool(self.no_rm),
            "heldout_fraction": float(self.heldout_fraction),
            "seed": int(self.seed),
            "solver": self.solver,
            "steps": steps,
            "lr": float(self.lr) if self.solver == "adam" else None,
            "orderings_closure": "transitive",
            "label_margin_keys": "better label, or 'better>worse' (pair key wins)",
            "prior": _prior_id(self.prior),
        }

    def fit(
        self,
        rows: Rows,
        orderings: Mapping[str, Any],
        policy: Policy | None = None,
        feature_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        grader_id: str = "",
    ) -> HingeFitter:
        """Fit every response type that has both rows and an ordering; returns self.

        Feature order per response type: ``feature_names`` when given (one list for all, or per response
        type), else the policy's `FeatureSpec`, else the sorted union of the rows' feature names. With a
        policy, response types in rows and orderings may be aliases; they are resolved to policy keys.
        """
        settings = self._settings()
        table = validate_orderings(orderings)
        label_margins = _check_label_margins(self.label_margins, table)
        settings["label_margins"] = label_margins
        if not rows:
            raise ValueError("rows: no rows to fit on")
        cols = _columns(rows)

        if policy is not None:
            resolved = {name: _resolve(policy, name) for name in {*cols.response_type, *table}}
            table = {resolved[rt]: t for rt, t in table.items()}
            row_rts = [resolved[rt] for rt in cols.response_type]
        else:
            row_rts = cols.response_type
        fitted = [rt for rt in dict.fromkeys(row_rts) if rt in table]
        if not fitted:
            raise ValueError(
                f"no response type of the rows ({sorted(set(row_rts))}) has an ordering ({sorted(table)})"
            )
        held = split_prompts(cols.prompt_names, self.heldout_fraction, self.seed)
        self.heldout_prompts_ = held
        self.train_prompts_ = set(cols.prompt_names) - held
        held_rows = np.fromiter((name in held for name in cols.prompt_names), bool, len(cols.prompt_names))
        held_rows = held_rows[cols.prompt_code]

        rt_index: dict[str, int] = {}
        rt_code = np.fromiter((rt_index.setdefault(rt, len(rt_index)) for rt in row_rts), np.int64, len(row_rts))
        weights: dict[str, dict[str, float]] = {}
        metrics: dict[str, dict[str, Any]] = {}
        self.feature_names_: dict[str, tuple[str, ...]] = {}
        for rt in fitted:
            idx = np.flatnonzero(rt_code == rt_index[rt])
            names = _pick_feature_names(rt, [cols.features[i] for i in idx], policy, feature_names)
            self.feature_names_[rt] = names
            w0 = _prior_vector(self.prior, rt, names, policy)
            w, m = self._fit_one(rt, cols, idx, held_rows[idx], names, table[rt], label_margins, settings, w0)
            weights[rt] = dict(zip(names, map(float, w), strict=True))
            metrics[rt] = m
        self.metrics_ = metrics
        self.weights_ = Weights(
            policy_fingerprint=policy.fingerprint if policy is not None else "",
            grader_id=grader_id,
            weights=weights,
            metrics={
                "settings": settings,
                "response_types": metrics,
                "skipped_response_types": sorted(set(row_rts) - set(fitted)),
            },
            note="fitted by rbr_model.fit.HingeFitter (pairwise hinge)",
        )
        return self

    def _fit_one(
        self,
        rt: str,
        cols: _Columns,
        idx: np.ndarray,
        is_held: np.ndarray,
        names: tuple[str, ...],
        order: Mapping[str, Sequence[str]],
        label_margins: Mapping[str, float],
        settings: dict[str, Any],
        w0: np.ndarray,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        x = _feature_matrix(cols, idx, names)
        rm = np.zeros(idx.size) if self.no_rm else cols.rm[idx]
        labels, beats = _label_order(order, f"orderings: {rt}")
        margins = _margin_table(labels, self.margin, label_margins)
        codes = _label_codes(labels, [cols.label[i] for i in idx])
        groups = cols.prompt_code[idx]
        a, b = build_pairs(groups, codes, _pad(beats))
        pair_m = margins[codes[a], codes[b]]
        ho = is_held[a]  # both ends share a prompt, so one end decides
        tr = ~ho

        a_tr, b_tr = a[tr], b[tr]
        scale = float(pair_m[tr].mean()) if tr.any() else 0.0
        prior_score = x @ w0  # the solver finds d = w - w0: the prior's gaps count like RM gaps
        base = rm + prior_score
        problem = _Problem(
            x=x,
            a=a_tr,
            b=b_tr,
            c=pair_m[tr] - (base[a_tr] - base[b_tr]),
            lam=float(self.weight_decay),
            scale=scale if scale > 0 else 1.0,
        )
        steps = settings["steps"]

        def report(done: int) -> None:
            if self.callback is not None:
                self.callback(rt, done, steps)

        if settings["solver"] == "newton":
            w, used, converged = _solve_newton(problem, steps, self.tol, report)
        else:
            w, used, converged = _solve_adam(problem, steps, float(self.lr), self.tol, report)
        objective = problem.objective(w)
        w = w0 + w

        score = rm + x @ w
        diff = score[a] - score[b]
        train, heldout = _pair_stats(diff[tr], pair_m[tr]), _pair_stats(diff[ho], pair_m[ho])
        metrics: dict[str, Any] = {
            "n_rows": int(idx.size),
            "n_unranked_rows": int((codes == len(labels)).sum()),
            # set(), not np.unique: that imports numpy.ma on first use (5 ms of a 0.3 s `rbr fit` process)
            "n_train_prompts": len(set(groups[~is_held].tolist())),
            "n_heldout_prompts": len(set(groups[is_held].tolist())),
            "n_train_pairs": int(tr.sum()),
            "n_heldout_pairs": int(ho.sum()),
            **{f"train_{k}": v for k, v in train.items()},
            **{f"heldout_{k}": v for k, v in heldout.items()},
            "objective": objective,
            "steps_run": used,
            "converged": converged,
        }
        return w, metrics


def _prior_id(prior: Any) -> Any:
    if prior is None:
        return None
    if isinstance(prior, Weights):
        return {"weights_version": prior.version, "grader_id": prior.grader_id}
    return "table"


def _prior_vector(prior: Any, rt: str, names: Sequence[str], policy: Policy | None) -> np.ndarray:
    """The prior's weights for one response type in `names` order; features it lacks get 0."""
    if prior is None:
        return np.zeros(len(names))
    table = prior.weights if isinstance(prior, Weights) else prior
    if not isinstance(table, Mapping):
        raise ValueError(f"prior: expected {{response type: {{feature: weight}}}}, got {type(table).__name__}")
    row: Any = table.get(rt)
    if row is None and policy is not None:
        for key, value in table.items():
            try:
                if _resolve(policy, key) == rt:
                    row = value
                    break
            except ValueError:
                continue
    row = row or {}
    bad = [f for f, v in row.items() if not _finite_number(v)]
    if bad:
        raise ValueError(f"prior: {rt}.{bad[0]}: expected a finite number")
    return np.array([float(row.get(name, 0.0)) for name in names])
