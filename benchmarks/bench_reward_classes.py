"""Why is `ideal` rarely the most likely class? Measured on the out-of-fold probabilities of `rbr eval reward`.

Reads an `rbr eval reward --cv` output folder (reward_rows.jsonl: per gold row its out-of-fold P(yes), human class
and labels) and the gold file, and prints per response type:

  1. calibration in the large: per proposition, the mean P(yes) against the share of rows labelled yes;
  2. the product: on rows whose human class is the best one present, the mean P of that class and of each of its
     factors;
  3. top-1 class agreement when the class probabilities are computed
     - as served (the product of independent propositions, the paper's definition),
     - from the probabilities thresholded at 0.5 (hard logic),
     - from the oracle (human labels; 1.0 by construction);
  4. top-1 when one proposition at a time takes its human label (which head limits the classes).

    python benchmarks/bench_reward_classes.py out/reward-cv-before \
        --gold ../shared/reference/openai-rbr/gold_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="an `rbr eval reward` output folder")
    ap.add_argument("--gold", type=Path, required=True)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)

    from rbr_model.features import FeatureBuilder
    from rbr_model.gold import load_gold, load_label_map
    from rbr_model.policy import load_policy
    from rbr_model.reward_eval import human_rows

    policy = load_policy()
    builder = FeatureBuilder(policy)
    recs = [json.loads(line) for line in (args.run / "reward_rows.jsonl").read_text().splitlines()]
    gold = load_gold(args.gold)
    humans = {r.index: r for r in human_rows(policy, gold, load_label_map()).rows}
    out: dict = {}
    for rt in policy.classes:
        spec = builder[rt]
        sub = [r for r in recs if r["response_type"] == rt]
        if not sub:
            continue
        p = np.array([[r["probabilities"][n] for n in spec.propositions] for r in sub])
        y = np.array([[humans[r["row"]].labels[n] for n in spec.propositions] for r in sub], dtype=float)
        rank = np.array([humans[r["row"]].human_rank for r in sub])
        best = int(rank.min())
        print(f"\n== {rt}: {len(sub)} rows; best class present: {spec.classes[best]} ({int(np.sum(rank == best))})")
        print(f"{'proposition':<30} {'mean P':>7} {'share yes':>9}")
        calib = {}
        for j, name in enumerate(spec.propositions):
            assumed = all(name in humans[r["row"]].assumed for r in sub)
            calib[name] = {"mean_p": float(p[:, j].mean()), "share_yes": None if assumed else float(y[:, j].mean())}
            share = "unlabelled" if assumed else f"{y[:, j].mean():.3f}"
            print(f"{name:<30} {p[:, j].mean():>7.3f} {share:>9}")
        variants = {"product (served)": spec.class_probabilities(p),
                    "threshold 0.5": spec.class_probabilities((p >= 0.5).astype(float)),
                    "oracle": spec.class_probabilities(y)}
        tops = {}
        for name, cp in variants.items():
            top = cp.argmax(axis=1)
            tops[name] = {"top1": float(np.mean(top == rank)),
                          "predicted": {c: int(np.sum(top == k)) for k, c in enumerate(spec.classes)},
                          "mean_p_best_on_best_rows": float(cp[rank == best, best].mean())}
            print(f"top-1 {name:<18} {tops[name]['top1']:.3f}  mean P({spec.classes[best]}) on its rows "
                  f"{tops[name]['mean_p_best_on_best_rows']:.3f}  predicted {tops[name]['predicted']}")
        swaps = {}
        for j, name in enumerate(spec.propositions):  # one proposition replaced by its human label
            q = p.copy()
            q[:, j] = y[:, j]
            swaps[name] = float(np.mean(spec.class_probabilities(q).argmax(axis=1) == rank))
        best_swap = max(swaps, key=swaps.get)
        print(f"top-1 with one proposition's human label: best {best_swap} {swaps[best_swap]:.3f}; "
              + ", ".join(f"{n} {v:.3f}" for n, v in swaps.items() if n != best_swap))
        out[rt] = {"oracle_one": swaps, "calibration": calib, "top1": tops, "human_counts": {c: int(np.sum(rank == k))
                                                                         for k, c in enumerate(spec.classes)}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
