"""Files that people write and hand-edit (JSONL, YAML): every problem names the file, and the line if it can."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def read_text(path: str | Path, error: Callable[[str], Exception] = ValueError) -> str:
    """The file's UTF-8 text; an unreadable file or other encoding raises `error(message)`, the message naming
    the file. Every loader reads its files through here, so every such message reads alike."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text: {exc}") from None


def read_json(path: str | Path, error: Callable[[str], Exception] = ValueError) -> Any:
    """The file's JSON value; an unreadable file, another encoding or invalid JSON raises `error` naming the file."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def read_jsonl(path: str | Path, error: Callable[[str], Exception] = ValueError) -> Iterator[tuple[str, Any]]:
    """`(where, object)` for each non-blank line, `where` being "file:line" for the caller's own checks.

    Unreadable files, non-UTF-8 text and bad JSON raise `error` with that location.
    """
    path = Path(path)
    text = read_text(path, error)
    name = str(path)
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is legal in JSON
        if not line or line.isspace():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        yield where, obj
