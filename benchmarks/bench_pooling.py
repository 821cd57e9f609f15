"""Does another pooling of the trunk's states rank the gold labels better than the mean over the completion?

The heads read the mean of the trunk's per-token states over the completion. One sentence ("I can't help with
that") inside a long reply moves that mean little, which is what limits `states_inability` on hard_refuse's long
gold replies (docs/reward-accuracy.md). This extracts the per-token states of every row once, builds several
poolings from them and scores each the way `rbr eval grader --method heads --cv` does: nested CV on the gold
rows (scaler and C chosen inside each training fold), the weak rows joining every training fold. Reported per
proposition: out-of-fold AUC on all gold rows and within each response type. `--weak-oof PROPOSITION` also scores
the weak rows of that proposition, folded by prompt as `rbr eval reward --cv` folds them (heads fitted on the
gold rows and the other folds' weak rows), per kind of row.

    python benchmarks/bench_pooling.py --gold ../shared/reference/openai-rbr/gold_train.jsonl \
        --extra rbr_model/data/weak_disallowed_rows.jsonl --extra rbr_model/data/weak_style_rows.jsonl \
        --extra rbr_model/data/weak_inability_rows.jsonl --out out/bench-pooling
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _poolings() -> dict:
    """The heads' own poolings (`rbr_model.heads.inputs.pool_span`) beside two candidates they do not offer."""
    from rbr_model.heads.inputs import MEAN, MEAN_AND_MAX, pool_span

    return {
        "mean": lambda st: pool_span(st, MEAN),
        "max": lambda st: st.max(axis=0),
        "mean+max": lambda st: pool_span(st, MEAN_AND_MAX),
        "mean+last": lambda st: np.concatenate([st.mean(axis=0), st[-1]]),
    }


async def _states(trunk: Path, inputs: list, batch: int) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    from rbr_model.stack import StackSettings, build_state_engine

    poolings = _poolings()
    out = {name: [] for name in poolings}
    async with build_state_engine(StackSettings(max_model_len=4096), trunk) as engine:
        with tqdm(total=len(inputs), desc="hidden states", unit="row") as bar:
            for start in range(0, len(inputs), batch):
                chunk = inputs[start:start + batch]
                for inp, st in zip(chunk, await engine.token_states(chunk), strict=True):
                    span = st[inp.start:inp.end].astype(np.float64)
                    for name, pool in poolings.items():
                        out[name].append(pool(span))
                bar.update(len(chunk))
    return {name: np.array(v) for name, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gold", type=Path, required=True, help="human-labelled rows (scored)")
    ap.add_argument("--extra", type=Path, action="append", default=[], help="rows that join every training fold")
    ap.add_argument("--map", type=Path, default=ROOT / "rbr_model" / "data" / "heads_label_map.yaml")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("out/bench-pooling"))
    ap.add_argument("--only", default="", help="comma-separated propositions (default: all mapped)")
    ap.add_argument("--weak-oof", default="", help="a proposition whose weak rows are scored out of fold, per kind")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from rbr_model.cli.heads_cmd import load_labelled, resolve_trunk
    from rbr_model.gold import load_gold
    from rbr_model.heads.fitting import DEFAULT_CS, Task, build_inputs, cross_validate, pooled_features, tasks_from_rows
    from rbr_model.metrics import roc_auc

    _, rows, mapping, _ = load_labelled([args.gold, *args.extra], None, args.map)
    n_gold = len(load_gold(args.gold))
    gold, extra = rows[:n_gold], rows[n_gold:]
    trunk = resolve_trunk(None, args.layer)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"states-layer{args.layer}-{len(gold)}+{len(extra)}.npz"
    if cache.is_file():
        pooled = dict(np.load(cache))
    else:
        inputs = build_inputs(AutoTokenizer.from_pretrained(str(trunk)), rows, 4096)
        start = time.perf_counter()
        pooled = asyncio.run(_states(trunk, inputs, 16))
        print(f"states for {len(rows)} rows in {time.perf_counter() - start:.0f} s")
        np.savez(cache, **pooled)

    tasks, _ = tasks_from_rows(gold, mapping)
    more = {t.name: Task(t.name, t.label, t.rows + len(gold), t.y)
            for t in tasks_from_rows(extra, mapping, min_per_class=0)[0]}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    types = sorted({r["response_type"] for r in gold})
    report: dict = {}
    for task in tasks:
        if only and task.name not in only:
            continue
        report[task.name] = {}
        for name, X in pooled.items():
            p = cross_validate(pooled_features(X), task, Cs=DEFAULT_CS, folds=5, seed=0, extra=more.get(task.name))
            entry = {"all": roc_auc(p, task.y)}
            for rt in types:
                sel = np.array([gold[i]["response_type"] == rt for i in task.rows])
                y = task.y[sel]
                entry[rt] = roc_auc(p[sel], y) if 0 < y.sum() < len(y) else None
            report[task.name][name] = entry
        line = "  ".join(f"{n} {report[task.name][n]['all']:.3f}" for n in pooled)
        print(f"{task.name:<30} {line}", flush=True)
    (args.out / "pooling.json").write_text(json.dumps(report, indent=1))

    if args.weak_oof:
        _weak_oof(args.weak_oof, pooled, gold, extra, mapping, [*args.extra])
        return
    names = list(pooled)
    print("\n| proposition | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for prop, per in report.items():
        cells = []
        for n in names:
            within = "/".join(f"{per[n][rt]:.2f}" if per[n][rt] is not None else "-" for rt in types)
            cells.append(f"{per[n]['all']:.3f} ({within})")
        print(f"| {prop} | " + " | ".join(cells) + " |")
    means = {n: float(np.mean([per[n]["all"] for per in report.values()])) for n in names}
    print("| **mean** | " + " | ".join(f"{means[n]:.3f}" for n in names) + " |")
    print(f"(within-type AUCs in brackets: {'/'.join(types)})")


def _weak_oof(prop: str, pooled: dict, gold: list, extra: list, mapping: dict, paths: list) -> None:
    """Out-of-fold AUC of one proposition's head on its weak rows, per kind, for every pooling."""
    from rbr_model.heads.fitting import DEFAULT_CS, Task, fit_logreg, pooled_features, tasks_from_rows
    from rbr_model.metrics import roc_auc
    from rbr_model.reward_eval import extra_fold

    raw = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    gold_task = next(t for t in tasks_from_rows(gold, mapping)[0] if t.name == prop)
    weak_task = next(t for t in tasks_from_rows(extra, mapping, min_per_class=0)[0] if t.name == prop)
    fold = np.array([extra_fold(raw[i], 5, 0) for i in weak_task.rows])
    kinds = np.array([raw[i].get("kind", "?") for i in weak_task.rows])
    for name, X in pooled.items():
        p = np.empty(len(weak_task.y))
        for k in range(5):
            tr, te = fold != k, fold == k
            train = Task(prop, weak_task.label, np.concatenate([gold_task.rows, weak_task.rows[tr] + len(gold)]),
                         np.concatenate([gold_task.y, weak_task.y[tr]]))
            X_tr, X_te = pooled_features(X)(train.rows, weak_task.rows[te] + len(gold))
            model, _ = fit_logreg(X_tr, train.y, DEFAULT_CS, 5, 1)
            p[te] = model.predict_proba(X_te)[:, 1]
        parts = [f"all {roc_auc(p, weak_task.y):.3f}"]
        for kind in sorted(set(kinds)):
            sel = kinds == kind
            share = float(np.mean(p[sel] > 0.5))
            parts.append(f"{kind} P>0.5 {share:.2f}")
        print(f"{prop} weak rows, {name}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
