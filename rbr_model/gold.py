"""Gold labels for the grader: the gold file, the label maps, which proposition is compared with which label.

The gold format is OpenAI's `gold_train.jsonl`: one JSON object a line with `prompt` (messages up to the last
user turn), `completion` (a list holding one assistant message), `response_type` and `propositions`
(`{label name: true/false}`). A policy's proposition is compared with a label through a name map
(`{our proposition: their label}`); for a policy imported from OpenAI's YAML the names already agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.files import read_jsonl, read_text
from rbr_model.policy import Policy, PolicyError, read_yaml

OPENAI_LABEL_MAP = "openai_label_map.yaml"  # packaged: our default policy's names -> OpenAI's label names


class GoldError(ValueError):
    """A gold file, label map or proposition selection is unusable; the message names the file and the line."""


def load_gold(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a gold JSONL file; every problem names the file and the line."""
    rows = [_check_row(row, where) for where, row in read_jsonl(path, GoldError)]
    if not rows:
        raise GoldError(f"{path}: no rows")
    return rows


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise GoldError(f"{where}: expected a JSON object")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        raise GoldError(f"{where}: prompt: expected a list of {{'role', 'content'}} messages")
    completion = row.get("completion")
    if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict):
        completion = completion[0].get("content")
    elif isinstance(completion, dict):
        completion = completion.get("content")
    if not isinstance(completion, str):
        raise GoldError(f"{where}: completion: expected one assistant message (or a string)")
    labels = row.get("propositions")
    if not isinstance(labels, dict) or not labels:
        raise GoldError(f"{where}: propositions: expected {{name: true/false}}")
    clean: dict[str, bool] = {}
    for name, value in labels.items():
        if value is None:
            continue  # unlabelled for this row
        if isinstance(value, bool) or value in (0, 1):
            clean[str(name)] = bool(value)
        else:
            raise GoldError(f"{where}: propositions.{name}: expected true or false, got {value!r}")
    return {
        "prompt": prompt,
        "completion": completion,
        "response_type": row.get("response_type"),
        "category": row.get("category"),
        "labels": clean,
    }


def load_label_map(path: str | Path | None = None) -> dict[str, str]:
    """A YAML `{our proposition: gold label name}`; None loads the packaged map to OpenAI's labels."""
    if path is None:
        ref = resources.files("rbr_model") / "data" / OPENAI_LABEL_MAP
        text, source = ref.read_text(encoding="utf-8"), OPENAI_LABEL_MAP
    else:
        text, source = read_text(path, GoldError), str(path)
    try:
        data = read_yaml(text, source)
    except PolicyError as exc:
        raise GoldError(str(exc)) from None
    if not isinstance(data, dict) or not data:
        raise GoldError(f"{source}: expected a mapping {{our proposition: gold label}}")
    out = {}
    for ours, theirs in data.items():
        if not isinstance(ours, str) or not isinstance(theirs, str) or not theirs:
            raise GoldError(f"{source}: {ours!r}: expected a label name (string)")
        out[ours] = theirs
    if len(set(out.values())) != len(out):
        raise GoldError(f"{source}: two propositions map to the same label")
    return out


def resolve_label_map(
    policy: Policy,
    rows: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, str] | None = None,
    propositions: Sequence[str] | None = None,
) -> dict[str, str]:
    """Which gold label each graded proposition is compared with, in policy order.

    Without a map, every policy proposition whose name is also a gold label is used as is. Names in the map or
    in `propositions` that the policy or the gold set does not know are errors, not silently dropped.
    """
    gold_names: set[str] = set()
    for row in rows:
        gold_names |= set(row["labels"])
    if label_map is None:
        mapping = {n: n for n in policy.propositions if n in gold_names}
        if not mapping:
            raise GoldError(
                f"no proposition of policy {policy.name!r} is named like a gold label; pass a label map (--map)"
            )
    else:
        unknown = [n for n in label_map if n not in policy.propositions]
        if unknown:
            raise GoldError(f"label map: {unknown} are not propositions of policy {policy.name!r}")
        missing = [v for v in label_map.values() if v not in gold_names]
        if missing:
            raise GoldError(f"label map: {missing} are not labels in the gold set")
        mapping = {n: label_map[n] for n in policy.propositions if n in label_map}
    if propositions:
        unknown = [n for n in propositions if n not in mapping]
        if unknown:
            raise GoldError(f"--propositions: {unknown} are not mapped to gold labels (mapped: {sorted(mapping)})")
        mapping = {n: mapping[n] for n in mapping if n in set(propositions)}
    return mapping


def default_label_map(policy: Policy, rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, str] | None, str]:
    """The map to use when none is given, and a few words on why.

    Same names when every proposition of the policy is a gold label (OpenAI's YAML against OpenAI's labels);
    otherwise the packaged map to OpenAI's labels when the policy and the gold set both fit it; otherwise same
    names wherever they agree.
    """
    gold_names = {name for row in rows for name in row["labels"]}
    if set(policy.propositions) <= gold_names:
        return None, "policy names are the gold label names"
    packaged = load_label_map(None)
    if set(packaged) <= set(policy.propositions) and set(packaged.values()) <= gold_names:
        return packaged, f"packaged map rbr_model/data/{OPENAI_LABEL_MAP} ({len(packaged)} propositions)"
    return None, "only the propositions named like a gold label (no --map given)"


def subsample(rows: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """`limit` rows drawn at random (seeded) and kept in file order; all rows when `limit` is None or larger.

    Gold files are often grouped by response type, so the first rows would not be a fair sample.
    """
    if limit is None or limit >= len(rows):
        return list(rows)
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=max(limit, 0), replace=False))
    return [rows[i] for i in keep]
