"""rbr_model: Rule Based Rewards as a library (policy, features, reward, fitting, grading, evaluation).

Pure: importable without FastAPI or Redis; the service in `service/` builds on it, never the reverse.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562), so that `rbr` and `rbr_model.cli` start without numpy.
_EXPORTS = {
    "FeatureBuilder": "rbr_model.features",
    "FeatureSpec": "rbr_model.features",
    "Policy": "rbr_model.policy",
    "PolicyError": "rbr_model.policy",
    "load_policy": "rbr_model.policy",
    "RewardModel": "rbr_model.reward",
    "Weights": "rbr_model.reward",
    "WeightsError": "rbr_model.reward",
}

__all__ = [
    "FeatureBuilder",
    "FeatureSpec",
    "Policy",
    "PolicyError",
    "RewardModel",
    "Weights",
    "WeightsError",
    "load_policy",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rbr_model' has no attribute {name!r}")
