"""Benchmark: wall time of whole `rbr` processes (`--help`, `fit --help`, a real `rbr fit`), old tree vs new.

Start-up is most of a short command's time, so this times the whole process, as a user waits for it. Each
`--root` is a checkout whose `rbr_model` goes first on the path (for example a `git worktree` of an older commit
beside the current one); runs alternate between the roots, so both see the same machine load, and the median of
`--repeats` runs is reported with the ratio.

The `rbr fit` data: a synth run's rows (`--rows`) repeated under new prompt ids up to `--examples` rows, fitted
with the packaged orderings.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cli_startup.py --root /tmp/old-tree --root . \\
        --rows out/synth-heads/rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORDERINGS = Path(__file__).resolve().parents[1] / "rbr_model" / "data" / "orderings.yaml"
RUNNER = "import sys; from rbr_model.cli import app; sys.argv[0] = 'rbr'; app()"


def replicate(rows_path: Path, examples: int, out: Path) -> int:
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    n = 0
    with out.open("w") as f:
        copy = 0
        while n < examples:
            for row in rows:
                if n >= examples:
                    break
                f.write(json.dumps({**row, "prompt_id": f"{row['prompt_id']}#{copy}"}) + "\n")
                n += 1
            copy += 1
    return n


def timed(root: Path, args: list[str], cwd: str) -> float:
    # `python -c` puts the working directory first on sys.path: run from a neutral folder so ROOT decides.
    env = {**os.environ, "PYTHONPATH": str(root.resolve())}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{root}: rbr {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", action="append", type=Path, required=True, help="a checkout to time (repeatable)")
    ap.add_argument("--rows", type=Path, required=True, help="rows.jsonl of a synth run (any size)")
    ap.add_argument("--examples", type=int, default=5950, help="rows for the timed `rbr fit` (default 5950)")
    ap.add_argument("--repeats", type=int, default=7, help="runs per command and root (default 7)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        n = replicate(args.rows, args.examples, data)
        commands = {
            "rbr --help": ["--help"],
            "rbr fit --help": ["fit", "--help"],
            f"rbr fit ({n} examples)": ["fit", "--data", str(data), "--out", str(Path(tmp) / "w.json"),
                                        "--heldout", "0.2", "--orderings", str(ORDERINGS)],
        }
        times: dict[str, dict[str, list[float]]] = {c: {str(r): [] for r in args.root} for c in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                for root in args.root:
                    times[name][str(root)].append(timed(root, cmd, tmp))
    result = {name: {root: statistics.median(v) for root, v in per.items()} for name, per in times.items()}
    for name, per in result.items():
        cells = "  ".join(f"{root}: {t:.3f} s" for root, t in per.items())
        first, last = list(per.values())[0], list(per.values())[-1]
        print(f"{name:<26} {cells}  ratio first/last {first / last:.2f}x")
    return result


if __name__ == "__main__":
    main()
