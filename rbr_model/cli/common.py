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
def failing(*errors: type[BaseException]) -> Iterator[None]:
    """The library's errors (which name the file and field) as `fail`'s one line and exit code 2."""
    try:
        yield
    except errors as exc:
        raise fail(str(exc)) from None


def choose_heads(policy: Any, choice: str, custom_model: bool = False) -> Any:
    """The `--heads` option of the commands that grade in process, read as `rbr serve` reads RBR_HEADS: a heads
    file (checked against the policy), `none`, or `auto` (the packaged heads when the policy is the packaged one
    they were fitted for and the grader is the embedded model)."""
    from rbr_model.heads import Heads, HeadsError, packaged_heads_path

    if choice == "none" or (choice == "auto" and custom_model):
        return None
    with failing(HeadsError):
        if choice == "auto":
            heads = Heads.load(packaged_heads_path())
            return heads if heads.policy.get("fingerprint") == policy.fingerprint else None
        heads = Heads.load(choice)
        heads.check_policy(policy)
        return heads
