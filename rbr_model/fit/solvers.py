"""The two solvers of the pairwise hinge: smoothed Newton with an exact line search, and Adam as a cross-check."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SOLVERS = ("newton", "adam")
DEFAULT_STEPS = {"newton": 200, "adam": 3000}
SMOOTHING_STAGES = (2.0, 0.3, 0.03, 0.001)  # smoothing band widths of the Newton solver, times the mean margin
STAGE_TOL = 1e-4  # relative objective change that ends a Newton stage before the last


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
