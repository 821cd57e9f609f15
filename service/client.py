"""The Python client moved to the `rbr_client` package, which installs alone into a trainer's environment.

This module keeps `from service.client import ...` working; new code imports `rbr_client`.
"""

from __future__ import annotations

from rbr_client import (
    AsyncRewardClient,
    GetRewardResult,
    Item,
    RewardClient,
    RewardResult,
    RewardServiceError,
    backoff_delay,
    parse_retry_after,
    trl_reward_func,
    verl_compute_score,
    verl_compute_score_batch,
)

__all__ = [
    "AsyncRewardClient",
    "GetRewardResult",
    "Item",
    "RewardClient",
    "RewardResult",
    "RewardServiceError",
    "backoff_delay",
    "parse_retry_after",
    "trl_reward_func",
    "verl_compute_score",
    "verl_compute_score_batch",
]
