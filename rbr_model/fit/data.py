"""Training rows and orderings: loading and validation, preference pairs, pair scoring, rows as columns."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rbr_model.features import FeatureSpec
from rbr_model.files import read_jsonl, read_text
from rbr_model.policy import SAFE_YAML_LOADER, Policy

Rows = Sequence[Mapping[str, Any]]
Orderings = dict[str, dict[str, list[str]]]  # response type -> label -> labels it beats (as written)
Callback = Callable[[str, int, int], None]  # (response type, step done, step budget)

REQUIRED_FIELDS = ("prompt_id", "response_type", "completion_label", "features")
SATISFIED_TOL = 1e-6  # a pair "meets the margin" when R_a - R_b >= margin - SATISFIED_TOL


# ---- loading and validation -----------------------------------------------------------------------------


_NUMBER_TYPES = {float, int}  # exact types: bool is an int subclass, and not a number here


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_row(row: Any, where: str) -> dict[str, Any]:
    """One row, checked field by field; returns it normalised (prompt_id as str, rm_score as float)."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in row:
            raise ValueError(f"{where}: field {key!r}: missing")
    pid = row["prompt_id"]
    if isinstance(pid, bool) or not isinstance(pid, str | int) or pid == "":
        raise ValueError(f"{where}: field 'prompt_id': expected a non-empty string or an integer, got {pid!r}")
    for key in ("response_type", "completion_label"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: field {key!r}: expected a non-empty string, got {row[key]!r}")
    rm = row.get("rm_score")
    if rm is not None and not _finite_number(rm):
        raise ValueError(f"{where}: field 'rm_score': expected a finite number or null, got {rm!r}")
    feats = row["features"]
    if not isinstance(feats, Mapping):
        raise ValueError(f"{where}: field 'features': expected an object of {{name: number}}")
    values = feats.values()
    # One pass in C for the usual row (all floats or ints, and their sum finite, so each is); thousands of rows x
    # dozens of features make a value-by-value loop a fifth of a short `rbr fit`. Anything else is looked at
    # value by value, to name the bad one.
    if not (set(map(type, values)) <= _NUMBER_TYPES and math.isfinite(sum(values))):
        for name, value in feats.items():
            if not _finite_number(value):
                raise ValueError(f"{where}: field 'features.{name}': expected a finite number, got {value!r}")
    return {
        "prompt_id": str(pid),
        "response_type": row["response_type"],
        "completion_label": row["completion_label"],
        "rm_score": 0.0 if rm is None else float(rm),
        "features": dict(feats),
    }


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read training rows from JSONL, one object per line; blank lines are skipped.

    Each row: ``{"prompt_id", "response_type", "completion_label", "rm_score", "features": {name: value}}``.
    ``rm_score`` may be missing or null (taken as 0, as for data made without a reward model). Other keys
    are kept out of the result. Errors name the file, the line and the field, because people hand-edit these.
    """
    rows = [_check_row(obj, where) for where, obj in read_jsonl(path)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _node_line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _orderings_from_node(root: yaml.Node | None, source: str) -> Orderings:
    """Walk the composed YAML so every error can name its line; labels are taken as written (no yes->True)."""
    if not isinstance(root, yaml.MappingNode) or not root.value:
        line = _node_line(root) if root is not None else 1
        raise ValueError(f"{source}:{line}: expected a mapping {{response_type: {{label: [labels it beats]}}}}")
    out: Orderings = {}
    for rt_node, table_node in root.value:
        rt = rt_node.value if isinstance(rt_node, yaml.ScalarNode) else None
        where = f"{source}:{_node_line(rt_node)}"
        if not rt:
            raise ValueError(f"{where}: response type: expected a name")
        if rt in out:
            raise ValueError(f"{where}: {rt}: duplicate response type")
        if not isinstance(table_node, yaml.MappingNode) or not table_node.value:
            raise ValueError(f"{source}:{_node_line(table_node)}: {rt}: expected a mapping {{label: [labels]}}")
        table: dict[str, list[str]] = {}
        for label_node, beats_node in table_node.value:
            label = label_node.value if isinstance(label_node, yaml.ScalarNode) else None
            where = f"{source}:{_node_line(label_node)}"
            if not label:
                raise ValueError(f"{where}: {rt}: expected a label name")
            if label in table:
                raise ValueError(f"{where}: {rt}.{label}: duplicate label")
            if isinstance(beats_node, yaml.ScalarNode) and beats_node.tag.endswith(":null"):
                items: list[yaml.Node] = []
            elif isinstance(beats_node, yaml.SequenceNode):
                items = beats_node.value
            else:
                raise ValueError(f"{source}:{_node_line(beats_node)}: {rt}.{label}: expected a list of labels")
            beaten = []
            for item in items:
                if not isinstance(item, yaml.ScalarNode) or not item.value:
                    raise ValueError(f"{source}:{_node_line(item)}: {rt}.{label}: expected a label name")
                beaten.append(item.value)
            table[label] = beaten
        out[rt] = table
    return out


def load_orderings(path: str | Path) -> Orderings:
    """Read orderings YAML: ``{response_type: {label: [labels it beats]}}``; checked by `validate_orderings`."""
    path = Path(path)
    text = read_text(path)
    try:
        root = yaml.compose(text, Loader=SAFE_YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{path}{line}: not valid YAML: {problem}") from None
    orderings = _orderings_from_node(root, str(path))
    validate_orderings(orderings, source=str(path))
    return orderings


def validate_orderings(orderings: Any, source: str = "orderings") -> Orderings:
    """Check an orderings mapping (types, no label beating itself, no cycle); returns a plain-dict copy."""
    if not isinstance(orderings, Mapping) or not orderings:
        raise ValueError(f"{source}: expected a mapping {{response_type: {{label: [labels it beats]}}}}")
    out: Orderings = {}
    for rt, table in orderings.items():
        if not isinstance(rt, str) or not rt:
            raise ValueError(f"{source}: {rt!r}: response type must be a non-empty string")
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"{source}: {rt}: expected a mapping {{label: [labels it beats]}}")
        out[rt] = {}
        for label, beaten in table.items():
            if not isinstance(label, str) or not label:
                raise ValueError(f"{source}: {rt}: label {label!r} must be a non-empty string")
            if beaten is None:
                beaten = []
            if isinstance(beaten, str) or not isinstance(beaten, Sequence):
                raise ValueError(f"{source}: {rt}.{label}: expected a list of labels, got {beaten!r}")
            for other in beaten:
                if not isinstance(other, str) or not other:
                    raise ValueError(f"{source}: {rt}.{label}: label {other!r} must be a non-empty string")
                if other == label:
                    raise ValueError(f"{source}: {rt}.{label}: a label cannot beat itself")
            out[rt][label] = list(beaten)
        _label_order(out[rt], f"{source}: {rt}")  # raises on a cycle
    return out


def _label_order(table: Mapping[str, Sequence[str]], where: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Labels of one response type and the transitively closed `beats[i, j]` matrix; a cycle is an error."""
    labels: list[str] = []
    for label, beaten in table.items():
        for name in (label, *beaten):
            if name not in labels:
                labels.append(name)
    index = {name: i for i, name in enumerate(labels)}
    beats = np.zeros((len(labels), len(labels)), dtype=bool)
    for label, beaten in table.items():
        for other in beaten:
            beats[index[label], index[other]] = True
    while True:  # boolean matrix squaring doubles the path length each round: log2(labels) rounds
        wider = beats | ((beats.astype(np.int64) @ beats.astype(np.int64)) > 0)
        if (wider == beats).all():
            break
        beats = wider
    cyclic = np.flatnonzero(np.diag(beats))
    if cyclic.size:
        raise ValueError(f"{where}: the ordering has a cycle through {labels[cyclic[0]]!r}")
    return tuple(labels), beats


def split_prompts(prompt_ids: Sequence[Any], fraction: float, seed: int) -> set[str]:
    """The held-out prompt ids: a seeded shuffle of the sorted unique ids, so the split is reproducible.

    At least one prompt is held out when ``fraction > 0``, and at least one stays for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    unique = sorted({str(p) for p in prompt_ids})
    if fraction == 0.0 or len(unique) < 2:
        return set()
    n_held = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:n_held]}


# ---- pairs ---------------------------------------------------------------------------------------------


def build_pairs(groups: np.ndarray, labels: np.ndarray, beats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (better, worse) index pairs that share a group, vectorised.

    ``groups``: int code per example (prompt, or prompt and response type); ``labels``: int code per example
    indexing ``beats`` (a code with no True in its row and column never pairs). The examples are sorted by
    group, and every example is paired with every member of its own group through index arithmetic on
    ``np.repeat``, so the work is sum(group size²), with no Python loop over examples.
    """
    groups = np.asarray(groups)
    labels = np.asarray(labels, dtype=np.int64)
    n = groups.shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, n])
    size_of = np.repeat(sizes, sizes)  # per sorted example: its group's size
    start_of = np.repeat(starts, sizes)  # per sorted example: where its group starts
    left = np.repeat(np.arange(n), size_of)  # sorted position of the first member of each candidate pair
    first_slot = np.cumsum(size_of) - size_of  # where each example's run of candidates begins
    right = np.repeat(start_of, size_of) + (np.arange(left.size) - np.repeat(first_slot, size_of))
    lab = labels[order]
    keep = beats[lab[left], lab[right]]
    return order[left[keep]], order[right[keep]]


