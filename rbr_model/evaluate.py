"""Grader accuracy against human labels: grade every labelled (row, proposition) and score P(yes).

Gold rows and label maps come from `rbr_model.gold`, the metrics from `rbr_model.metrics`; the report this
builds is written and drawn by `rbr_model.eval_output`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rbr_model.aio import gather_or_cancel
from rbr_model.gold import default_label_map, load_gold, resolve_label_map
from rbr_model.grading.engine import GradingError
from rbr_model.metrics import binary_metrics, mean_finite, reliability_curve

# default_label_map and load_gold: benchmarks/policy_second_opinion.py still reads the gold set through here.
__all__ = ["default_label_map", "evaluate_grader", "load_gold", "resolve_label_map"]


async def evaluate_grader(
    grader: Any,
    rows: Sequence[Mapping[str, Any]],
    label_map: Mapping[str, str] | None = None,
    propositions: Sequence[str] | None = None,
    *,
    concurrency: int = 64,
    progress: bool | Callable[[int, int], None] = False,
) -> dict[str, Any]:
    """Grade every (row, mapped proposition) that has a label and compare P(yes) with the labels.

    `rows` come from `load_gold`. Judgments run `concurrency` at a time in row order, so one row's prompts
    share their conversation prefix in vLLM's cache. A judgment the engine refuses for good (a prompt longer
    than the context) is counted in `failed` and left out; an error that may pass (engine down) aborts.
    Metrics use the grader's calibration when it has one; the raw P(yes) is kept beside it for calibrating.
    """
    mapping = resolve_label_map(grader.policy, rows, label_map, propositions)
    jobs = [(i, name) for i, row in enumerate(rows) for name, label in mapping.items() if label in row["labels"]]
    raw: dict[tuple[int, str], Any] = {}
    failures: list[str] = []
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="grading", unit="judgment", smoothing=0.05)
    done = 0
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        nonlocal done
        while True:
            try:
                i, name = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            row = rows[i]
            try:
                (judged,) = await grader.grade_judgments([(row["prompt"], row["completion"], [name])])
                raw[(i, name)] = judged[name]
            except GradingError as exc:
                if exc.retryable:
                    raise
                failures.append(f"row {i} / {name}: {exc}")
            done += 1
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, len(jobs))

    start = time.perf_counter()
    try:
        await gather_or_cancel(worker() for _ in range(max(1, min(concurrency, len(jobs) or 1))))
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start

    cal = getattr(grader, "calibration", None)
    per_prop: dict[str, dict[str, Any]] = {}
    predictions: dict[str, dict[str, list]] = {}
    for name, label in mapping.items():
        idx = [i for i in range(len(rows)) if (i, name) in raw]
        p_raw = [raw[(i, name)].p_yes for i in idx]
        p = [cal.apply(name, v) for v in p_raw] if cal is not None else list(p_raw)
        y = [rows[i]["labels"][label] for i in idx]
        mass = [raw[(i, name)].yes_no_mass for i in idx]
        stats = binary_metrics(p, y)
        stats["label"] = label
        stats["mean_yes_no_mass"] = float(np.mean(mass)) if mass else None
        per_prop[name] = stats
        predictions[name] = {"row": idx, "p_raw": p_raw, "p": p, "y": y}

    all_p = [v for pr in predictions.values() for v in pr["p"]]
    all_y = [v for pr in predictions.values() for v in pr["y"]]
    n_judged = len(raw)
    tokens = [j.prompt_tokens for j in raw.values() if j.prompt_tokens is not None]
    cached = [j.cached_tokens for j in raw.values() if j.cached_tokens is not None]
    policy = grader.policy
    return {
        "grader": {
            "model_id": grader.engine.model_id,
            "fingerprint": grader.fingerprint,
            "calibration": getattr(cal, "fingerprint", None) if cal is not None else None,
        },
        "policy": {"name": policy.name, "fingerprint": policy.fingerprint, "source": policy.source},
        "rows": len(rows),
        "label_map": dict(mapping),
        "judgments": n_judged,
        "failed": len(failures),
        "failures": failures[:20],
        "wall_s": wall,
        "judgments_per_s": n_judged / wall if wall > 0 else None,
        "prompt_tokens": int(sum(tokens)) if tokens else None,
        "cached_prompt_tokens": int(sum(cached)) if cached else None,
        "propositions": per_prop,
        "overall": {
            "mean_auc": mean_finite(s["auc"] for s in per_prop.values()),
            "mean_balanced_accuracy": mean_finite(s["balanced_accuracy"] for s in per_prop.values()),
            "mean_f1": mean_finite(s["f1"] for s in per_prop.values()),
            "mean_accuracy": mean_finite(s["accuracy"] for s in per_prop.values()),
            "pooled": binary_metrics(all_p, all_y),
            "reliability": reliability_curve(all_p, all_y),
        },
        "predictions": predictions,
    }
