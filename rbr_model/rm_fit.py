"""Fitting a reward model's score head on preference pairs: Bradley-Terry on the model's final hidden state.

Why a head only: a `*ForSequenceClassification` reward model is a transformer whose last token's final (normed)
hidden state goes through one linear `score` row. Keeping the transformer and fitting that row is a logistic
regression on hidden-state differences, minutes on a CPU, and the result is served by vLLM's classify runner like
any reward model (`models.prepare_rm`, `rbr_model.rm`). Pairs are TRL's preference format, one JSON object a line:
`{"prompt": [messages] | "text", "chosen": "...", "rejected": "..."}` (optional `prompt_id`, `kind`).

The states are read exactly as the RM engine renders a pair (`rm.rm_messages`, the chat template, no extra special
tokens, the last token), in float32: by vLLM's pooling runner (fast) or a transformers forward (`FinalStates`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbr_model.files import read_jsonl
from rbr_model.rm import rm_messages

Messages = tuple[Mapping[str, str], ...]


class RMFitError(ValueError):
    """Bad pairs (naming file and line), or too few to fit."""


@dataclass(frozen=True)
class Pair:
    messages: Messages
    chosen: str
    rejected: str
    prompt_id: str
    kind: str = ""


def _text(value: Any, where: str, field: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping):  # [assistant message]
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise RMFitError(f"{where}: {field}: expected a non-empty string (or [{{'role', 'content'}}])")
    return value


def load_pairs(path: str | Path) -> list[Pair]:
    """Pairs from JSONL; a prompt without `prompt_id` is its own group (for the cross-validation folds)."""
    pairs = []
    for where, obj in read_jsonl(path, RMFitError):
        if not isinstance(obj, Mapping):
            raise RMFitError(f"{where}: expected a JSON object with prompt, chosen, rejected")
        prompt = obj.get("prompt")
        if isinstance(prompt, str) and prompt.strip():
            messages: Messages = ({"role": "user", "content": prompt},)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            messages = tuple({"role": m["role"], "content": m["content"]} for m in prompt)
        else:
            raise RMFitError(f"{where}: prompt: expected text or a list of {{'role', 'content'}} messages")
        chosen, rejected = _text(obj.get("chosen"), where, "chosen"), _text(obj.get("rejected"), where, "rejected")
        pid = obj.get("prompt_id")
        pid = str(pid) if pid not in (None, "") else hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:12]
        pairs.append(Pair(messages, chosen, rejected, pid, str(obj.get("kind") or "")))
    if not pairs:
        raise RMFitError(f"{path}: no pairs")
    return pairs


def unique_items(pairs: Sequence[Pair]) -> tuple[list[tuple[Messages, str]], list[tuple[int, int]]]:
    """The distinct (conversation, completion) items and, per pair, the (chosen, rejected) item indices."""
    index: dict[tuple[str, str], int] = {}
    items: list[tuple[Messages, str]] = []
    refs = []

    def ref(messages: Messages, completion: str) -> int:
        key = (json.dumps(messages, sort_keys=True), completion)
        if key not in index:
            index[key] = len(items)
            items.append((messages, completion))
        return index[key]

    for p in pairs:
        refs.append((ref(p.messages, p.chosen), ref(p.messages, p.rejected)))
    return items, refs


def rm_token_ids(tokenizer: Any, messages: Messages, completion: str) -> list[int]:
    """Token ids of a pair as `VLLMRMEngine.render` makes them: the chat template, no extra special tokens."""
    text = tokenizer.apply_chat_template(rm_messages(messages, completion), tokenize=False, add_generation_prompt=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


class FinalStates:
    """The last token's final hidden state of a causal LM (what a `*ForSequenceClassification` head reads)."""

    def __init__(self, model_dir: str | Path, max_len: int = 1024, batch_size: int = 8) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.max_len, self.batch_size = max_len, batch_size
        self.hidden_size = int(self.model.config.hidden_size)

    def ids(self, messages: Messages, completion: str) -> list[int]:
        return rm_token_ids(self.tokenizer, messages, completion)[-self.max_len:]

    def __call__(self, items: Sequence[tuple[Messages, str]], progress: Callable[[int], None] | None = None) -> Any:
        import numpy as np
        import torch

        encoded = [self.ids(m, c) for m, c in items]
        out = np.zeros((len(items), self.hidden_size), dtype=np.float32)
        order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths together: little padding
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: causal attention never sees it
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, :len(encoded[i])] = 1
            with torch.no_grad():
                states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for row, i in enumerate(batch):
                out[i] = states[row, len(encoded[i]) - 1].float().numpy()
            if progress is not None:
                progress(len(batch))
        return out


