"""Held-out AUC of heads on weakly labelled rows, from an `rbr eval reward --cv` output folder.

`rbr eval reward --cv` folds the extra rows (the weak labels by construction) by prompt and scores each with heads
refitted without its fold (`extra_rows_oof.jsonl`). Per label here: AUC of the head's out-of-fold P(yes) against
the label, overall and per kind of row, with a bootstrap interval over rows, and the share of rows above 0.5.

    python benchmarks/bench_extra_heads_auc.py out/reward-cv --labels insulting_language=insulting \
        --labels speaks_in_third_person=speaks_in_third_person --labels definitive_language=definitive_language
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
    ap.add_argument("run", type=Path)
    ap.add_argument("--labels", action="append", required=True, help="LABEL=PROPOSITION, repeatable")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)

    from rbr_model.metrics import roc_auc

    recs = [json.loads(line) for line in (args.run / "extra_rows_oof.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    print("| proposition (label) | rows | yes | out-of-fold AUC [95% CI] | P > 0.5 on yes / on no |")
    print("|---|---|---|---|---|")
    for spec in args.labels:
        label, _, prop = spec.partition("=")
        sub = [r for r in recs if label in r["labels"] and prop in r["probabilities"]]
        p = np.array([r["probabilities"][prop] for r in sub])
        y = np.array([r["labels"][label] for r in sub], dtype=bool)
        auc = roc_auc(p, y)
        draws = []
        for _ in range(args.bootstrap):
            i = rng.integers(0, len(y), len(y))
            a = roc_auc(p[i], y[i])
            if a is not None:
                draws.append(a)
        lo, hi = np.percentile(draws, [2.5, 97.5])
        print(f"| {prop} ({label}) | {len(y)} | {int(y.sum())} | {auc:.3f} [{lo:.2f}, {hi:.2f}] | "
              f"{np.mean(p[y] > 0.5):.2f} / {np.mean(p[~y] > 0.5):.2f} |")


if __name__ == "__main__":
    main()
