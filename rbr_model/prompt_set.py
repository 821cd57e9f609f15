"""The prompt set and what synthetic data is asked to be: prompts with response types, their train/eval split,
the label instructions and the class expectations (`rbr synth`'s inputs, and `rbr eval policy`'s prompts).

Every problem raises `SynthError` naming the file, the line or the key.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rbr_model.files import read_json, read_jsonl, read_text
from rbr_model.policy import SAFE_YAML_LOADER, Policy


class SynthError(ValueError):
    """Bad input (prompts, labels, expectations) or an output folder that cannot be resumed."""


# ---- inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthPrompt:
    prompt_id: str
    response_type: str
    messages: tuple[Mapping[str, str], ...]
    category: str = ""


def _packaged(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("rbr_model") / "data" / name))


def default_prompts_path() -> Path:
    return _packaged("prompts.jsonl")


def default_labels_path() -> Path:
    return _packaged("labels.yaml")


def default_split_path() -> Path:
    return _packaged("prompt_split.json")


SPLITS = ("train", "eval")


def load_prompt_split(path: str | Path | None = None) -> dict[str, list[str]]:
    """`{"train": [prompt_id, ...], "eval": [...]}` from a split file (default: the packaged prompt_split.json).

    The file is a JSON object with a `train` and an `eval` list of prompt ids (scripts/make_prompt_split.py
    writes it); an id may appear only once in all.
    """
    path = Path(path) if path is not None else default_split_path()
    data = read_json(path, SynthError)
    if not isinstance(data, Mapping):
        raise SynthError(f"{path}: expected a JSON object with 'train' and 'eval' lists of prompt ids")
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for name in SPLITS:
        ids = data.get(name)
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise SynthError(f"{path}: {name}: expected a list of prompt ids (strings)")
        for pid in ids:
            if pid in seen:
                where = "twice" if seen[pid] == name else f"in both {seen[pid]!r} and {name!r}"
                raise SynthError(f"{path}: prompt_id {pid!r} is listed {where}")
            seen[pid] = name
        out[name] = list(ids)
    return out


def _check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise SynthError(f"{where}: messages: expected a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SynthError(f"{where}: messages[{i}]: expected {{'role': str, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise SynthError(f"{where}: the last message must be the user's (the completion answers it)")
    return tuple(out)


def policy_response_type(policy: Policy, name: str) -> str | None:
    """The policy's key for a response type name or alias that has classes; None otherwise."""
    key = policy.find_response_type(name)
    return key if key in policy.classes else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(read_text(path, SynthError), Loader=SAFE_YAML_LOADER)  # noqa: S506 - safe
    except yaml.YAMLError as exc:
        raise SynthError(f"{path}: not valid YAML: {exc}") from None


