"""Fit the RBR weights: the linear combination of features that ranks completions as the orderings say.

The loss is the paper's pairwise hinge. For two completions a and b of one prompt, of one response type, where
the orderings say a's label beats b's label:

    loss_ab = max(0, margin_ab - (R_a - R_b)),   R = rm_score + w · features

averaged over the training pairs, plus ``weight_decay * |w - w0|²`` where ``w0`` is the prior (zero unless a
``prior`` weights table is given). In "no RM" mode ``rm_score`` is taken as 0,
so the weights alone must rank the completions. Each response type gets its own weight vector.

Choices worth knowing (each one is also recorded in the weights file's ``metrics["settings"]``):

* Orderings are closed transitively: if ``ideal`` beats ``flawed`` and ``flawed`` beats ``disallowed``, then
  ``ideal`` beats ``disallowed`` too. An ordering is a ranking, and leaving out the widest gaps would throw
  away the most informative pairs. A cycle is an error.
* Margins: ``label_margins`` overrides the global ``margin`` per pair. A key ``"better>worse"`` applies to that
  pair of labels; a key ``"better"`` applies to every pair that label wins. The pair key is checked first.
  Values are absolute margins in reward units, not multipliers.
* The held-out split is by prompt id, over all response types together, so no prompt is in both halves.
* A prior keeps a refit close to known-good weights where the data says little: the fit solves for the
  change ``d = w - w0`` with the margins shifted by the prior's gaps, so the solver is the same.
* Pair accuracy counts a tie as half right: all-zero weights score 0.5, not 0 or 1.
* Solver ``"newton"`` (default) minimises the hinge smoothed over a narrow band around its kink, with Newton
  steps and an exact line search, narrowing the band in stages (``SMOOTHING_STAGES``) down to 1e-3 of the
  mean margin. Outside the band the smoothed loss is the hinge exactly. There are only tens of weights, so a
  Newton step is a tiny linear solve and a fit takes tens of iterations rather than thousands of gradient
  steps. Solver ``"adam"`` is plain full-batch Adam on the exact hinge with early stopping, kept as a
  cross-check and for anyone who wants the textbook method. Only numpy is needed (no torch, no scipy).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rbr_model.features import FeatureSpec
from rbr_model.files import read_jsonl, read_text
from rbr_model.policy import Policy
from rbr_model.reward import Weights

Rows = Sequence[Mapping[str, Any]]
Orderings = dict[str, dict[str, list[str]]]  # response type -> label -> labels it beats (as written)
Callback = Callable[[str, int, int], None]  # (response type, step done, step budget)

REQUIRED_FIELDS = ("prompt_id", "response_type", "completion_label", "features")
SATISFIED_TOL = 1e-6  # a pair "meets the margin" when R_a - R_b >= margin - SATISFIED_TOL
SOLVERS = ("newton", "adam")
DEFAULT_STEPS = {"newton": 200, "adam": 3000}
SMOOTHING_STAGES = (2.0, 0.3, 0.03, 0.001)  # smoothing band widths of the Newton solver, times the mean margin
STAGE_TOL = 1e-4  # relative objective change that ends a Newton stage before the last


# ---- loading and validation -----------------------------------------------------------------------------


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_row(row: Any, where: str) -> dict[str, Any]:
    """One row, checked field by field; returns it normalised (prompt_id as str, rm_score as float)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in row:
            raise ValueError(f"{where}: field {key!r}: missing")
    pid = row["prompt_id"]
    if isinstance(pid, bool) or not isinstance(pid, str | int) or pid == "":
        raise ValueError(f"{where}: field 'prompt_id': expected a non-empty string or an integer, got {pid!r}")
    for key in ("response_type", "completion_label"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: field {key!r}: expected a non-empty string, got {row[key]!r}")
    rm = row.get("rm_score")
    if rm is not None and not _finite_number(rm):
        raise ValueError(f"{where}: field 'rm_score': expected a finite number or null, got {rm!r}")
    feats = row["features"]
    if not isinstance(feats, Mapping):
        raise ValueError(f"{where}: field 'features': expected an object of {{name: number}}")
    for name, value in feats.items():
        if not _finite_number(value):
            raise ValueError(f"{where}: field 'features.{name}': expected a finite number, got {value!r}")
    return {
        "prompt_id": str(pid),
        "response_type": row["response_type"],
        "completion_label": row["completion_label"],
        "rm_score": 0.0 if rm is None else float(rm),
        "features": dict(feats),
    }


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read training rows from JSONL, one object per line; blank lines are skipped.

    Each row: ``{"prompt_id", "response_type", "completion_label", "rm_score", "features": {name: value}}``.
    ``rm_score`` may be missing or null (taken as 0, as for data made without a reward model). Other keys
    are kept out of the result. Errors name the file, the line and the field, because people hand-edit these.
    """
    rows = [_check_row(obj, where) for where, obj in read_jsonl(path)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _node_line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _orderings_from_node(root: yaml.Node | None, source: str) -> Orderings:
    """Walk the composed YAML so every error can name its line; labels are taken as written (no yes->True)."""
    if not isinstance(root, yaml.MappingNode) or not root.value:
        line = _node_line(root) if root is not None else 1
        raise ValueError(f"{source}:{line}: expected a mapping {{response_type: {{label: [labels it beats]}}}}")
    out: Orderings = {}
    for rt_node, table_node in root.value:
        rt = rt_node.value if isinstance(rt_node, yaml.ScalarNode) else None
        where = f"{source}:{_node_line(rt_node)}"
        if not rt:
            raise ValueError(f"{where}: response type: expected a name")
        if rt in out:
            raise ValueError(f"{where}: {rt}: duplicate response type")
        if not isinstance(table_node, yaml.MappingNode) or not table_node.value:
            raise ValueError(f"{source}:{_node_line(table_node)}: {rt}: expected a mapping {{label: [labels]}}")
        table: dict[str, list[str]] = {}
        for label_node, beats_node in table_node.value:
            label = label_node.value if isinstance(label_node, yaml.ScalarNode) else None
            where = f"{source}:{_node_line(label_node)}"
            if not label:
                raise ValueError(f"{where}: {rt}: expected a label name")
            if label in table:
                raise ValueError(f"{where}: {rt}.{label}: duplicate label")
            if isinstance(beats_node, yaml.ScalarNode) and beats_node.tag.endswith(":null"):
                items: list[yaml.Node] = []
            elif isinstance(beats_node, yaml.SequenceNode):
                items = beats_node.value
            else:
                raise ValueError(f"{source}:{_node_line(beats_node)}: {rt}.{label}: expected a list of labels")
            beaten = []
            for item in items:
                if not isinstance(item, yaml.ScalarNode) or not item.value:
                    raise ValueError(f"{source}:{_node_line(item)}: {rt}.{label}: expected a label name")
                beaten.append(item.value)
            table[label] = beaten
        out[rt] = table
    return out


def load_orderings(path: str | Path) -> Orderings:
    """Read orderings YAML: ``{response_type: {label: [labels it beats]}}``; checked by `validate_orderings`."""
    path = Path(path)
    text = read_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{path}{line}: not valid YAML: {problem}") from None
    orderings = _orderings_from_node(root, str(path))
    validate_orderings(orderings, source=str(path))
    return orderings


def validate_orderings(orderings: Any, source: str = "orderings") -> Orderings:
    """Check an orderings mapping (types, no label beating itself, no cycle); returns a plain-dict copy."""
    if not isinstance(orderings, Mapping) or not orderings:
        raise ValueError(f"{source}: expected a mapping {{response_type: {{label: [labels it beats]}}}}")
    out: Orderings = {}
    for rt, table in orderings.items():
        if not isinstance(rt, str) or not rt:
            raise ValueError(f"{source}: {rt!r}: response type must be a non-empty string")
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"{source}: {rt}: expected a mapping {{label: [labels it beats]}}")
        out[rt] = {}
        for label, beaten in table.items():
            if not isinstance(label, str) or not label:
                raise ValueError(f"{source}: {rt}: label {label!r} must be a non-empty string")
            if beaten is None:
                beaten = []
            if isinstance(beaten, str) or not isinstance(beaten, Sequence):
                raise ValueError(f"{source}: {rt}.{label}: expected a list of labels, got {beaten!r}")
            for other in beaten:
                if not isinstance(other, str) or not other:
                    raise ValueError(f"{source}: {rt}.{label}: label {other!r} must be a non-empty string")
                if other == label:
                    raise ValueError(f"{source}: {rt}.{label}: a label cannot beat itself")
            out[rt][label] = list(beaten)
        _label_order(out[rt], f"{source}: {rt}")  # raises on a cycle
    return out


def _label_order(table: Mapping[str, Sequence[str]], where: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Labels of one response type and the transitively closed `beats[i, j]` matrix; a cycle is an error."""
    labels: list[str] = []
    for label, beaten in table.items():
        for name in (label, *beaten):
            if name not in labels:
                labels.append(name)
    index = {name: i for i, name in enumerate(labels)}
    beats = np.zeros((len(labels), len(labels)), dtype=bool)
    for label, beaten in table.items():
        for other in beaten:
            beats[index[label], index[other]] = True
    while True:  # boolean matrix squaring doubles the path length each round: log2(labels) rounds
        wider = beats | ((beats.astype(np.int64) @ beats.astype(np.int64)) > 0)
        if (wider == beats).all():
            break
        beats = wider
    cyclic = np.flatnonzero(np.diag(beats))
    if cyclic.size:
        raise ValueError(f"{where}: the ordering has a cycle through {labels[cyclic[0]]!r}")
    return tuple(labels), beats


def split_prompts(prompt_ids: Sequence[Any], fraction: float, seed: int) -> set[str]:
    """The held-out prompt ids: a seeded shuffle of the sorted unique ids, so the split is reproducible.

    At least one prompt is held out when ``fraction > 0``, and at least one stays for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    unique = sorted({str(p) for p in prompt_ids})
    if fraction == 0.0 or len(unique) < 2:
        return set()
    n_held = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:n_held]}


# ---- pairs ---------------------------------------------------------------------------------------------


def build_pairs(groups: np.ndarray, labels: np.ndarray, beats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (better, worse) index pairs that share a group, vectorised.

    ``groups``: int code per example (prompt, or prompt and response type); ``labels``: int code per example
    indexing ``beats`` (a code with no True in its row and column never pairs). The examples are sorted by
    group, and every example is paired with every member of its own group through index arithmetic on
    ``np.repeat``, so the work is sum(group size²), with no Python loop over examples.
    """
    groups = np.asarray(groups)
    labels = np.asarray(labels, dtype=np.int64)
    n = groups.shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, n])
    size_of = np.repeat(sizes, sizes)  # per sorted example: its group's size
    start_of = np.repeat(starts, sizes)  # per sorted example: where its group starts
    left = np.repeat(np.arange(n), size_of)  # sorted position of the first member of each candidate pair
    first_slot = np.cumsum(size_of) - size_of  # where each example's run of candidates begins
    right = np.repeat(start_of, size_of) + (np.arange(left.size) - np.repeat(first_slot, size_of))
    lab = labels[order]
    keep = beats[lab[left], lab[right]]
    return order[left[keep]], order[right[keep]]


