"""The `rbr` command line. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="rbr",
    help="Rule Based Rewards: check policies, grade with an LLM, fit weights, evaluate, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# (module, attribute, name): a Typer sub-app is added as a group, a function as a command.
_COMMANDS = [
    ("rbr_model.cli.policy_cmd", "policy_app", "policy"),
    ("rbr_model.cli.fit_cmd", "fit", "fit"),
    ("rbr_model.cli.model_cmd", "model_app", "model"),
    ("rbr_model.cli.eval_cmd", "eval_app", "eval"),
    ("rbr_model.cli.synth_cmd", "synth", "synth"),
    ("rbr_model.cli.report_cmd", "report", "report"),
    ("rbr_model.cli.serve_cmd", "serve", "serve"),
]

for _module, _attr, _name in _COMMANDS:
    try:
        _obj = getattr(importlib.import_module(_module), _attr)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:  # a real missing dependency, not a command not written yet
            raise
        continue
    if isinstance(_obj, typer.Typer):
        app.add_typer(_obj, name=_name)
    else:
        app.command(name=_name)(_obj)

