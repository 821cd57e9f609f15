"""rbr_model: Rule Based Rewards as a library (policy, features, reward, fitting, grading, evaluation).

Pure: importable without FastAPI or Redis; the service in `service/` builds on it, never the reverse.
"""

from rbr_model.features import FeatureBuilder, FeatureSpec
from rbr_model.policy import Policy, PolicyError, load_policy
from rbr_model.reward import RewardModel, Weights, WeightsError

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
