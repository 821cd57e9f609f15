"""The `rbr` command line. Each command group lives in its own module and is registered here.

Other packages add commands through the `rbr.commands` entry point group (the service adds `rbr serve`), so this
library never imports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

import typer

from rbr_model.cli.common import fail

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
    ("rbr_model.cli.heads_cmd", "heads_app", "heads"),
    ("rbr_model.cli.synth_cmd", "synth", "synth"),
    ("rbr_model.cli.report_cmd", "report", "report"),
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


def _unavailable(name: str, missing: str | None) -> Callable[[], None]:
    def command() -> None:
        raise fail(f"`rbr {name}` needs {missing}, which is not installed: pip install 'rbr-serve[service]'")

    command.__doc__ = f"(not available here: needs {missing})"
    return command


for _entry in entry_points(group="rbr.commands"):
    try:
        _command = _entry.load()
    except ModuleNotFoundError as _exc:  # the plugin's own dependencies are not installed
        _command = _unavailable(_entry.name, _exc.name)
    app.command(name=_entry.name)(_command)