def load_prompts(
    path: str | Path | None = None,
    policy: Policy | None = None,
    split: str | None = None,
    split_path: str | Path | None = None,
) -> list[SynthPrompt]:
    """Prompts from JSONL (`prompt_id`, `response_type`, `messages`, optional `category`).

    With a policy, response type aliases are resolved and unknown response types are an error. With a split
    (`train` or `eval`), only that split's prompts of the split file (default: the packaged prompt_split.json),
    in file order; the split file must name exactly the prompts of the file.
    """
    if split is not None and split not in SPLITS:
        raise SynthError(f"unknown prompt split {split!r}: expected one of {', '.join(SPLITS)}")
    path = Path(path) if path is not None else default_prompts_path()
    prompts: list[SynthPrompt] = []
    seen: set[str] = set()
    for where, obj in read_jsonl(path, SynthError):
        if not isinstance(obj, Mapping):
            raise SynthError(f"{where}: expected a JSON object")
        pid, rt = obj.get("prompt_id"), obj.get("response_type")
        if isinstance(pid, bool) or not isinstance(pid, str | int) or str(pid) == "":
            raise SynthError(f"{where}: prompt_id: expected a non-empty string")
        if not isinstance(rt, str) or not rt:
            raise SynthError(f"{where}: response_type: expected a name")
        if policy is not None:
            resolved = policy_response_type(policy, rt)
            if resolved is None:
                raise SynthError(f"{where}: response type {rt!r} is not in policy {policy.name!r}")
            rt = resolved
        if str(pid) in seen:
            raise SynthError(f"{where}: duplicate prompt_id {pid!r}")
        seen.add(str(pid))
        prompts.append(SynthPrompt(str(pid), rt, _check_messages(obj.get("messages"), where),
                                   str(obj.get("category") or "")))
    if not prompts:
        raise SynthError(f"{path}: no prompts")
    if split is None:
        return prompts
    split_path = Path(split_path) if split_path is not None else default_split_path()
    splits = load_prompt_split(split_path)
    listed = {pid for ids in splits.values() for pid in ids}
    unknown = [pid for ids in splits.values() for pid in ids if pid not in seen]
    if unknown:
        raise SynthError(f"{split_path}: {len(unknown)} prompt id(s) not in {path}: {', '.join(unknown[:5])}")
    missing = [p.prompt_id for p in prompts if p.prompt_id not in listed]
    if missing:
        raise SynthError(f"{split_path}: {len(missing)} prompt(s) of {path} in neither split: "
                         f"{', '.join(missing[:5])} (rerun scripts/make_prompt_split.py)")
    wanted = set(splits[split])
    return [p for p in prompts if p.prompt_id in wanted]


def load_labels(path: str | Path | None = None) -> dict[str, dict[str, str]]:
    """`{response_type: {label: instruction}}` from YAML (default: the packaged labels.yaml)."""
    path = Path(path) if path is not None else default_labels_path()
    data = _read_yaml(path)
    if not isinstance(data, Mapping) or not data:
        raise SynthError(f"{path}: expected {{response_type: {{label: instruction}}}}")
    out: dict[str, dict[str, str]] = {}
    for rt, table in data.items():
        if not isinstance(table, Mapping) or not table:
            raise SynthError(f"{path}: {rt}: expected {{label: instruction}}")
        out[str(rt)] = {}
        for label, instruction in table.items():
            if not isinstance(instruction, str) or not instruction.strip():
                raise SynthError(f"{path}: {rt}.{label}: expected an instruction (text)")
            out[str(rt)][str(label)] = instruction.strip()
    return out


def check_expectations(
    table: Mapping[str, Mapping[str, Collection[str]]], policy: Policy
) -> dict[str, dict[str, frozenset[str]]]:
    """Validate a `{response_type: {label: [classes]}}` table against the policy's class names."""
    out: dict[str, dict[str, frozenset[str]]] = {}
    if not isinstance(table, Mapping):
        raise SynthError("expectations: expected {response_type: {label: [classes]}}")
    for rt, labels in table.items():
        resolved = policy_response_type(policy, str(rt))
        if resolved is None:
            raise SynthError(f"expectations: response type {rt!r} is not in policy {policy.name!r}")
        if not isinstance(labels, Mapping):
            raise SynthError(f"expectations.{rt}: expected {{label: [classes]}}")
        known = set(policy.class_names(resolved))
        out[resolved] = {}
        for label, classes in labels.items():
            if isinstance(classes, str) or not isinstance(classes, Collection) or not classes:
                raise SynthError(f"expectations.{rt}.{label}: expected a non-empty list of class names")
            unknown = set(map(str, classes)) - known
            if unknown:
                raise SynthError(f"expectations.{rt}.{label}: unknown classes {sorted(unknown)}; "
                                 f"the policy's are {sorted(known)}")
            out[resolved][str(label)] = frozenset(map(str, classes))
    return out


def load_expectations(path: str | Path, policy: Policy) -> dict[str, dict[str, frozenset[str]]]:
    """An expectations table from YAML or JSON, checked against the policy."""
    path = Path(path)
    data = _read_yaml(path)
    return check_expectations(data, policy)
