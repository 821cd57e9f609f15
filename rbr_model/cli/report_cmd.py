"""`rbr report`: pair accuracy of RM, RBR and RM + RBR per response type, reward plots and a Markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rbr_model.cli.common import fail, failing
from rbr_model.fit import load_orderings, load_rows
from rbr_model.policy import PolicyError, load_policy
from rbr_model.report import SCORER_TITLES, SCORERS, build_report, packaged_data
from rbr_model.reward import Weights, WeightsError


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def report(
    data: Annotated[Path, typer.Option("--data", "-d", help="JSONL rows: prompt_id, response_type, "
                                       "completion_label, rm_score, features {name: value}.")],
    weights: Annotated[Path, typer.Option("--weights", "-w", help="Weights JSON (from `rbr fit`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for summary.md, report.json and the PNGs.")],
    orderings: Annotated[Path | None, typer.Option("--orderings", help="YAML: per response type, each label and "
                                                   "the labels it beats (default: the packaged orderings).")] = None,
    policy_path: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML, for response type "
                                                     "aliases and the fingerprint check (default: packaged).")] = None,
    heldout: Annotated[float | None, typer.Option("--heldout", help="Fraction of prompts held out (default: "
                                                  "the weights file's fit setting, else 0.2).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the held-out split (default: the weights "
                                             "file's fit setting, else 0).")] = None,
) -> None:
    """Report held-out pair accuracy (RM, RBR, RM + RBR) per response type, with reward plots per label."""
    if heldout is not None and not 0.0 <= heldout < 1.0:
        raise fail(f"--heldout: expected a fraction in [0, 1), got {heldout}")
    orderings_path = orderings if orderings is not None else packaged_data("orderings.yaml")
    with failing(PolicyError):
        policy = load_policy(policy_path)
    with failing(WeightsError):
        w = Weights.load(weights)
    with failing(ValueError):
        rows = load_rows(data)
        order = load_orderings(orderings_path)
    sources = {"data": str(data), "weights file": str(weights), "orderings": str(orderings_path)}
    try:
        summary = build_report(rows, w, policy, order, out, heldout_fraction=heldout, seed=seed, sources=sources)
    except OSError as exc:
        raise fail(f"{out}: cannot write: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None

    sp = summary.split
    typer.echo(f"held-out split: {sp['n_heldout']} of {sp['n_prompts']} prompts "
               f"(fraction {sp['fraction']}, seed {sp['seed']}; {sp['source']})")
    head = f"{'response type':<16}{'held pairs':>11}" + "".join(f"{SCORER_TITLES[s]:>11}" for s in SCORERS)
    typer.echo(head)
    for rt, r in summary.response_types.items():
        acc = r.accuracy["heldout"]
        typer.echo(f"{rt:<16}{acc['n_pairs']:>11}" + "".join(f"{_fmt(acc[s]):>11}" for s in SCORERS))
    for message in summary.warnings:
        typer.secho(f"note: {message}", fg=typer.colors.YELLOW)
    typer.echo(f"wrote {summary.files['summary']}, {summary.files['json']} and "
               f"{sum(1 for k in summary.files if k.startswith('plot:'))} plots")
