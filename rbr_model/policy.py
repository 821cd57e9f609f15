"""The policy spec: propositions, derived propositions, completion classes per response type.

Two on-disk formats load into the same `Policy`: our own YAML (see `policies/default.yaml`) and OpenAI's
published `proposition_prompts.yaml` (as an import). Validation happens at load, and every error names the
file and the key, because policy authors edit these files by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rbr_model.files import read_text

DEFAULT_CLASS_ORDER = (
    "ideal",
    "minimum_acceptable_style",
    "unacceptable_completion",
    "illogical_completion",
    "disallowed_completion",
)
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PolicyError(ValueError):
    """A policy file is invalid; the message names the file and the key."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}")


@dataclass(frozen=True)
class Example:
    """One few-shot example for a proposition."""

    conversation: tuple[tuple[str, str], ...]  # (role, content) pairs before the judged reply
    response: str
    answer: bool
    why: str = ""


@dataclass(frozen=True)
class Proposition:
    """A yes/no question about the assistant's last message, answered by the grader."""

    name: str
    question: str
    guidance: str = ""
    examples: tuple[Example, ...] = ()


Conjunction = tuple[tuple[str, bool], ...]  # ((proposition name, required value), ...)


@dataclass(frozen=True)
class ResponseType:
    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A validated RBR policy. Build it with `load_policy`, `parse_policy` or `import_openai_policy`."""

    name: str
    response_types: dict[str, ResponseType]
    propositions: dict[str, Proposition]
    derived: dict[str, Conjunction]
    classes: dict[str, dict[str, Conjunction]]  # response type -> class -> conjunction, in class order
    class_order: tuple[str, ...]
    prompt_template: str | None = None  # imported policies carry their own grading template
    description: str = ""
    version: str = "1"
    source: str = "<memory>"
    _alias_index: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # ---- identity -------------------------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """Everything that changes grading or features, in a stable form (names and descriptions excluded)."""
        return {
            "propositions": {
                n: {
                    "question": p.question,
                    "guidance": p.guidance,
                    "examples": [
                        [list(map(list, e.conversation)), e.response, e.answer, e.why] for e in p.examples
                    ],
                }
                for n, p in sorted(self.propositions.items())
            },
            "derived": {n: [list(t) for t in c] for n, c in sorted(self.derived.items())},
            "classes": {
                rt: {cls: [list(t) for t in conj] for cls, conj in classes.items()}
                for rt, classes in sorted(self.classes.items())
            },
            "class_order": list(self.class_order),
            "prompt_template": self.prompt_template,
        }

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical form: versions every cached feature and every weights file."""
        blob = json.dumps(self.canonical(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def short_version(self) -> str:
        return f"{self.name}@{self.fingerprint[:12]}"

    # ---- lookups --------------------------------------------------------------------------------------
    def resolve_response_type(self, name: str | None) -> str | None:
        """Map a caller's label ("Hard Refuse", "safe_refuse_1") to a policy key; None/"" means none applies."""
        if name is None:
            return None
        key = normalise_label(name)
        if key in ("", "none", "null"):
            return None
        if key in self.response_types:
            return key
        if key in self._alias_index:
            return self._alias_index[key]
        raise KeyError(name)

    def find_response_type(self, name: str | None) -> str | None:
        """Like `resolve_response_type`, for callers to whom an unknown name means none: the key, or None."""
        try:
            return self.resolve_response_type(name)
        except KeyError:
            return None

    def propositions_for(self, response_type: str) -> tuple[str, ...]:
        """Simple propositions the classes of a response type depend on, in declaration order."""
        return self._needed[response_type]

    def class_names(self, response_type: str) -> tuple[str, ...]:
        return tuple(self.classes[response_type])

    @cached_property
    def _needed(self) -> dict[str, tuple[str, ...]]:
        out = {}
        for rt, classes in self.classes.items():
            used: set[str] = set()
            for conj in classes.values():
                used |= self._simple_names(conj)
            out[rt] = tuple(n for n in self.propositions if n in used)
        return out

    def _simple_names(self, conj: Conjunction) -> set[str]:
        names: set[str] = set()
        for name, _ in conj:
            names |= self._simple_names(self.derived[name]) if name in self.derived else {name}
        return names


# libyaml's parser where PyYAML was built with it (the wheels are): about 8x faster on the default policy, which
# every short command (`rbr fit`, `rbr eval ...`) reads first. Same safe constructors, same error marks.
SAFE_YAML_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(SAFE_YAML_LOADER):
    """YAML silently keeps the last of two equal keys; a policy author needs to hear about it."""


def _construct_unique_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate name {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML, refusing duplicate keys; errors name the file."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        # Say where and what, never echo the file's text (an admin reload may point at any file).
        problem = getattr(exc, "problem", None) or type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        key = "duplicate name" if "duplicate name" in problem else "<file>"
        raise PolicyError(source, key, f"not valid YAML{where}: {problem}") from exc


def normalise_label(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip()).lower()


# ---- loading ---------------------------------------------------------------------------------------------


def load_policy(path: str | Path | None = None) -> Policy:
    """Load a policy file in either format; None loads the packaged default policy."""
    if path is None:
        ref = resources.files("rbr_model") / "policies" / "default.yaml"
        return parse_policy(read_yaml(ref.read_text(encoding="utf-8"), "default.yaml"), source="default.yaml")
    path = Path(path)
    text = read_text(path, lambda message: PolicyError(str(path), "<file>", message.removeprefix(f"{path}: ")))
    data = read_yaml(text, str(path))
    if isinstance(data, dict) and "simple_propositions" in data:
        return import_openai_policy(data, source=str(path))
    return parse_policy(data, source=str(path))


def parse_policy(data: Any, source: str = "<memory>") -> Policy:
    """Build a `Policy` from our own YAML format (already parsed)."""
    src = source
    if not isinstance(data, dict):
        raise PolicyError(src, "<root>", "expected a mapping")
    _no_unknown_keys(
        src,
        "<root>",
        data,
        {"name", "version", "description", "class_order", "response_types", "propositions", "derived",
         "classes", "prompt_template"},
    )

    rts: dict[str, ResponseType] = {}
    raw_rts = _mapping(src, "response_types", data.get("response_types"))
    for rt_name, spec in raw_rts.items():
        _check_name(src, f"response_types.{rt_name}", rt_name)
        spec = spec or {}
        _mapping(src, f"response_types.{rt_name}", spec, allow_empty=True)
        aliases = tuple(normalise_label(a) for a in spec.get("aliases", []) or [])
        rts[rt_name] = ResponseType(rt_name, str(spec.get("description", "")), aliases)

    props: dict[str, Proposition] = {}
    raw_props = _mapping(src, "propositions", data.get("propositions"))
    for pname, spec in raw_props.items():
        key = f"propositions.{pname}"
        _check_name(src, key, pname)
        _mapping(src, key, spec)
        _no_unknown_keys(src, key, spec, {"question", "guidance", "examples"})
        question = spec.get("question")
        if not isinstance(question, str) or not question.strip():
            raise PolicyError(src, f"{key}.question", "empty question")
        examples = []
        for i, ex in enumerate(spec.get("examples") or []):
            examples.append(_parse_example(src, f"{key}.examples[{i}]", ex))
        props[pname] = Proposition(pname, question.strip(), str(spec.get("guidance", "") or "").strip(),
                                   tuple(examples))

    derived = {
        name: _conjunction(src, f"derived.{name}", conj)
        for name, conj in (_mapping(src, "derived", data.get("derived") or {}, allow_empty=True)).items()
    }
    order = tuple(data.get("class_order") or DEFAULT_CLASS_ORDER)
    classes: dict[str, dict[str, Conjunction]] = {}
    for rt_name, rt_classes in _mapping(src, "classes", data.get("classes")).items():
        if rt_name not in rts:
            raise PolicyError(src, f"classes.{rt_name}", "unknown response type")
        rt_classes = _mapping(src, f"classes.{rt_name}", rt_classes, allow_empty=True)
        classes[rt_name] = {
            cls: _conjunction(src, f"classes.{rt_name}.{cls}", rt_classes[cls])
            for cls in order
            if cls in rt_classes
        }
        for cls in rt_classes:
            if cls not in order:
                raise PolicyError(src, f"classes.{rt_name}.{cls}", f"class not in class_order {list(order)}")
    return _finish(
        src,
        name=str(data.get("name") or Path(source).stem),
        version=str(data.get("version", "1")),
        description=str(data.get("description", "") or ""),
        response_types=rts,
        propositions=props,
        derived=derived,
        classes=classes,
        class_order=order,
        prompt_template=data.get("prompt_template"),
    )


def import_openai_policy(data: Mapping[str, Any], source: str = "<memory>") -> Policy:
    """Build a `Policy` from OpenAI's published `proposition_prompts.yaml` layout.

    Their `completion_classes` is keyed class -> response type; ours is response type -> class. Their
    proposition prompts embed the examples in the text, so they become the question verbatim.
    """
    src = source
    props = {}
    for pname, spec in _mapping(src, "simple_propositions", data.get("simple_propositions")).items():
        key = f"simple_propositions.{pname}"
        _check_name(src, key, pname)
        text = spec.get("prompt") if isinstance(spec, dict) else spec
        if not isinstance(text, str) or not text.strip():
            raise PolicyError(src, f"{key}.prompt", "empty question")
        props[pname] = Proposition(pname, text.strip())
    derived = {
        n: _conjunction(src, f"derived_propositions.{n}", c)
        for n, c in _mapping(src, "derived_propositions", data.get("derived_propositions") or {},
                             allow_empty=True).items()
    }
    order = tuple(data.get("completion_class_order") or DEFAULT_CLASS_ORDER)
    by_class = _mapping(src, "completion_classes", data.get("completion_classes"))
    rt_names: list[str] = []
    for cls, per_rt in by_class.items():
        if cls not in order:
            raise PolicyError(src, f"completion_classes.{cls}", f"class not in completion_class_order {list(order)}")
        for rt in _mapping(src, f"completion_classes.{cls}", per_rt):
            if rt not in rt_names:
                rt_names.append(rt)
    classes = {
        rt: {
            cls: _conjunction(src, f"completion_classes.{cls}.{rt}", by_class[cls][rt])
            for cls in order
            if cls in by_class and rt in (by_class[cls] or {})
        }
        for rt in rt_names
    }
    return _finish(
        src,
        name=Path(source).stem if source != "<memory>" else "openai-import",
        version="1",
        description="Imported from OpenAI's proposition_prompts.yaml format.",
        response_types={rt: ResponseType(rt) for rt in rt_names},
        propositions=props,
        derived=derived,
        classes=classes,
        class_order=order,
        prompt_template=data.get("prompt_template"),
    )


def policy_to_yaml(policy: Policy) -> str:
    """Serialise a policy in our own YAML format (used by `rbr policy import-openai`)."""
    out: dict[str, Any] = {
        "name": policy.name,
        "version": policy.version,
        "description": policy.description,
        "class_order": list(policy.class_order),
        "response_types": {
            n: {"description": rt.description, "aliases": list(rt.aliases)} for n, rt in policy.response_types.items()
        },
        "propositions": {},
        "derived": {n: dict(c) for n, c in policy.derived.items()},
        "classes": {rt: {cls: dict(c) for cls, c in cl.items()} for rt, cl in policy.classes.items()},
    }
    if policy.prompt_template:
        out["prompt_template"] = policy.prompt_template
    for n, p in policy.propositions.items():
        spec: dict[str, Any] = {"question": p.question}
        if p.guidance:
            spec["guidance"] = p.guidance
        spec["examples"] = [
            {
                "conversation": [{"role": r, "content": c} for r, c in e.conversation],
                "response": e.response,
                "answer": e.answer,
                **({"why": e.why} if e.why else {}),
            }
            for e in p.examples
        ]
        out["propositions"][n] = spec
    return yaml.safe_dump(out, sort_keys=False, allow_unicode=True, width=110)


# ---- validation helpers --------------------------------------------------------------------------------


def _finish(src: str, **kw: Any) -> Policy:
    props, derived, classes, rts = kw["propositions"], kw["derived"], kw["classes"], kw["response_types"]
    if not props:
        raise PolicyError(src, "propositions", "no propositions defined")
    for name in derived:
        _check_name(src, f"derived.{name}", name)
        if name in props:
            raise PolicyError(src, f"derived.{name}", "duplicate name: also a simple proposition")
    known = set(props) | set(derived)
    for name, conj in derived.items():
        for ref, _ in conj:
            if ref not in known:
                raise PolicyError(src, f"derived.{name}.{ref}", "unknown proposition")
    _check_cycles(src, derived)
    for rt in rts:
        if not classes.get(rt):
            raise PolicyError(src, f"classes.{rt}", "response type has no class")
    for rt, cl in classes.items():
        for cls, conj in cl.items():
            if not conj:
                raise PolicyError(src, f"classes.{rt}.{cls}", "class has no condition")
            for ref, _ in conj:
                if ref not in known:
                    raise PolicyError(src, f"classes.{rt}.{cls}.{ref}", "unknown proposition")
    alias_index: dict[str, str] = {}
    for rt in rts.values():
        for alias in rt.aliases:
            if alias in rts or alias in alias_index:
                raise PolicyError(src, f"response_types.{rt.name}.aliases", f"duplicate name {alias!r}")
            alias_index[alias] = rt.name
    return Policy(source=src, _alias_index=alias_index, **kw)


def _check_cycles(src: str, derived: dict[str, Conjunction]) -> None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(path[path.index(name):] + [name])
            raise PolicyError(src, f"derived.{name}", f"cycle among derived propositions: {cycle}")
        state[name] = 1
        for ref, _ in derived[name]:
            if ref in derived:
                visit(ref, path + [name])
        state[name] = 2

    for name in derived:
        visit(name, [])


def _parse_example(src: str, key: str, ex: Any) -> Example:
    _mapping(src, key, ex)
    _no_unknown_keys(src, key, ex, {"conversation", "response", "answer", "why"})
    conv = []
    for j, msg in enumerate(ex.get("conversation") or []):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
            raise PolicyError(src, f"{key}.conversation[{j}]", "expected {role, content}")
        conv.append((str(msg["role"]), msg["content"]))
    if not isinstance(ex.get("response"), str):
        raise PolicyError(src, f"{key}.response", "expected a string")
    answer = ex.get("answer")
    if isinstance(answer, str) and answer.strip().lower() in ("yes", "no"):
        answer = answer.strip().lower() == "yes"
    if not isinstance(answer, bool):
        raise PolicyError(src, f"{key}.answer", "expected yes or no")
    return Example(tuple(conv), ex["response"], answer, str(ex.get("why", "") or ""))


def _conjunction(src: str, key: str, raw: Any) -> Conjunction:
    if raw is None:
        return ()
    _mapping(src, key, raw, allow_empty=True)
    out = []
    for name, value in raw.items():
        if not isinstance(value, bool):
            raise PolicyError(src, f"{key}.{name}", f"expected true or false, got {value!r}")
        out.append((str(name), value))
    return tuple(out)


def _mapping(src: str, key: str, value: Any, allow_empty: bool = False) -> dict:
    if value is None and allow_empty:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(src, key, "missing or not a mapping")
    if not value and not allow_empty:
        raise PolicyError(src, key, "is empty")
    return value


def _no_unknown_keys(src: str, key: str, value: dict, allowed: set[str]) -> None:
    for k in value:
        if k not in allowed:
            raise PolicyError(src, f"{key}.{k}", f"unknown key (expected one of {sorted(allowed)})")


def _check_name(src: str, key: str, name: Any) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PolicyError(src, key, "names must be identifiers (letters, digits, underscore)")