def _margin_table(
    labels: Sequence[str], margin: float, label_margins: Mapping[str, float]
) -> np.ndarray:
    """margins[i, j] for label i beating label j: pair key, then better-label key, then the global margin."""
    table = np.full((len(labels), len(labels)), float(margin))
    for i, better in enumerate(labels):
        if better in label_margins:
            table[i, :] = label_margins[better]
        for j, worse in enumerate(labels):
            key = f"{better}>{worse}"
            if key in label_margins:
                table[i, j] = label_margins[key]
    return table


def _check_label_margins(label_margins: Mapping[str, float] | None, orderings: Orderings) -> dict[str, float]:
    known = {name for table in orderings.values() for label, beaten in table.items() for name in (label, *beaten)}
    out: dict[str, float] = {}
    for key, value in (label_margins or {}).items():
        names = key.split(">") if ">" in key else [key]
        if len(names) > 2 or any(n not in known for n in names):
            raise ValueError(f"label_margins: {key!r} names no label of the orderings (known: {sorted(known)})")
        if not _finite_number(value) or value < 0:
            raise ValueError(f"label_margins: {key!r}: expected a finite number >= 0, got {value!r}")
        out[key] = float(value)
    return out


# ---- scoring helpers -------------------------------------------------------------------------------------


def _pair_stats(diff: np.ndarray, margins: np.ndarray) -> dict[str, float | None]:
    """Accuracy (ties half), mean hinge, fraction meeting the margin, for score gaps R_a - R_b."""
    if diff.size == 0:
        return {"pair_accuracy": None, "hinge_loss": None, "margin_satisfied": None}
    return {
        "pair_accuracy": float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size),
        "hinge_loss": float(np.maximum(0.0, margins - diff).mean()),
        "margin_satisfied": float((diff >= margins - SATISFIED_TOL).mean()),
    }


