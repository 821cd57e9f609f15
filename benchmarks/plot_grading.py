"""Plot `bench_grading.py --json` results: judgments per second, ours against naive, one pair of bars per run.

    python benchmarks/plot_grading.py out/run1.json out/run2.json ... --out docs/img/grading-speedup.png

Each run's ratio comes from its own naive baseline (same machine, same prompts); bars from different runs are
only as comparable as the machine was quiet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def label(fig: dict) -> str:
    data = fig["source"].split(" ")[0].removesuffix(".jsonl")
    k = fig["completions_per_conversation"]
    per = f"{k} completions per prompt" if k > 1 else "1 completion per prompt"
    return f"{data}\n{per}\n{fig['layout']}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="JSON files written by bench_grading.py --json")
    p.add_argument("--out", default="docs/img/grading-speedup.png", help="PNG to write")
    p.add_argument("--title", default="Grading throughput, batched + prefix cache vs one at a time")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    for run in args.runs:
        try:
            figs.append(json.loads(Path(run).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{run}: not a bench_grading.py --json file: {exc}") from None
    missing = [r for r, f in zip(args.runs, figs, strict=True) if "naive_jps" not in f]
    if missing:
        raise SystemExit(f"no naive baseline in {', '.join(missing)} (run without --skip-naive)")
    x = range(len(figs))
    fig, ax = plt.subplots(figsize=(2.2 * len(figs) + 2, 4.5))
    ax.bar([i - 0.2 for i in x], [f["naive_jps"] for f in figs], 0.4, label="naive: one prompt at a time, no cache",
           color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], [f["ours_jps"] for f in figs], 0.4, label="ours: Grader, batched, prefix cache",
           color="#3a7bd5")
    for i, f in zip(x, figs, strict=True):
        ax.annotate(f"{f['speedup']:.2f}x", (i + 0.2, f["ours_jps"]), ha="center", va="bottom", fontsize=10)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(list(x), [label(f) for f in figs], fontsize=8)
    ax.set_ylabel("judgments per second")
    ax.set_title(f"{args.title}\n{figs[0]['model']} ({figs[0]['dtype']}), {figs[0].get('machine', '')}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