def vllm_final_states(model_dir: str | Path, items: Sequence[tuple[Messages, str]], max_len: int = 2048,
                      chunk: int = 64, progress: Callable[[int], None] | None = None,
                      dtype: str | None = None) -> Any:
    """`FinalStates` through vLLM's pooling runner (the heads' state engine on the whole model), ~10x faster on
    this CPU than the transformers forward. `dtype` None: the RM engine's own (`default_dtype`: bfloat16 on a CPU
    with native bfloat16), so the head is fitted on the states it will be served with; in float32 these are
    `FinalStates`' states within float32 reordering."""
    import numpy as np

    from rbr_model.grading.states import VLLMStateEngine
    from rbr_model.grading.vllm_engine import default_dtype
    from rbr_model.heads.inputs import HeadInput

    async def run() -> Any:
        engine = await asyncio.to_thread(VLLMStateEngine, model_dir, max_model_len=max_len,
                                         dtype=dtype or default_dtype())
        try:
            out = np.zeros((len(items), engine.hidden_size), dtype=np.float32)
            for start in range(0, len(items), chunk):
                part = [rm_token_ids(engine.tokenizer, m, c)[-max_len:] for m, c in items[start:start + chunk]]
                pooled = await engine.pooled([HeadInput(tuple(ids), len(ids) - 1, len(ids)) for ids in part])
                out[start:start + len(part)] = pooled
                if progress is not None:
                    progress(len(part))
            return out
        finally:
            await engine.close()

    return asyncio.run(run())


@dataclass(frozen=True)
class HeadFit:
    weight: Any  # (hidden,) float64: score = weight . state
    C: float
    cv_accuracy: float
    cv_log_loss: float
    train_accuracy: float


def pair_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs scored in the right order; a tie counts half (a head that says nothing scores 0.5)."""
    if not len(chosen):
        return math.nan
    right = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    return right / len(chosen)


def fit_head(states: Any, refs: Sequence[tuple[int, int]], groups: Sequence[str], seed: int = 0,
             Cs: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), folds: int = 5) -> HeadFit:
    """Bradley-Terry: P(chosen > rejected) = sigmoid(w . (s_chosen - s_rejected)), L2-penalised, no intercept.

    Features are standardised (per hidden unit, over the items) so the penalty treats units alike, and the scale is
    folded back into `w`. C is chosen by grouped cross-validation (no prompt in two folds) on log-loss, so score
    differences are calibrated log-odds of preference rather than as large as separable pairs allow.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    refs_a = np.asarray(refs)
    if len(refs_a) < 2 * folds:
        raise RMFitError(f"{len(refs_a)} pairs: too few to fit and cross-validate ({2 * folds} at least)")
    X = np.asarray(states, dtype=np.float64)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    D = (X[refs_a[:, 0]] - X[refs_a[:, 1]]) / scale
    groups_a = np.asarray(groups)
    n_folds = min(folds, len(set(groups)))
    if n_folds < 2:
        raise RMFitError("all pairs share one prompt: cross-validation needs pairs from two prompts at least")

    def model(C: float) -> Any:
        return LogisticRegression(C=C, fit_intercept=False, max_iter=2000)

    def fit(C: float, rows: Any) -> Any:  # both orientations: symmetric, so no intercept is needed
        d = D[rows]
        return model(C).fit(np.vstack([d, -d]), np.r_[np.ones(len(d)), np.zeros(len(d))])

    best = None
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for C in Cs:
        losses, hits = [], []
        for tr, te in splitter.split(D, groups=groups_a):
            margin = D[te] @ fit(C, tr).coef_[0]
            losses.extend(np.logaddexp(0.0, -margin))
            hits.extend(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0)))
        row = (float(np.mean(losses)), C, float(np.mean(hits)))
        if best is None or row[0] < best[0]:
            best = row
    assert best is not None
    loss, C, acc = best
    w = fit(C, np.arange(len(D))).coef_[0]
    margin = D @ w
    return HeadFit(weight=w / scale, C=C, cv_accuracy=acc, cv_log_loss=loss,
                   train_accuracy=float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0)))))


