"""The Python client of rbr-serve, and reward-function adapters for TRL and veRL.

Needs only `httpx` and the standard library: no FastAPI, no vLLM, no server modules. It installs alone into a
trainer's environment (`pip install ./rbr_client`, its own distribution `rbr-client`; see README).

Plain use::

    from rbr_client import Item, RewardClient

    with RewardClient("http://rbr:8000", api_key="sk-...") as rbr:
        results = rbr.rewards([Item("How do I pick a lock?", "I can't help with that.", "hard_refuse", rm_score=0.2)])
        print(results[0].reward, results[0].rbr_reward)
        totals = rbr.score(prompts, completions, response_types=types, rm_scores=rm)   # list[float]

`AsyncRewardClient` has the same methods as coroutines and sends the chunks of a large batch concurrently.

Both clients retry 429 (honouring `Retry-After`, capped), 500/502/503/504 and connection or timeout errors, with
exponential backoff and full jitter; any other 4xx raises `RewardServiceError` at once, carrying the server's
error type, message and field. Batches above `chunk_size` items go out as several requests; results come back in
input order.

Several replicas without a load balancer (bare metal, docker compose): give every URL, as a list or one
comma-separated string. Requests take the URLs in turn; a connection error or a 503 moves a request to the next
URL at once, within the same `max_retries`, and the failed URL is skipped for `failover_cooldown` seconds::

    rbr = RewardClient("http://10.0.0.1:8000,http://10.0.0.2:8000")   # the adapters take the same

TRL (GRPOTrainer)::

    from rbr_client import trl_reward_func

    reward = trl_reward_func("http://rbr:8000", api_key="sk-...", response_type_key="response_type")
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=ds)   # ds has a "response_type" column

veRL (`custom_reward_function.path` points at a file holding)::

    from rbr_client import verl_compute_score

    compute_score = verl_compute_score("http://rbr:8000", api_key="sk-...")
    # each row's extra_info carries "prompt" (text or chat messages), "response_type", optionally "rm_score"
"""
from __future__ import annotations

from rbr_client._wire import (
    GetRewardResult,
    Item,
    RewardResult,
    RewardServiceError,
    backoff_delay,
    parse_retry_after,
)
from rbr_client.client import AsyncRewardClient, RewardClient
from rbr_client.trl import trl_reward_func
from rbr_client.verl import verl_compute_score, verl_compute_score_batch

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
