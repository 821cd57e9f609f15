"""Helpers shared by the `rbr` commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    """One clear line on stderr and an exit code, no traceback: for bad files and bad arguments."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@contextmanager
def failing(*errors: type[BaseException], what: str | None = None, code: int = 2) -> Iterator[None]:
    """The library's errors (which name the file and field) as `fail`'s one line. `what` failed ("grading") leads
    the line, for a run that broke rather than bad input; such runs exit with `code` 1."""
    try:
        yield
    except errors as exc:
        raise fail(f"{what} failed: {exc}" if what else str(exc), code) from None


def stack_settings(**flags: Any) -> Any:
    """A command's flags as the grading stack's settings (`rbr_model.stack.StackSettings`, which decides what they
    mean, as for `rbr serve`); a combination that cannot work is `fail`'s one line naming the flags."""
    from rbr_model.stack import StackSettings

    settings = StackSettings(**flags)
    problems = settings.problems(lambda name: "--" + name.replace("_", "-"))
    if problems:
        raise fail("; ".join(problems))
    return settings


def chosen_heads(settings: Any, policy: Any) -> Any:
    """The heads `settings` grade `policy` with (`rbr_model.stack.choose_heads`), a bad heads file as one line:
    checked before any engine starts."""
    from rbr_model.heads import HeadsError
    from rbr_model.stack import choose_heads

    with failing(HeadsError):
        return choose_heads(settings, policy)
