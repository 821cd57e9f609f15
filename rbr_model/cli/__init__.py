"""The `rbr` command line. Each command group lives in its own module, imported only when that command runs.

Why lazily: `rbr fit` should not pay for the modules of `rbr synth`, `rbr eval` or the service before it starts
(a short fit is a fraction of a second; the imports used to be most of the process). `rbr --help` lists commands
from the one-line summaries below without importing them. Other packages add commands through the `rbr.commands`
entry point group (the service adds `rbr serve`), so this library never imports them by name.
"""

from __future__ import annotations

import gc
import importlib
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:  # newer typer carries its own copy of click: importing click itself would only cost time
    import click

from rbr_model.cli.common import fail

PLUGIN_GROUP = "rbr.commands"

# name: (module, attribute, summary for `rbr --help`). A Typer attribute becomes a group, a function a command.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "policy": ("rbr_model.cli.policy_cmd", "policy_app", "Check, import and inspect policies."),
    "fit": ("rbr_model.cli.fit_cmd", "fit", "Fit RBR weights with the pairwise hinge loss."),
    "model": ("rbr_model.cli.model_cmd", "model_app", "Prepare the embedded grader model and its heads' trunk."),
    "eval": ("rbr_model.cli.eval_cmd", "eval_app", "Evaluate the grader against human labels, and a policy's "
                                                   "behaviour on held-out prompts."),
    "heads": ("rbr_model.cli.heads_cmd", "heads_app", "Fit and inspect learned proposition heads."),
    "synth": ("rbr_model.cli.synth_cmd", "synth", "Write graded synthetic completions of known rank for rbr fit."),
    "report": ("rbr_model.cli.report_cmd", "report", "Pair accuracies and reward plots of fitted weights."),
    "rm": ("rbr_model.cli.rm_cmd", "rm_app", "Fit, build and measure a reward model's score head on pairs."),
}


def _to_click(obj: Any, name: str) -> click.Command:
    if isinstance(obj, typer.Typer):
        command = typer.main.get_group(obj)
    else:
        single = typer.Typer()
        single.command(name=name)(obj)
        command = typer.main.get_command(single)
    command.name = name
    return command


def _plugins() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in COMMANDS}


def _unavailable(name: str, missing: str | None) -> click.Command:
    def command() -> None:
        raise fail(f"`rbr {name}` needs {missing}, which is not installed: pip install 'rbr-serve[service]'")

    command.__doc__ = f"(not available here: needs {missing})"
    return _to_click(command, name)


class LazyGroup(TyperGroup):
    """A command group that imports a command's module when the command is looked up to run."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *_plugins()]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            module, attr, summary = COMMANDS[cmd_name]
            if self._listing:  # `rbr --help`: the summary is all it shows
                return TyperCommand(cmd_name, help=summary, short_help=summary)
            return _to_click(getattr(importlib.import_module(module), attr), cmd_name)
        entry = _plugins().get(cmd_name)
        if entry is None:
            return None
        try:
            loaded = entry.load()
        except ModuleNotFoundError as exc:  # the plugin's own dependencies are not installed
            return _unavailable(cmd_name, exc.name)
        return _to_click(loaded, cmd_name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="rbr",
    cls=LazyGroup,
    help="Rule Based Rewards: check policies, grade with an LLM, fit weights, evaluate, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Rule Based Rewards: check policies, grade with an LLM, fit weights, evaluate, serve."""


def run() -> None:
    """The `rbr` console script: the app, then a quick exit.

    At exit CPython makes a last garbage-collection pass over every object the imports created (numpy, pydantic,
    typer), about 20 ms of a 0.3 s `rbr fit`. The command's work is done and its files closed by then, so those
    objects are frozen out of that pass; atexit handlers (engine and worker shutdown) still run as usual.
    """
    try:
        app()
    finally:
        gc.freeze()