def _margin_table(
    labels: Sequence[str], margin: float, label_margins: Mapping[str, float]
) -> np.ndarray:
    """margins[i, j] for label i beating label j: pair key, then better-label key, then the global margin."""
    table = np.full((len(labels), len(labels)), float(margin))
    for i, better in enumerate(labels):
        if better in label_margins:
            table[i, :] = label_margins[better]
        for j, worse in enumerate(labels):
            key = f"{better}>{worse}"
            if key in label_margins:
                table[i, j] = label_margins[key]
    return table


def _check_label_margins(label_margins: Mapping[str, float] | None, orderings: Orderings) -> dict[str, float]:
    known = {name for table in orderings.values() for label, beaten in table.items() for name in (label, *beaten)}
    out: dict[str, float] = {}
    for key, value in (label_margins or {}).items():
        names = key.split(">") if ">" in key else [key]
        if len(names) > 2 or any(n not in known for n in names):
            raise ValueError(f"label_margins: {key!r} names no label of the orderings (known: {sorted(known)})")
        if not _finite_number(value) or value < 0:
            raise ValueError(f"label_margins: {key!r}: expected a finite number >= 0, got {value!r}")
        out[key] = float(value)
    return out


# ---- scoring helpers -------------------------------------------------------------------------------------


def _pair_stats(diff: np.ndarray, margins: np.ndarray) -> dict[str, float | None]:
    """Accuracy (ties half), mean hinge, fraction meeting the margin, for score gaps R_a - R_b."""
    if diff.size == 0:
        return {"pair_accuracy": None, "hinge_loss": None, "margin_satisfied": None}
    return {
        "pair_accuracy": float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size),
        "hinge_loss": float(np.maximum(0.0, margins - diff).mean()),
        "margin_satisfied": float((diff >= margins - SATISFIED_TOL).mean()),
    }


