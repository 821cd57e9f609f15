"""Helpers shared by the `rbr` commands."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    """One clear line on stderr and an exit code, no traceback: for bad files and bad arguments."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)
