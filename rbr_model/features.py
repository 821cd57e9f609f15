"""Features from proposition probabilities: class probabilities and the named feature vector.

A class is a conjunction of propositions, some of them derived. A derived proposition required true is
expanded in place; one required false contributes 1 - P(it holds | the literals already fixed), so a literal
that appears at several levels is counted once. With 0/1 inputs this is exact Boolean logic (one-hot classes
for a consistent policy); with probabilities it treats propositions as independent, as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rbr_model.policy import Conjunction, Policy

CLASS_PREFIX = "class:"


@dataclass(frozen=True)
class _Node:
    """A compiled conjunction: literals over columns, then negated sub-conjunctions given those literals."""

    literals: tuple[tuple[int, bool], ...]
    negated: tuple[_Node, ...]
    impossible: bool = False

    def probability(self, p: np.ndarray) -> np.ndarray:
        if self.impossible:
            return np.zeros(p.shape[0])
        out = np.ones(p.shape[0])
        for col, value in self.literals:
            out = out * (p[:, col] if value else 1.0 - p[:, col])
        for node in self.negated:
            out = out * (1.0 - node.probability(p))
        return out


class FeatureSpec:
    """Per response type: the propositions it needs, its classes, and the feature order.

    Feature order: the needed propositions in policy order, then `class:<name>` in class order.
    """

    def __init__(self, policy: Policy, response_type: str):
        self.policy = policy
        self.response_type = response_type
        self.propositions: tuple[str, ...] = policy.propositions_for(response_type)
        self.classes: tuple[str, ...] = policy.class_names(response_type)
        self.feature_names: tuple[str, ...] = self.propositions + tuple(CLASS_PREFIX + c for c in self.classes)
        self._column = {name: i for i, name in enumerate(self.propositions)}
        self._nodes = [self._compile(policy.classes[response_type][c], {}) for c in self.classes]

    def _compile(self, conj: Conjunction, fixed: Mapping[str, bool]) -> _Node:
        literals: dict[str, bool] = dict(fixed)
        negated_names: list[str] = []
        impossible = False

        def flatten(terms: Conjunction) -> None:
            nonlocal impossible
            for name, value in terms:
                if name in self.policy.derived:
                    if value:
                        flatten(self.policy.derived[name])
                    else:
                        negated_names.append(name)
                elif literals.get(name, value) != value:
                    impossible = True
                else:
                    literals[name] = value

        flatten(conj)
        new = tuple((self._column[n], v) for n, v in literals.items() if n not in fixed)
        negated = tuple(self._compile(self.policy.derived[n], literals) for n in negated_names)
        return _Node(new, negated, impossible)

    # ---- computing ------------------------------------------------------------------------------------
    def matrix(self, probs: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Rows of {proposition: P(yes)} to an [n, propositions] array; a missing needed one is a KeyError."""
        names = self.propositions
        return np.array([[row[name] for name in names] for row in probs], dtype=float).reshape(len(probs), len(names))

    def class_probabilities(self, p: np.ndarray, normalise: bool = True) -> np.ndarray:
        """[n, propositions] -> [n, classes]; rows sum to 1 unless no class has any mass (then all 0)."""
        p = np.asarray(p, dtype=float)
        raw = np.stack([node.probability(p) for node in self._nodes], axis=1)
        if not normalise:
            return raw
        total = raw.sum(axis=1, keepdims=True)
        return np.divide(raw, total, out=np.zeros_like(raw), where=total > 0)

    def features(self, p: np.ndarray) -> np.ndarray:
        """[n, propositions] -> [n, features] in `feature_names` order."""
        p = np.asarray(p, dtype=float)
        return np.concatenate([p, self.class_probabilities(p)], axis=1)

    def feature_dicts(self, probs: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
        x = self.features(self.matrix(probs))
        return [dict(zip(self.feature_names, map(float, row), strict=True)) for row in x]


class FeatureBuilder:
    """Caches one `FeatureSpec` per response type of a policy."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.specs = {rt: FeatureSpec(policy, rt) for rt in policy.classes}

    def __getitem__(self, response_type: str) -> FeatureSpec:
        return self.specs[response_type]


def derive_class(spec: FeatureSpec, labels: Mapping[str, bool]) -> tuple[str | None, int]:
    """The class human 0/1 labels put a completion in, and how many classes matched (1 when consistent)."""
    raw = spec.class_probabilities(spec.matrix([{k: float(bool(v)) for k, v in labels.items()}]), normalise=False)
    hits = np.flatnonzero(raw[0] > 0.5)
    return (spec.classes[hits[0]] if len(hits) == 1 else None), len(hits)
