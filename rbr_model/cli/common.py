"""Helpers shared by the `rbr` commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    """One clear line on stderr and an exit code, no traceback: for bad files and bad arguments."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@contextmanager
def failing(*errors: type[BaseException]) -> Iterator[None]:
    """The library's errors (which name the file and field) as `fail`'s one line and exit code 2."""
    try:
        yield
    except errors as exc:
        raise fail(str(exc)) from None
