"""Fit the RBR weights: the linear combination of features that ranks completions as the orderings say.

The loss is the paper's pairwise hinge. For two completions a and b of one prompt, of one response type, where
the orderings say a's label beats b's label:

    loss_ab = max(0, margin_ab - (R_a - R_b)),   R = rm_score + w · features

averaged over the training pairs, plus ``weight_decay * |w - w0|²`` where ``w0`` is the prior (zero unless a
``prior`` weights table is given). In "no RM" mode ``rm_score`` is taken as 0,
so the weights alone must rank the completions. Each response type gets its own weight vector.

The package: `data` (rows and orderings: loading, validation, pairs, pair accuracy), `solvers` (Newton, Adam),
`fitter` (`HingeFitter`). Import from `rbr_model.fit`.

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

from rbr_model.fit.data import (
    REQUIRED_FIELDS,
    SATISFIED_TOL,
    Callback,
    Orderings,
    Rows,
    build_pairs,
    load_orderings,
    load_rows,
    pair_accuracy,
    split_prompts,
    validate_orderings,
)
from rbr_model.fit.fitter import HingeFitter
from rbr_model.fit.solvers import DEFAULT_STEPS, SMOOTHING_STAGES, SOLVERS, STAGE_TOL

__all__ = [
    "DEFAULT_STEPS",
    "REQUIRED_FIELDS",
    "SATISFIED_TOL",
    "SMOOTHING_STAGES",
    "SOLVERS",
    "STAGE_TOL",
    "Callback",
    "HingeFitter",
    "Orderings",
    "Rows",
    "build_pairs",
    "load_orderings",
    "load_rows",
    "pair_accuracy",
    "split_prompts",
    "validate_orderings",
]
