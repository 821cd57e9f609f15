"""veRL adapters: `custom_reward_function` callables, one sample or one batch a call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rbr_client._wire import Item, _item_payload, _opt_float, _opt_label
from rbr_client.client import _ClientFactory, _PerProcess


class _VerlScorer:
    """Shared state of the veRL adapters: a per-process client and the policy's class order (fetched once)."""

    def __init__(self, base_url: str | Sequence[str], api_key: str | None, prompt_key: str, response_type_key: str,
                 rm_score_key: str | None, include_classes: bool, client_kwargs: dict[str, Any]):
        self.prompt_key, self.response_type_key, self.rm_score_key = prompt_key, response_type_key, rm_score_key
        self.include_classes = include_classes
        self._clients = _PerProcess(_ClientFactory(base_url, api_key, client_kwargs))
        self._class_order: list[str] | None = None
        self.__name__ = "compute_score"

    def _item(self, solution_str: str, extra_info: Mapping[str, Any] | None) -> dict[str, Any]:
        info = extra_info if isinstance(extra_info, Mapping) else {}
        if self.prompt_key not in info or info[self.prompt_key] is None:
            raise ValueError(f"extra_info[{self.prompt_key!r}] is missing: store each row's prompt (text or chat "
                             "messages) there when you build the veRL dataset")
        rm = info.get(self.rm_score_key) if self.rm_score_key else None
        return _item_payload(Item(info[self.prompt_key], solution_str, _opt_label(info.get(self.response_type_key)),
                                  _opt_float(rm)))

    def _score(self, items: list[dict[str, Any]]) -> list[dict[str, float]]:
        client = self._clients.get()
        if self.include_classes and self._class_order is None:
            self._class_order = list(client.policy().get("class_order") or [])
        results = client.rewards(items, return_features=self.include_classes)
        out = []
        for r in results:
            row = {"score": r.reward, "rbr_reward": r.rbr_reward, "rm_score": r.rm_score,
                   "graded": 1.0 if r.response_type else 0.0}
            # veRL gathers every key into per-sample lists, so every row carries the same keys.
            for c in self._class_order or []:
                row[f"class_{c}"] = float((r.classes or {}).get(c, 0.0))
            out.append(row)
        return out


class _VerlSingle(_VerlScorer):
    def __call__(self, data_source: Any, solution_str: str, ground_truth: Any = None,
                 extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, float]:
        return self._score([self._item(solution_str, extra_info)])[0]


class _VerlBatch(_VerlScorer):
    def __call__(self, data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Any = None,
                 extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
                 **kwargs: Any) -> list[dict[str, float]]:
        infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        if len(infos) != len(solution_strs):
            raise ValueError(f"{len(infos)} extra_infos for {len(solution_strs)} solutions")
        return self._score([self._item(s, e) for s, e in zip(solution_strs, infos, strict=True)])


def verl_compute_score(base_url: str | Sequence[str], api_key: str | None = None, *, prompt_key: str = "prompt",
                       response_type_key: str = "response_type", rm_score_key: str | None = "rm_score",
                       include_classes: bool = True, **client_kwargs: Any) -> Callable[..., dict[str, float]]:
    """veRL custom reward function: `compute_score(data_source, solution_str, ground_truth, extra_info=None)`.

    Reads from `extra_info`: `"prompt"` (required; text or a list of chat messages), `"response_type"` (None or ""
    for "no rule applies") and optionally `"rm_score"` (else the server's RM). `data_source` and `ground_truth` are
    not used. Returns `{"score": total, "rbr_reward", "rm_score", "graded", "class_<name>" for every class in the
    policy's class order}`, the same keys for every sample. One request per call (veRL's naive manager); use
    `verl_compute_score_batch` with `reward_manager=batch` to send a whole batch at once. The callable pickles
    without its HTTP connection, so Ray can ship it. `base_url` may name several replicas (a list or a
    comma-separated string), spread over and failed over as `RewardClient` does. Other keywords configure the
    `RewardClient`.
    """
    return _VerlSingle(base_url, api_key, prompt_key, response_type_key, rm_score_key, include_classes, client_kwargs)


def verl_compute_score_batch(base_url: str | Sequence[str], api_key: str | None = None, *, prompt_key: str = "prompt",
                             response_type_key: str = "response_type", rm_score_key: str | None = "rm_score",
                             include_classes: bool = True, **client_kwargs: Any) -> Callable[..., list[dict]]:
    """Like `verl_compute_score` for veRL's BatchRewardManager:
    `compute_score(data_sources, solution_strs, ground_truths, extra_infos) -> list[dict]`."""
    return _VerlBatch(base_url, api_key, prompt_key, response_type_key, rm_score_key, include_classes, client_kwargs)
