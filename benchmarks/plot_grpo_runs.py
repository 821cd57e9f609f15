"""Reward curves of several `examples/grpo_trl.py` runs in one figure (say, the real run and its shuffled control).

Plots the served RBR reward (what the service returned, before the control's shuffle) and the mean probability of
the `ideal` and `disallowed_completion` classes per step, smoothed over `--window` steps, and prints the mean of
the first and last `--window` steps of each run.

    PYTHONPATH=. .venv/bin/python benchmarks/plot_grpo_runs.py out/grpo out/grpo-control --out curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SERIES = (("rbr_reward/rbr_reward", "served RBR reward"), ("rbr_reward/class/ideal", "P(ideal)"),
          ("rbr_reward/class/disallowed_completion", "P(disallowed)"))
# --with-rm: runs against a service with a reward model log all three parts of the same response
SERIES_WITH_RM = (("rbr_reward/rm_score", "served rm_score"), ("rbr_reward/rbr_reward", "served RBR reward"),
                  ("rbr_reward/reward", "served total (rm + RBR)"),
                  ("rbr_reward/class/disallowed_completion", "P(disallowed)"))


def load(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]


def smooth(v: np.ndarray, k: int) -> np.ndarray:
    return v if len(v) < k else np.convolve(v, np.ones(k) / k, mode="valid")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders holding steps.jsonl")
    ap.add_argument("--names", default=None, help="comma-separated labels (default: folder names)")
    ap.add_argument("--window", type=int, default=10, help="steps per moving average (default 10)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--with-rm", action="store_true", help="plot rm_score, RBR reward, total and P(disallowed)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = args.names.split(",") if args.names else [r.name for r in args.runs]
    series = SERIES_WITH_RM if args.with_rm else SERIES
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8))
    for j, (run, name) in enumerate(zip(args.runs, names, strict=True)):
        rows = load(run)
        steps = np.array([r["step"] for r in rows])
        parts = []
        for ax, (key, title) in zip(axes, series, strict=True):
            v = np.array([r.get(key, np.nan) for r in rows], dtype=float)
            s = smooth(v, args.window)
            ax.plot(steps, v, color=f"C{j}", alpha=0.15)
            ax.plot(steps[len(steps) - len(s):], s, color=f"C{j}", label=name)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            k = min(args.window, len(v))
            parts.append(f"{title} {np.nanmean(v[:k]):+.3f} -> {np.nanmean(v[-k:]):+.3f}")
        print(f"{name} ({len(rows)} steps; first vs last {args.window} steps): " + "; ".join(parts))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