def pair_accuracy(rows: Rows, orderings: Mapping[str, Any], scores: Sequence[float]) -> float:
    """Fraction of ordered pairs (same prompt, same response type) that ``scores`` rank the right way round.

    ``scores[i]`` is the total reward of ``rows[i]``; ties count half. NaN when the rows make no pair.
    """
    table = validate_orderings(orderings)
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (len(rows),):
        raise ValueError(f"scores: expected {len(rows)} values, one per row, got shape {scores.shape}")
    rts = np.array([str(r["response_type"]) for r in rows])
    pids = np.array([str(r["prompt_id"]) for r in rows])
    correct = total = 0.0
    for rt in sorted(set(rts.tolist()) & set(table)):
        idx = np.flatnonzero(rts == rt)
        labels, beats = _label_order(table[rt], rt)
        codes = _label_codes(labels, [rows[i]["completion_label"] for i in idx])
        _, groups = np.unique(pids[idx], return_inverse=True)
        a, b = build_pairs(groups, codes, _pad(beats))
        diff = scores[idx[a]] - scores[idx[b]]
        correct += (diff > 0).sum() + 0.5 * (diff == 0).sum()
        total += diff.size
    return float(correct / total) if total else float("nan")


def _label_codes(labels: Sequence[str], values: Sequence[str]) -> np.ndarray:
    """Label names to codes; a label outside the ordering gets len(labels), an all-False row of `_pad`."""
    index = {name: i for i, name in enumerate(labels)}
    unranked = len(labels)
    return np.fromiter((index.get(v, unranked) for v in values), dtype=np.int64, count=len(values))


def _pad(beats: np.ndarray) -> np.ndarray:
    out = np.zeros((beats.shape[0] + 1, beats.shape[1] + 1), dtype=bool)
    out[:-1, :-1] = beats
    return out


