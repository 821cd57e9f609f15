"""TRL adapter: a reward function for `GRPOTrainer(reward_funcs=[...])`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from rbr_client._wire import RewardResult, RewardServiceError, _score_items
from rbr_client.client import AsyncRewardClient, RewardClient, _PerLoop, _PerProcess

log = logging.getLogger("rbr.client")



def _trl_items(prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any],
               response_type_key: str | None, rm_score_key: str | None) -> list[dict[str, Any]]:
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{len(completions)} completions for {n} prompts")
    if response_type_key is None:
        types: Sequence[Any] = [None] * n
    elif response_type_key in kwargs:
        types = kwargs[response_type_key]
    else:
        raise ValueError(f"no dataset column {response_type_key!r} reached the reward function: add it to the "
                         "dataset, or pass response_type_key=None to score with the RM alone")
    rms: Sequence[Any] = kwargs[rm_score_key] if rm_score_key is not None else [None] * n
    return _score_items(prompts, completions, types, rms)


def _batch_metrics(results: Sequence[RewardResult]) -> dict[str, float]:
    """Batch means: rbr/rm parts, graded and cached fractions, and per proposition / class over graded items."""
    if not results:
        return {}
    n = len(results)
    out = {"rbr_reward": sum(r.rbr_reward for r in results) / n, "rm_score": sum(r.rm_score for r in results) / n,
           "graded_frac": sum(1 for r in results if r.response_type) / n,
           "cached_frac": sum(1 for r in results if r.cached) / n}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in results:
        if not r.response_type:
            continue
        named = [(f"prop/{k}", v) for k, v in (r.features or {}).items() if not k.startswith("class:")]
        named += [(f"class/{k}", v) for k, v in (r.classes or {}).items()]
        for key, v in named:
            sums[key] = sums.get(key, 0.0) + float(v)
            counts[key] = counts.get(key, 0) + 1
    out.update({k: sums[k] / counts[k] for k in sorted(sums)})
    return out


def _trl_report(fn: Any, name: str, results: list[RewardResult], kwargs: Mapping[str, Any],
                log_metrics: bool, log_columns: bool) -> list[float]:
    metrics = _batch_metrics(results)
    fn.last_results, fn.last_metrics = results, metrics
    log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
    if log_metrics and callable(log_metric):
        for key, value in metrics.items():
            log_metric(f"{name}/{key}", value)
    if log_columns and callable(log_extra):
        log_extra(f"{name}_rbr", [r.rbr_reward for r in results])
        log_extra(f"{name}_rm", [r.rm_score for r in results])
    return [r.reward for r in results]


def _trl_failed(fn: Any, name: str, n: int, exc: Exception) -> list[float | None]:
    log.error("%s: scoring failed, returning None for %d samples: %s", name, n, exc)
    fn.last_results, fn.last_metrics = [], {}
    return [None] * n


def trl_reward_func(base_url: str | Sequence[str], api_key: str | None = None, *,
                    response_type_key: str | None = "response_type",
                    rm_score_key: str | None = None, name: str = "rbr_reward", log_metrics: bool = True,
                    log_columns: bool = True, on_error: Literal["raise", "none"] = "raise",
                    asynchronous: bool = True, **client_kwargs: Any) -> Callable[..., Any]:
    """A reward function for TRL's `GRPOTrainer(reward_funcs=[...])`: `(prompts, completions, **kwargs)` -> floats.

    Prompts/completions may be text or conversational (prompt: list of messages; completion: list holding the
    assistant message). The response type comes from the dataset column `kwargs[response_type_key]` (None or ""
    for "no rule applies"); the RM score from `kwargs[rm_score_key]` when given, else the server's RM.

    Logging: recent TRL passes `log_metric(name, value)` and `log_extra(column, values)` to reward functions; when
    present, batch means go to `log_metric` as `<name>/rbr_reward`, `<name>/rm_score`, `<name>/graded_frac`,
    `<name>/cached_frac`, `<name>/prop/<proposition>`, `<name>/class/<class>`, and per-sample `<name>_rbr` and
    `<name>_rm` columns to `log_extra`. Without those hooks (older TRL) read `fn.last_metrics` / `fn.last_results`.

    `on_error="none"`: a batch that still fails after retries returns None per sample (TRL turns None into NaN and
    leaves this function out for those samples) instead of raising. `asynchronous=False` gives a plain function
    for TRL versions that do not await coroutine reward functions. `base_url` may name several replicas (a list or
    a comma-separated string): the client spreads over them and fails over. Other keywords configure the client.
    """
    if on_error not in ("raise", "none"):
        raise ValueError("on_error must be 'raise' or 'none'")
    # Keep the event-loop-bound and process-bound clients apart; TRL runs async reward functions on its own loop.
    if asynchronous:
        clients = _PerLoop(lambda: AsyncRewardClient(base_url, api_key, **client_kwargs))

        async def reward_func(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
            items = _trl_items(prompts, completions, kwargs, response_type_key, rm_score_key)
            try:
                results = await clients.get().rewards(items, return_features=log_metrics)
            except RewardServiceError as exc:
                if on_error == "raise":
                    raise
                return _trl_failed(reward_func, name, len(items), exc)
            return _trl_report(reward_func, name, results, kwargs, log_metrics, log_columns)
    else:
        sync_clients = _PerProcess(lambda: RewardClient(base_url, api_key, **client_kwargs))

        def reward_func(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
            items = _trl_items(prompts, completions, kwargs, response_type_key, rm_score_key)
            try:
                results = sync_clients.get().rewards(items, return_features=log_metrics)
            except RewardServiceError as exc:
                if on_error == "raise":
                    raise
                return _trl_failed(reward_func, name, len(items), exc)
            return _trl_report(reward_func, name, results, kwargs, log_metrics, log_columns)

    reward_func.__name__ = reward_func.__qualname__ = name
    reward_func.last_results, reward_func.last_metrics = [], {}
    return reward_func
