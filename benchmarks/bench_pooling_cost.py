"""What mean-and-max pooling adds to a heads request: pooling one completion's states and applying every head.

The trunk's forward pass is the same for every pooling (the states are computed anyway); what differs is the
pooling in the client and the dot products of heads twice as wide. Timed interleaved on arrays of the trunk's
shape (per-token states of a `--tokens`-token completion, width 576), for the packaged heads' 20 propositions.

    python benchmarks/bench_pooling_cost.py --tokens 300 --repeat 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args(argv)

    from rbr_model.heads import MEAN, MEAN_AND_MAX, POOLINGS, pool_span

    rng = np.random.default_rng(0)
    states = rng.normal(size=(args.tokens, args.width)).astype(np.float32)
    heads = {p: (rng.normal(size=(args.heads, args.width * m)), rng.normal(size=args.width * m),
                 rng.uniform(0.5, 2, size=args.width * m)) for p, m in POOLINGS.items()}
    spent = {MEAN: 0.0, MEAN_AND_MAX: 0.0}
    for _ in range(args.repeat):
        for pooling in (MEAN, MEAN_AND_MAX):  # interleaved, so drift in the machine's load hits both alike
            w, mean, scale = heads[pooling]
            start = time.perf_counter()
            x = pool_span(states, pooling)
            z = ((x - mean) / scale) @ w.T
            spent[pooling] += time.perf_counter() - start
    assert np.all(np.isfinite(z))
    per = {p: 1e6 * s / args.repeat for p, s in spent.items()}
    print(f"{args.tokens} tokens x {args.width}, {args.heads} heads, {args.repeat} repeats, interleaved")
    for p in (MEAN, MEAN_AND_MAX):
        print(f"  {p:<30} {per[p]:8.1f} us per completion")
    print(f"  ratio mean-and-max / mean: {per[MEAN_AND_MAX] / per[MEAN]:.2f}")


if __name__ == "__main__":
    main()
