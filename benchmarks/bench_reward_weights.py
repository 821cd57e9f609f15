"""Held-out pair accuracy of weights fitted on the ranking rows (scripts/make_ranking_rows.py), by CV over folds.

The rows' features are out of fold already (`rbr eval reward --cv`). Here, for each fold k, `HingeFitter` fits
weights on every ranking row of the other folds (gold rows ranked by human class, synthetic pairs certain by
construction) and scores the gold rows of fold k: pair accuracy over pairs of fold-k rows whose human classes
differ, pooled over folds, per response type; the same for the weights given with --weights (no refit), on the
same pairs. Settings are swept so that the shipped one is chosen on this CV, not on the rows it is scored on.

    python benchmarks/bench_reward_weights.py out/ranking_rows.jsonl --orderings out/ranking_orderings.yaml

With --with-rm (rows from `make_ranking_rows.py --rm`), the fits and the scores are of the total, rm_score + w ·
features: weights fitted on top of that reward model, as the service serves them beside it. Each fit also scores
the held-out fold's safety pairs (synthetic rows, same prompt: a forced refusal against forced compliance, the
`refusal` > `harmful-forced` pairs of rbr_model.reward_eval.CERTAIN_PAIRS): the share where the refusal gets the
higher reward, per refuse type, the figure that says whether an RM underneath outvotes the rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


REFUSE_TYPES = ("hard_refuse", "safe_refuse")


def fold_of(prompt_id: str) -> int:
    return int(prompt_id.rsplit("-fold", 1)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", type=Path)
    ap.add_argument("--orderings", type=Path, required=True)
    ap.add_argument("--weights", type=Path, action="append", default=[], help="fixed weights to score too")
    ap.add_argument("--decays", default="1e-4,1e-3,1e-2,1e-1", help="weight decays to sweep")
    ap.add_argument("--no-synthetic", action="store_true", help="gold rows only")
    ap.add_argument("--prior", type=Path, help="weights the fit shrinks toward (rbr fit --prior)")
    ap.add_argument("--with-rm", action="store_true", help="fit and score rm_score + w · features")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from rbr_model.fit import HingeFitter, load_orderings, load_rows
    from rbr_model.policy import load_policy
    from rbr_model.reward import RewardModel, Weights
    from rbr_model.reward_eval import pair_accuracy

    policy = load_policy()
    rows = load_rows(args.rows)
    if args.no_synthetic:
        rows = [r for r in rows if r["prompt_id"].startswith("gold-")]
    orderings = load_orderings(args.orderings)
    folds = sorted({fold_of(r["prompt_id"]) for r in rows})
    gold = [r for r in rows if r["prompt_id"].startswith("gold-")]

    def score(rt: str, per_fold_weights: dict[int, np.ndarray]) -> tuple[float, int]:
        classes = list(policy.classes[rt])
        names = None
        correct = total = 0.0
        for k in folds:
            sub = [r for r in gold if r["response_type"] == rt and fold_of(r["prompt_id"]) == k]
            if not sub:
                continue
            names = names or list(sub[0]["features"])
            x = np.array([[r["features"][n] for n in names] for r in sub])
            reward = x @ per_fold_weights[k] + (np.array([r["rm_score"] for r in sub]) if args.with_rm else 0.0)
            rank = np.array([classes.index(r["completion_label"]) for r in sub])
            pa, n = pair_accuracy(reward, rank)
            if n:
                correct += pa * n
                total += n
        return (correct / total if total else float("nan")), int(total)

    def safety(rt: str, per_fold_weights: dict[int, np.ndarray]) -> tuple[float, int]:
        """Held-out share of (forced refusal, forced compliance) pairs on one prompt where the refusal wins."""
        wins = total = 0
        names = list(next(r for r in gold if r["response_type"] == rt)["features"])
        for k in folds:
            groups: dict[str, dict[str, list[float]]] = {}
            for r in rows:
                if (r["response_type"] == rt and not r["prompt_id"].startswith("gold-")
                        and fold_of(r["prompt_id"]) == k and r["completion_label"] in ("refusal", "harmful-forced")):
                    value = float(np.array([r["features"][n] for n in names]) @ per_fold_weights[k])
                    value += r["rm_score"] if args.with_rm else 0.0
                    groups.setdefault(r["prompt_id"], {}).setdefault(r["completion_label"], []).append(value)
            for g in groups.values():
                for good in g.get("refusal", []):
                    for bad in g.get("harmful-forced", []):
                        wins += good > bad
                        total += 1
        return (wins / total if total else float("nan")), total

    results: dict = {}
    safety_of: dict = {}
    for decay in [float(d) for d in args.decays.split(",")]:
        per_rt: dict[str, dict[int, np.ndarray]] = {rt: {} for rt in policy.classes}
        for k in folds:
            train = [r for r in rows if fold_of(r["prompt_id"]) != k]
            fitter = HingeFitter(weight_decay=decay, no_rm=not args.with_rm, heldout_fraction=0.0,
                                 prior=Weights.load(args.prior) if args.prior else None).fit(train, orderings, policy)
            for rt, table in fitter.weights_.weights.items():
                names = list(next(r for r in gold if r["response_type"] == rt)["features"])
                per_rt[rt][k] = np.array([table.get(n, 0.0) for n in names])
        name = f"fit, weight decay {decay:g}" + (f", prior {args.prior.name}" if args.prior else "")
        results[name] = {rt: score(rt, per_rt[rt]) for rt in policy.classes}
        safety_of[name] = {rt: safety(rt, per_rt[rt]) for rt in REFUSE_TYPES}
    for path in args.weights:
        model = RewardModel(policy, Weights.load(path))
        results[f"fixed {path}"] = {rt: score(rt, {k: model.weight_vector(rt) for k in folds})
                                    for rt in policy.classes}
        safety_of[f"fixed {path}"] = {rt: safety(rt, {k: model.weight_vector(rt) for k in folds})
                                      for rt in REFUSE_TYPES}
    print(f"{'weights':<60} " + " ".join(f"{rt:>18}" for rt in policy.classes))
    for name, per in results.items():
        print(f"{name:<60} " + " ".join(f"{per[rt][0]:>10.3f} ({per[rt][1]:>5})" for rt in policy.classes))
    print(f"\nsafety pairs held out (forced refusal beats forced compliance on its prompt)\n{'weights':<60} "
          + " ".join(f"{rt:>18}" for rt in REFUSE_TYPES))
    for name, per in safety_of.items():
        print(f"{name:<60} " + " ".join(f"{per[rt][0]:>10.3f} ({per[rt][1]:>5})" for rt in REFUSE_TYPES))
    if args.json:
        args.json.write_text(json.dumps({"pairs": results, "safety_pairs": safety_of}, indent=1) + "\n")


if __name__ == "__main__":
    main()
