"""`rbr policy ...`: validate a policy, import OpenAI's format, derive classes from human labels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from rbr_model.cli.common import fail, failing
from rbr_model.features import FeatureBuilder, derive_class
from rbr_model.files import read_jsonl
from rbr_model.policy import Policy, PolicyError, load_policy, policy_to_yaml

policy_app = typer.Typer(help="Check, import and inspect policies.", no_args_is_help=True)

PolicyPath = Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML (default: packaged policy).")]


def _load(path: Path | None) -> Policy:
    with failing(PolicyError):
        return load_policy(path)


@policy_app.command("check")
def check(file: Annotated[Path, typer.Argument(help="Policy YAML, ours or OpenAI's format.")]) -> None:
    """Validate a policy and print, per response type, the propositions it needs and its classes."""
    policy = _load(file)
    typer.echo(f"policy {policy.name}  fingerprint {policy.fingerprint[:12]}  ({len(policy.propositions)} "
               f"propositions, {len(policy.derived)} derived)")
    for rt in policy.classes:
        aliases = policy.response_types[rt].aliases
        typer.secho(f"\n{rt}" + (f"  (aliases: {', '.join(aliases)})" if aliases else ""), bold=True)
        typer.echo(f"  propositions ({len(policy.propositions_for(rt))}): {', '.join(policy.propositions_for(rt))}")
        for cls, conj in policy.classes[rt].items():
            cond = " AND ".join(n if v else f"NOT {n}" for n, v in conj)
            typer.echo(f"  {cls:<26} {cond}")
    typer.secho("\nOK", fg=typer.colors.GREEN)


@policy_app.command("import-openai")
def import_openai(
    file: Annotated[Path, typer.Argument(help="OpenAI's proposition_prompts.yaml.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the policy in rbr-serve's format.")],
) -> None:
    """Convert OpenAI's published policy format into ours (same fingerprint when loaded back)."""
    policy = _load(file)
    if not policy.prompt_template:
        raise fail(f"{file}: not in OpenAI's format (no prompt_template / simple_propositions)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(policy_to_yaml(policy), encoding="utf-8")
    typer.echo(f"wrote {out} ({len(policy.propositions)} propositions, response types: "
               f"{', '.join(policy.classes)})")


@policy_app.command("classes")
def classes(
    labels: Annotated[Path, typer.Option("--labels", "-l", help="JSONL rows like gold_train.jsonl.")],
    policy_path: PolicyPath = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON counts instead of a table.")] = False,
) -> None:
    """Derive each human-labelled row's class from its proposition labels and count them."""
    policy = _load(policy_path)
    builder = FeatureBuilder(policy)
    counts: dict[str, Counter] = {rt: Counter() for rt in policy.classes}
    unclassified = ambiguous = 0
    for where, row in read_jsonl(labels, fail):
        if not isinstance(row, dict):
            raise fail(f"{where}: expected a JSON object")
        if not isinstance(row.get("propositions"), dict):
            raise fail(f"{where}: propositions: expected an object of proposition labels")
        try:
            rt = policy.resolve_response_type(str(row.get("response_type", "")))
        except KeyError:
            raise fail(f"{where}: response_type: {row.get('response_type')!r} is not in the policy "
                       f"({', '.join(policy.classes)})") from None
        if rt is None:
            unclassified += 1
            continue
        spec = builder[rt]
        missing = [p for p in spec.propositions if p not in row["propositions"]]
        if missing:
            raise fail(f"{where}: propositions: missing labels for {', '.join(missing)}")
        cls, hits = derive_class(spec, row["propositions"])
        if cls is not None:
            counts[rt][cls] += 1
        elif hits == 0:
            unclassified += 1
        else:
            ambiguous += 1
    table = {rt: {cls: counts[rt][cls] for cls in policy.classes[rt]} for rt in policy.classes}
    if as_json:
        typer.echo(json.dumps({"counts": table, "unclassified": unclassified, "ambiguous": ambiguous}))
        return
    for rt, row in table.items():
        typer.secho(f"{rt}  (n={sum(row.values())})", bold=True)
        for cls, n in row.items():
            typer.echo(f"  {cls:<26} {n:>5}")
    typer.echo(f"unclassified {unclassified}  ambiguous {ambiguous}")