def pair_accuracy(rows: Rows, orderings: Mapping[str, Any], scores: Sequence[float]) -> float:
    """Fraction of ordered pairs (same prompt, same response type) that ``scores`` rank the right way round.

    ``scores[i]`` is the total reward of ``rows[i]``; ties count half. NaN when the rows make no pair.
    """
    table = validate_orderings(orderings)
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (len(rows),):
        raise ValueError(f"scores: expected {len(rows)} values, one per row, got shape {scores.shape}")
    rts = np.array([str(r["response_type"]) for r in rows])
    pids = np.array([str(r["prompt_id"]) for r in rows])
    correct = total = 0.0
    for rt in sorted(set(rts.tolist()) & set(table)):
        idx = np.flatnonzero(rts == rt)
        labels, beats = _label_order(table[rt], rt)
        codes = _label_codes(labels, [rows[i]["completion_label"] for i in idx])
        _, groups = np.unique(pids[idx], return_inverse=True)
        a, b = build_pairs(groups, codes, _pad(beats))
        diff = scores[idx[a]] - scores[idx[b]]
        correct += (diff > 0).sum() + 0.5 * (diff == 0).sum()
        total += diff.size
    return float(correct / total) if total else float("nan")


def _label_codes(labels: Sequence[str], values: Sequence[str]) -> np.ndarray:
    """Label names to codes; a label outside the ordering gets len(labels), an all-False row of `_pad`."""
    index = {name: i for i, name in enumerate(labels)}
    unranked = len(labels)
    return np.fromiter((index.get(v, unranked) for v in values), dtype=np.int64, count=len(values))


