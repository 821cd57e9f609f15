"""`rbr fit`: fit the RBR weights from graded, labelled completions and write the weights file."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rbr_model.cli.common import fail, failing
from rbr_model.fit import SOLVERS, HingeFitter, load_orderings, load_rows
from rbr_model.policy import PolicyError, load_policy
from rbr_model.reward import Weights, WeightsError

if TYPE_CHECKING:
    from tqdm import tqdm

_DEFAULTS = HingeFitter()


def parse_label_margins(items: list[str] | None) -> dict[str, float]:
    """`LABEL=M` / `BETTER>WORSE=M` strings to a dict; raises ValueError naming the bad item."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.rpartition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not key or not math.isfinite(number):
            raise ValueError(f"--label-margin {item!r}: expected LABEL=MARGIN or BETTER>WORSE=MARGIN")
        out[key] = number
    return out


class _Bar:
    """One tqdm bar per response type over the solver's step budget (Newton usually stops well short).

    A bar shows only once the fit has run for `after_s`: most fits take hundredths of a second, and a bar that
    flashes by says nothing (tqdm is not even imported then).
    """

    def __init__(self, after_s: float = 0.5) -> None:
        self.bar: tqdm | None = None
        self.rt: str | None = None
        self.show_from = time.monotonic() + after_s

    def __call__(self, rt: str, done: int, budget: int) -> None:
        if rt != self.rt:
            self.close()
            self.rt = rt
        if self.bar is None:
            if time.monotonic() < self.show_from:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=budget, desc=f"fit {rt}", unit="step", leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fit(
    data: Annotated[Path, typer.Option("--data", "-d", help="JSONL rows: prompt_id, response_type, "
                                       "completion_label, rm_score, features {name: value}.")],
    orderings: Annotated[Path, typer.Option("--orderings", help="YAML: per response type, each label and "
                                            "the list of labels it beats; closed transitively.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the weights JSON.")],
    policy_path: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML; sets the feature "
                                                     "order and the fingerprint (default: packaged policy).")] = None,
    no_rm: Annotated[bool, typer.Option("--no-rm", help="Ignore rm_score: the weights alone must rank.")] = False,
    margin: Annotated[float, typer.Option("--margin", help="Hinge margin for every pair.")] = _DEFAULTS.margin,
    label_margin: Annotated[list[str] | None, typer.Option(
        "--label-margin", help="Override the margin: LABEL=M for pairs LABEL wins, or BETTER>WORSE=M for one "
        "pair of labels (pair keys win). Repeatable.")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 penalty on the weights (on their "
                                                "distance to --prior when given).")] = (
        _DEFAULTS.weight_decay),
    heldout: Annotated[float, typer.Option("--heldout", help="Fraction of prompts held out for the metrics.")] = (
        _DEFAULTS.heldout_fraction),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split.")] = _DEFAULTS.seed,
    steps: Annotated[int | None, typer.Option("--steps", help="Most solver steps per response type (default: "
                                              "200 Newton / 3000 Adam; both stop early).")] = None,
    solver: Annotated[str, typer.Option("--solver", help="newton (smoothed hinge, fast) or adam (exact "
                                        "hinge, full-batch).")] = _DEFAULTS.solver,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (solver adam only).")] = _DEFAULTS.lr,
    prior: Annotated[Path | None, typer.Option("--prior", help="Weights JSON to shrink toward instead of zero "
                                               "(--weight-decay sets how hard): keeps a refit near known-good "
                                               "weights where the data says little.")] = None,
    grader_id: Annotated[str, typer.Option("--grader-id", help="The grader model that made the features, "
                                           "recorded in the weights file.")] = "",
) -> None:
    """Fit per-response-type RBR weights with the pairwise hinge loss and write the weights file."""
    if solver not in SOLVERS:
        raise fail(f"--solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")
    with failing(ValueError):
        margins = parse_label_margins(label_margin)
    with failing(PolicyError):
        policy = load_policy(policy_path)
    with failing(ValueError):
        rows = load_rows(data)
        order = load_orderings(orderings)

    prior_weights = None
    if prior is not None:
        try:
            prior_weights = Weights.load(prior)
        except (OSError, WeightsError) as exc:
            raise fail(f"--prior: {getattr(exc, 'strerror', None) or exc}") from None
        if prior_weights.policy_fingerprint != policy.fingerprint:
            typer.echo(f"note: --prior {prior} was fitted for another policy version; features it lacks start at 0",
                       err=True)

    bar = _Bar()
    fitter = HingeFitter(margin=margin, label_margins=margins, weight_decay=weight_decay, no_rm=no_rm,
                         heldout_fraction=heldout, seed=seed, steps=steps, lr=lr, solver=solver, callback=bar,
                         prior=prior_weights)
    try:
        with failing(ValueError):
            fitter.fit(rows, order, policy=policy, grader_id=grader_id)
    finally:
        bar.close()

    try:
        fitter.weights_.save(out)
    except (OSError, WeightsError) as exc:
        raise fail(f"{out}: cannot write: {getattr(exc, 'strerror', None) or exc}") from None

    cols = [("response type", 16), ("train pairs", 12), ("held pairs", 11), ("train acc", 10),
            ("held acc", 9), ("train hinge", 12), ("held hinge", 11), ("held margin", 12), ("steps", 6)]
    typer.echo("".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(cols)))
    for rt, m in fitter.metrics_.items():
        values = [rt, m["n_train_pairs"], m["n_heldout_pairs"], m["train_pair_accuracy"],
                  m["heldout_pair_accuracy"], m["train_hinge_loss"], m["heldout_hinge_loss"],
                  m["heldout_margin_satisfied"], m["steps_run"]]
        typer.echo("".join(f"{_fmt(v):>{w}}" if i else f"{_fmt(v):<{w}}"
                           for i, (v, (_, w)) in enumerate(zip(values, cols, strict=True))))
        if m["n_unranked_rows"]:
            typer.secho(f"  note: {rt}: {m['n_unranked_rows']} row(s) with a label outside the orderings made "
                        "no pairs", fg=typer.colors.YELLOW)
        if not m["converged"]:
            typer.secho(f"  note: {rt} stopped at the step limit ({m['steps_run']}); raise --steps",
                        fg=typer.colors.YELLOW)
    skipped = fitter.weights_.metrics.get("skipped_response_types") or []
    if skipped:
        typer.secho(f"note: no ordering for {', '.join(skipped)}: those rows were not used", fg=typer.colors.YELLOW)
    typer.echo(f"wrote {out}  (weights {fitter.weights_.version}, policy {policy.short_version}"
               f"{', no RM' if no_rm else ''})")