# ---- rows as columns -------------------------------------------------------------------------------------


@dataclass
class _Columns:
    prompt_id: list[str]
    response_type: list[str]
    label: list[str]
    rm: np.ndarray
    features: list[Mapping[str, Any]]
    prompt_code: np.ndarray  # int per row, indexing prompt_names
    prompt_names: list[str]  # unique prompt ids, in order of first appearance


def _columns(rows: Rows) -> _Columns:
    """Rows to checked columns. Whole columns are checked at once (fast); only when that finds a problem do
    the rows get checked one by one, to name the first bad row and field."""
    try:
        pid = [r["prompt_id"] for r in rows]
        rts = [r["response_type"] for r in rows]
        labels = [r["completion_label"] for r in rows]
        feats = [r["features"] for r in rows]
        rm_raw = [r.get("rm_score") for r in rows]
        ok = (
            {type(v) for v in pid} <= {str, int}
            and "" not in pid
            and {type(v) for v in rts} | {type(v) for v in labels} <= {str}
            and all(map(str.strip, rts))
            and all(map(str.strip, labels))
            and {type(f) for f in feats} <= {dict}
            and {type(v) for v in rm_raw} <= {int, float, type(None)}
        )
    except (KeyError, TypeError, AttributeError):
        ok = False
    if ok:
        rm = np.array([0.0 if v is None else v for v in rm_raw], dtype=float)
        ok = bool(np.isfinite(rm).all())
    if not ok:  # the careful pass raises on the first bad row
        checked = [_check_row(r, f"row {i + 1}") for i, r in enumerate(rows)]
        pid = [r["prompt_id"] for r in checked]
        rts = [r["response_type"] for r in checked]
        labels = [r["completion_label"] for r in checked]
        feats = [r["features"] for r in checked]
        rm = np.array([r["rm_score"] for r in checked], dtype=float)
    ids = pid if {type(v) for v in pid} == {str} else [str(v) for v in pid]
    index: dict[str, int] = {}
    code = np.fromiter((index.setdefault(v, len(index)) for v in ids), np.int64, len(ids))
    return _Columns(ids, rts, labels, rm, feats, code, list(index))


def _pick_feature_names(
    rt: str,
    feats: list[Mapping[str, Any]],
    policy: Policy | None,
    given: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> tuple[str, ...]:
    if given is not None:
        names = given.get(rt) if isinstance(given, Mapping) else given
        if not names or isinstance(names, str):
            raise ValueError(f"feature_names: expected a list of names for response type {rt!r}, got {names!r}")
        return tuple(names)
    if policy is not None:
        if rt not in policy.classes:
            raise ValueError(f"response type {rt!r} has no classes in policy {policy.name!r}")
        return FeatureSpec(policy, rt).feature_names
    return tuple(sorted(set().union(*feats)))


def _resolve(policy: Policy, name: str) -> str:
    rt = policy.find_response_type(name)
    if rt is None:
        raise ValueError(f"response type {name!r} is not in policy {policy.name!r} ({', '.join(policy.classes)})")
    return rt


def _feature_matrix(cols: _Columns, idx: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """[rows, features] in `names` order. A missing or non-numeric value is an error naming row and feature.

    The fast path streams the values into one float array (numeric strings and booleans convert, as they
    would in numpy); only on a failure are the rows walked again, to name the culprit.
    """
    get = operator.itemgetter(*names)
    values = (cols.features[i] for i in idx)
    stream = itertools.chain.from_iterable(map(get, values)) if len(names) > 1 else map(get, values)
    try:
        x = np.fromiter(stream, dtype=float, count=idx.size * len(names)).reshape(idx.size, len(names))
        if np.isfinite(x).all():
            return x
    except (KeyError, ValueError, TypeError):
        pass
    for i in idx:  # find the first culprit, for the message
        feats = cols.features[i]
        where = f"row {int(i) + 1} (prompt_id {cols.prompt_id[i]!r})"
        for name in names:
            if name not in feats:
                raise ValueError(f"{where}: missing feature {name!r} (response type {cols.response_type[i]!r})")
            if not _finite_number(feats[name]) and not isinstance(feats[name], bool):
                raise ValueError(f"{where}: field 'features.{name}': expected a finite number, got {feats[name]!r}")
    raise AssertionError("unreachable: a bad feature value was not found")