def _pad(beats: np.ndarray) -> np.ndarray:
    out = np.zeros((beats.shape[0] + 1, beats.shape[1] + 1), dtype=bool)
    out[:-1, :-1] = beats
    return out


# ---- solvers -------------------------------------------------------------------------------------------


class _Problem:
    """One response type's training problem: minimise mean(loss(c - Z w)) + lam |w|², Z = X[a] - X[b].

    Z is never built: Z w is a gather of per-example scores and g Z a bincount, which touch the examples
    (thousands) instead of the pairs (tens of thousands) in the matrix products. Per-pair work goes into
    buffers allocated once: on small VMs, a fresh array of a few hundred kB is mmapped and page-faulted on
    every use, which cost more than the arithmetic itself.
    """

    def __init__(self, x: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray, lam: float, scale: float):
        self.x, self.a, self.b, self.c = x, a, b, c  # examples x features; better, worse, margin - rm gap
        self.lam, self.scale = lam, scale  # scale: typical margin, sets the smoothing widths
        self.n_pairs = int(a.size)
        self._u, self._tmp, self._q = np.empty(self.n_pairs), np.empty(self.n_pairs), np.empty(self.n_pairs)
        self._rows = np.empty((self.n_pairs, x.shape[1]))
        self._gram: np.ndarray | None = None  # Z_m^T Z_m for the mask of the last `gram` call
        self._gram_mask = np.zeros(self.n_pairs, dtype=bool)

    def gaps(self, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Z w: the feature-score gap of every pair."""
        s = self.x @ w
        out = np.take(s, self.a, out=out)
        out -= np.take(s, self.b, out=self._tmp)
        return out

    def pull(self, g: np.ndarray) -> np.ndarray:
        """g Z: a per-pair vector mapped back to feature space."""
        n = self.x.shape[0]
        return (np.bincount(self.a, g, n) - np.bincount(self.b, g, n)) @ self.x

    def _gram_of(self, mask: np.ndarray) -> np.ndarray:
        k = int(np.count_nonzero(mask))
        z = np.take(self.x, self.a[mask], axis=0, out=self._rows[:k])
        z -= self.x[self.b[mask]]
        return z.T @ z

    def gram(self, mask: np.ndarray) -> np.ndarray:
        """Z_m^T Z_m over the selected pairs. Between Newton steps only a few pairs enter or leave the set,
        so the last result is updated by those instead of summing thousands of outer products again."""
        entered, left = mask & ~self._gram_mask, self._gram_mask & ~mask
        if self._gram is None or np.count_nonzero(entered) + np.count_nonzero(left) >= np.count_nonzero(mask):
            self._gram = self._gram_of(mask)
        else:
            self._gram = self._gram + self._gram_of(entered) - self._gram_of(left)
        self._gram_mask = mask
        return self._gram.copy()

    def objective(self, w: np.ndarray) -> float:
        penalty = self.lam * float(w @ w)
        if not self.n_pairs:
            return penalty
        t = np.subtract(self.c, self.gaps(w, out=self._u), out=self._u)
        return float(np.maximum(t, 0.0, out=t).mean()) + penalty

    # -- the hinge smoothed over |t| < h/2: quadratic there, exact outside
    def smooth_grad(self, t: np.ndarray, h: float, alpha: float = 0.0, u: np.ndarray | None = None) -> np.ndarray:
        """q = d loss / d t at t - alpha * u, in [0, 1]; written into a shared buffer."""
        q = self._q
        if u is not None and alpha != 0.0:
            np.multiply(u, -alpha, out=q)
            q += t
        else:
            q[:] = t
        q *= 1.0 / h
        q += 0.5
        return np.clip(q, 0.0, 1.0, out=q)

    def smoothed_objective(self, t: np.ndarray, w: np.ndarray, h: float) -> float:
        q = self.smooth_grad(t, h)
        quad = 0.5 * h * float(np.einsum("i,i->", q, q))
        lin = np.subtract(t, 0.5 * h, out=self._tmp)
        return (quad + float(np.maximum(lin, 0.0, out=lin).sum())) / self.n_pairs + self.lam * float(w @ w)


def _line_search(
    p: _Problem, t: np.ndarray, u: np.ndarray, w: np.ndarray, step: np.ndarray, h: float, d0: float
) -> float:
    """Exact minimiser along w + alpha * step of the smoothed objective (convex, piecewise quadratic).

    phi'(alpha) is monotone and piecewise linear, so a guarded Newton/secant search on it converges in a few
    evaluations, each a handful of elementwise passes with no allocation. ``d0`` is phi'(0) = gradient · step.
    (einsum rather than BLAS dot products: a multithreaded ddot on a busy 2-core machine can
    cost a millisecond; einsum also beats a masked sum.)
    """
    if d0 >= 0:
        return 0.0
    n, lam = t.size, p.lam
    uu = np.multiply(u, u)
    wd, dd = float(w @ step), float(step @ step)

    def slope(alpha: float) -> tuple[float, float]:
        q = p.smooth_grad(t, h, alpha, u)
        g = -float(np.einsum("i,i->", u, q)) / n + 2 * lam * (wd + alpha * dd)
        curv = float(np.einsum("i,i->", uu, (q > 0.0) & (q < 1.0))) / (n * h) + 2 * lam * dd
        return g, curv

    lo, dlo, hi, dhi = 0.0, d0, math.inf, math.inf
    alpha = 1.0
    for _ in range(50):
        d, curv = slope(alpha)
        if abs(d) <= 1e-12 * abs(d0):
            return alpha
        if d < 0:
            lo, dlo = alpha, d
        else:
            hi, dhi = alpha, d
        if hi < math.inf and hi - lo <= 1e-12 * hi:
            break
        guess = alpha - d / curv if curv > 0 else math.nan
        if not lo < guess < hi:
            if math.isinf(hi):
                guess = alpha * 4.0
            else:
                guess = lo - dlo * (hi - lo) / (dhi - dlo)  # secant on the bracket
                if not lo + 0.01 * (hi - lo) < guess < hi - 0.01 * (hi - lo):
                    guess = 0.5 * (lo + hi)
        alpha = guess
    return lo if math.isinf(hi) else alpha


def _solve_newton(p: _Problem, steps: int, tol: float, report: Callable[[int], None]) -> tuple[np.ndarray, int, bool]:
    """Newton's method on the smoothed hinge, shrinking the smoothing band in stages (warm started).

    On a fixed split of the pairs into below / inside / above the band the objective is quadratic, so a full
    Newton step that keeps the split is the exact optimum of the stage. Otherwise a stage ends when a step
    gains less than tol (last stage) or STAGE_TOL (earlier stages, which only warm-start the next) times the
    loss at w = 0; relative to the current value it would never stop on separable data, where the objective
    shrinks to the tiny weight-decay term. The last band is 1e-3 of the mean margin wide: only pairs within
    half of that of their margin see anything but the exact hinge.

    The Hessian also counts the pairs that ended the previous stage inside its (wider) band. Those are the
    pairs that will settle at their margin; with only the few inside a narrow band, the Newton system is
    nearly singular and the steps wildly off scale. Overcounting curvature only shortens steps, and the exact
    line search takes care of that.
    """
    n, d = p.n_pairs, p.x.shape[1]
    w = np.zeros(d)
    if n == 0:
        return w, 0, True
    ridge = 2 * p.lam + 1e-10
    t = p.c.copy()
    start = max(float(np.maximum(t, 0.0).mean()), 1e-12)  # the loss at w = 0 sets the scale of "stopped moving"
    done = 0
    carried = np.zeros(n, dtype=bool)
    for stage, frac in enumerate(SMOOTHING_STAGES):
        h = p.scale * frac
        last = stage == len(SMOOTHING_STAGES) - 1
        below, above = t <= -0.5 * h, t >= 0.5 * h
        prev = p.smoothed_objective(t, w, h)
        while True:
            if done >= steps:
                return w, done, False
            grad = -p.pull(p.smooth_grad(t, h)) / n + 2 * p.lam * w
            hess = p.gram(carried | ~(below | above)) / (n * h)
            hess[np.diag_indices(d)] += ridge
            try:
                step = -np.linalg.solve(hess, grad)
            except np.linalg.LinAlgError:
                step = -grad
            u = p.gaps(step, out=p._u)
            alpha = _line_search(p, t, u, w, step, h, float(grad @ step))
            w = w + alpha * step
            u *= alpha
            t -= u
            done += 1
            report(done)
            new_below, new_above = t <= -0.5 * h, t >= 0.5 * h
            value = p.smoothed_objective(t, w, h)
            exact = (abs(alpha - 1.0) < 1e-9 and np.array_equal(below, new_below)
                     and np.array_equal(above, new_above))
            settled = prev - value <= (tol if last else max(tol, STAGE_TOL)) * start
            below, above, prev = new_below, new_above, value
            if exact or settled or alpha == 0.0:
                break
        if last:
            return w, done, True
        carried = ~(below | above)
    return w, done, True


def _solve_adam(
    p: _Problem, steps: int, lr: float, tol: float, report: Callable[[int], None], patience: int = 100
) -> tuple[np.ndarray, int, bool]:
    """Full-batch Adam on the exact hinge (subgradient); keeps the best iterate, stops after `patience`
    steps without an improvement larger than `tol` (relative)."""
    n, d = p.n_pairs, p.x.shape[1]
    w = np.zeros(d)
    if n == 0:
        return w, 0, True
    m1, m2 = np.zeros(d), np.zeros(d)
    b1, b2, eps = 0.9, 0.999, 1e-8
    best_w, best, since = w.copy(), math.inf, 0
    for k in range(1, steps + 1):
        t = p.c - p.gaps(w)
        value = float(np.maximum(t, 0.0).mean() + p.lam * (w @ w))
        if value < best - tol * max(1.0, abs(best) if math.isfinite(best) else 1.0):
            best_w, best, since = w.copy(), value, 0
        else:
            since += 1
            if since >= patience:
                report(k)
                return best_w, k, True
        grad = -p.pull((t > 0).astype(float)) / n + 2 * p.lam * w
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        w = w - lr * (m1 / (1 - b1**k)) / (np.sqrt(m2 / (1 - b2**k)) + eps)
        report(k)
    if p.objective(w) < best:
        best_w = w
    return best_w, steps, False


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
            "n_train_prompts": int(np.unique(groups[~is_held]).size),
            "n_heldout_prompts": int(np.unique(groups[is_held]).size),
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


# ---- rows as columns -------------------------------------------------------------------------------------


@dataclass
class _Columns:
    prompt_id: list[str]
    response_type: list[str]
    label: list[str]
    rm: np.ndarray
    features: list[Mapping[str, Any]]
    prompt_code: np.ndarray  # int per row, indexing prompt_names
    prompt_names: list[str]  # unique prompt ids, in order of first appearance


def _columns(rows: Rows) -> _Columns:
    """Rows to checked columns. Whole columns are checked at once (fast); only when that finds a problem do
    the rows get checked one by one, to name the first bad row and field."""
    try:
        pid = [r["prompt_id"] for r in rows]
        rts = [r["response_type"] for r in rows]
        labels = [r["completion_label"] for r in rows]
        feats = [r["features"] for r in rows]
        rm_raw = [r.get("rm_score") for r in rows]
        ok = (
            {type(v) for v in pid} <= {str, int}
            and "" not in pid
            and {type(v) for v in rts} | {type(v) for v in labels} <= {str}
            and all(map(str.strip, rts))
            and all(map(str.strip, labels))
            and {type(f) for f in feats} <= {dict}
            and {type(v) for v in rm_raw} <= {int, float, type(None)}
        )
    except (KeyError, TypeError, AttributeError):
        ok = False
    if ok:
        rm = np.array([0.0 if v is None else v for v in rm_raw], dtype=float)
        ok = bool(np.isfinite(rm).all())
    if not ok:  # the careful pass raises on the first bad row
        checked = [_check_row(r, f"row {i + 1}") for i, r in enumerate(rows)]
        pid = [r["prompt_id"] for r in checked]
        rts = [r["response_type"] for r in checked]
        labels = [r["completion_label"] for r in checked]
        feats = [r["features"] for r in checked]
        rm = np.array([r["rm_score"] for r in checked], dtype=float)
    ids = pid if {type(v) for v in pid} == {str} else [str(v) for v in pid]
    index: dict[str, int] = {}
    code = np.fromiter((index.setdefault(v, len(index)) for v in ids), np.int64, len(ids))
    return _Columns(ids, rts, labels, rm, feats, code, list(index))


def _pick_feature_names(
    rt: str,
    feats: list[Mapping[str, Any]],
    policy: Policy | None,
    given: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> tuple[str, ...]:
    if given is not None:
        names = given.get(rt) if isinstance(given, Mapping) else given
        if not names or isinstance(names, str):
            raise ValueError(f"feature_names: expected a list of names for response type {rt!r}, got {names!r}")
        return tuple(names)
    if policy is not None:
        if rt not in policy.classes:
            raise ValueError(f"response type {rt!r} has no classes in policy {policy.name!r}")
        return FeatureSpec(policy, rt).feature_names
    return tuple(sorted(set().union(*feats)))


def _resolve(policy: Policy, name: str) -> str:
    try:
        rt = policy.resolve_response_type(name)
    except KeyError:
        rt = None
    if rt is None:
        raise ValueError(f"response type {name!r} is not in policy {policy.name!r} ({', '.join(policy.classes)})")
    return rt


def _feature_matrix(cols: _Columns, idx: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """[rows, features] in `names` order. A missing or non-numeric value is an error naming row and feature.

    The fast path streams the values into one float array (numeric strings and booleans convert, as they
    would in numpy); only on a failure are the rows walked again, to name the culprit.
    """
    get = operator.itemgetter(*names)
    values = (cols.features[i] for i in idx)
    stream = itertools.chain.from_iterable(map(get, values)) if len(names) > 1 else map(get, values)
    try:
        x = np.fromiter(stream, dtype=float, count=idx.size * len(names)).reshape(idx.size, len(names))
        if np.isfinite(x).all():
            return x
    except (KeyError, ValueError, TypeError):
        pass
    for i in idx:  # find the first culprit, for the message
        feats = cols.features[i]
        where = f"row {int(i) + 1} (prompt_id {cols.prompt_id[i]!r})"
        for name in names:
            if name not in feats:
                raise ValueError(f"{where}: missing feature {name!r} (response type {cols.response_type[i]!r})")
            if not _finite_number(feats[name]) and not isinstance(feats[name], bool):
                raise ValueError(f"{where}: field 'features.{name}': expected a finite number, got {feats[name]!r}")
    raise AssertionError("unreachable: a bad feature value was not found")
