"""The linear RBR reward and its weights file.

`rbr = w[response_type] · features`, `total = rm_score + rbr`. A weights file is tied to one policy by its
fingerprint: weights fitted for other propositions would silently score the wrong features.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.features import FeatureBuilder
from rbr_model.files import read_json
from rbr_model.policy import Policy

FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights file is unreadable, malformed, or does not belong to the loaded policy."""


@dataclass
class Weights:
    policy_fingerprint: str
    grader_id: str
    weights: dict[str, dict[str, float]]  # response type -> feature -> weight
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    note: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def version(self) -> str:
        """A short id of the weight values, reported with every reward."""
        import hashlib

        blob = json.dumps(self.weights, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> Weights:
        if not isinstance(data, dict):
            raise WeightsError(f"{source}: expected a JSON object")
        for key in ("policy_fingerprint", "weights"):
            if key not in data:
                raise WeightsError(f"{source}: missing key {key!r}")
        weights = data["weights"]
        if not isinstance(weights, dict):
            raise WeightsError(f"{source}: weights: expected {{response_type: {{feature: weight}}}}")
        clean: dict[str, dict[str, float]] = {}
        for rt, table in weights.items():
            if not isinstance(table, dict):
                raise WeightsError(f"{source}: weights.{rt}: expected {{feature: weight}}")
            clean[rt] = {}
            for feat, w in table.items():
                if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w):
                    raise WeightsError(f"{source}: weights.{rt}.{feat}: expected a finite number, got {w!r}")
                clean[rt][feat] = float(w)
        return cls(
            policy_fingerprint=str(data["policy_fingerprint"]),
            grader_id=str(data.get("grader_id", "")),
            weights=clean,
            metrics=dict(data.get("metrics") or {}),
            created_at=str(data.get("created_at", "")),
            note=str(data.get("note", "")),
            format_version=int(data.get("format_version", FORMAT_VERSION)),
        )

    @classmethod
    def load(cls, path: str | Path) -> Weights:
        path = Path(path)
        data = read_json(path, WeightsError)
        return cls.from_dict(data, source=str(path))


def default_weights_path(embedded_rm: bool = False) -> Path:
    """The packaged weights. The total `rm_score + w · features` must rank, so weights belong to the RM under them:
    `embedded_rm` gives those fitted on top of the embedded helpful-only RM's scores, else those fitted with
    rm_score 0 (an RBR that ranks alone)."""
    name = "default_weights_embedded_rm.json" if embedded_rm else "default_weights.json"
    return Path(str(resources.files("rbr_model") / "policies" / name))


class RewardModel:
    """A policy and its weights, checked against each other; scores feature vectors."""

    def __init__(self, policy: Policy, weights: Weights):
        if weights.policy_fingerprint != policy.fingerprint:
            raise WeightsError(
                f"weights were fitted for policy fingerprint {weights.policy_fingerprint[:12]}, but the loaded "
                f"policy {policy.name!r} has fingerprint {policy.fingerprint[:12]}; refit them (`rbr fit`) or load "
                "the policy they belong to"
            )
        self.policy, self.weights = policy, weights
        self.features = FeatureBuilder(policy)
        self._vectors: dict[str, np.ndarray] = {}
        for rt, spec in self.features.specs.items():
            table = weights.weights.get(rt, {})
            unknown = set(table) - set(spec.feature_names)
            if unknown:
                raise WeightsError(f"weights.{rt}: features not in the policy: {sorted(unknown)}")
            self._vectors[rt] = np.array([table.get(f, 0.0) for f in spec.feature_names])

    def weight_vector(self, response_type: str) -> np.ndarray:
        return self._vectors[response_type]

    def rbr(self, response_type: str, features: np.ndarray) -> np.ndarray:
        """[n, features] (in the spec's order) -> [n] RBR rewards."""
        return np.asarray(features, dtype=float) @ self._vectors[response_type]

    def rbr_from_dict(self, response_type: str, features: Mapping[str, float]) -> float:
        spec = self.features[response_type]
        return float(np.dot([features[f] for f in spec.feature_names], self._vectors[response_type]))

    @staticmethod
    def total(rm_score: float, rbr: float) -> float:
        return float(rm_score) + float(rbr)