def accuracy_by_kind(pairs: Sequence[Pair], chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    """Pair accuracy overall and per pair kind, with counts."""
    kinds: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        kinds.setdefault(p.kind or "-", []).append(i)
    out: dict[str, Any] = {"all": {"n": len(pairs), "accuracy": pair_accuracy(chosen, rejected)}}
    for kind in sorted(kinds):
        idx = kinds[kind]
        out[kind] = {"n": len(idx), "accuracy": pair_accuracy([chosen[i] for i in idx], [rejected[i] for i in idx])}
    return out


def fit_rm_head(pairs_path: str | Path, model_dir: str | Path, out: str | Path, seed: int = 0,
                progress: Callable[[int], None] | None = None, batch_size: int = 8,
                states_with: str = "vllm", cache: str | Path | None = None) -> dict[str, Any]:
    """Read pairs, compute states with `model_dir` (`states_with` vllm or transformers), fit the head, write it
    (`models.write_rm_head`); the summary. `cache`: an .npz the states are kept in, reused while the model and the
    items are the same (a refit with other settings then costs seconds, not minutes)."""
    import numpy as np

    from rbr_model import models

    pairs = load_pairs(pairs_path)
    items, refs = unique_items(pairs)
    model_hash = models.model_hash(model_dir)
    key = hashlib.sha256(json.dumps([model_hash, states_with, items]).encode()).hexdigest()
    started = time.monotonic()
    states = None
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                states = saved["states"]
    if states is None:
        if states_with == "vllm":
            states = vllm_final_states(model_dir, items, progress=progress)
        else:
            states = FinalStates(model_dir, batch_size=batch_size)(items, progress)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, key=np.array(key), states=states)
    states_s = time.monotonic() - started
    fit = fit_head(states, refs, [p.prompt_id for p in pairs], seed=seed)
    info = {"model": Path(model_dir).name, "model_hash": model_hash,
            "pairs": Path(pairs_path).name, "pairs_sha256": hashlib.sha256(Path(pairs_path).read_bytes()).hexdigest(),
            "n_pairs": len(pairs), "n_items": len(items), "states_with": states_with, "seed": seed, "C": fit.C,
            "cv_accuracy": round(fit.cv_accuracy, 4), "cv_log_loss": round(fit.cv_log_loss, 4),
            "train_accuracy": round(fit.train_accuracy, 4)}
    models.write_rm_head(out, fit.weight, info)
    return {**info, "states_seconds": round(states_s, 1), "out": str(out)}


async def score_pairs(engine: Any, pairs: Sequence[Pair], chunk: int = 64,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score every distinct item of `pairs` with an RM engine (`rbr_model.rm`), `chunk` items a call; pair accuracy
    overall and per kind, the scores, and the wall time per completion (what serving them costs)."""
    items, refs = unique_items(pairs)
    scores: list[float] = []
    started = time.monotonic()
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        scores.extend(await engine.score([[dict(m) for m in msgs] for msgs, _ in part], [c for _, c in part]))
        if progress is not None:
            progress(len(part))
    seconds = time.monotonic() - started
    chosen, rejected = [scores[a] for a, _ in refs], [scores[b] for _, b in refs]
    return {"accuracy": accuracy_by_kind(pairs, chosen, rejected), "items": len(items),
            "seconds": round(seconds, 2), "seconds_per_completion": round(seconds / max(len(items), 1), 4),
            "chosen": chosen, "rejected": rejected}
