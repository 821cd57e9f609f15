"""Benchmark: wall time of whole `rbr` processes (`--help`, `fit --help`, a real `rbr fit`), old tree vs new.

Start-up is most of a short command's time, so this times the whole process, as a user waits for it. Each
`--root` is a checkout whose `rbr_model` goes first on the path (for example a `git worktree` of an older commit
beside the current one); runs alternate between the roots, so both see the same machine load, and the median of
`--repeats` runs is reported with the ratio.

`rbr fit` runs on two data sets of `--examples` rows (default 5,950):
  * one-type: bench_fit.py's generated graded completions (350 prompts x 17, one response type, hard_refuse),
    renamed to the packaged policy's hard_refuse features so `rbr fit` accepts them;
  * synth (with `--rows`): a synth run's rows (three response types) repeated under new prompt ids.

`--openai-fitter PATH` (the `rbr_weight_fitter.py` of a checkout of openai/safety-rbr-code-and-data) adds
OpenAI's released fitter as a whole process on the same rows (benchmarks/openai_fitter_process.py), timed in the
same rounds, and the ratio of its median to each root's `rbr fit` median.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cli_startup.py --root /tmp/old-tree --root . \\
        --rows out/synth-heads/rows.jsonl --openai-fitter /path/to/rbr_weight_fitter.py
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fit import LABELS, RESPONSE_TYPE, generate  # noqa: E402

ORDERINGS = Path(__file__).resolve().parents[1] / "rbr_model" / "data" / "orderings.yaml"
# What the `rbr` script runs in each tree: `run` where it exists (it wraps `app`), `app` in older trees.
RUNNER = "import sys, rbr_model.cli as cli; sys.argv[0] = 'rbr'; getattr(cli, 'run', cli.app)()"
OPENAI_DRIVER = Path(__file__).resolve().parent / "openai_fitter_process.py"
OPENAI = "OpenAI's fitter"


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


def one_type_rows(examples: int, out: Path, orderings_out: Path) -> int:
    """bench_fit's generator (17 completions a prompt), its features renamed to the packaged policy's."""
    from rbr_model.features import FeatureSpec
    from rbr_model.policy import load_policy

    spec = FeatureSpec(load_policy(), RESPONSE_TYPE)
    if spec.classes != LABELS:
        raise SystemExit(f"the packaged policy's {RESPONSE_TYPE} classes {spec.classes} are not {LABELS}")
    completions = 17
    rows = generate(-(-examples // completions), completions, len(spec.propositions), 0.08, 0)[:examples]
    rename = {f"prop_{j:02d}": name for j, name in enumerate(spec.propositions)}
    with out.open("w") as f:
        for row in rows:
            features = {rename.get(name, name): value for name, value in row["features"].items()}
            f.write(json.dumps({**row, "features": features}) + "\n")
    # Every label beats every label below it, as bench_fit orders them.
    orderings_out.write_text(yaml.safe_dump({RESPONSE_TYPE: {a: list(LABELS[i + 1:]) for i, a in enumerate(LABELS)}}))
    return len(rows)


def timed(root: Path, args: list[str], cwd: str) -> float:
    # `python -c` puts the working directory first on sys.path: run from a neutral folder so ROOT decides.
    env = {**os.environ, "PYTHONPATH": str(root.resolve())}
    return wall_time([sys.executable, "-c", RUNNER, *args], env, cwd, f"{root}: rbr {' '.join(args)}")


def wall_time(command: list[str], env: dict[str, str], cwd: str, what: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", action="append", type=Path, required=True, help="a checkout to time (repeatable)")
    ap.add_argument("--rows", type=Path, help="rows.jsonl of a synth run (any size): adds the synth data set")
    ap.add_argument("--examples", type=int, default=5950, help="rows for each timed `rbr fit` (default 5950)")
    ap.add_argument("--repeats", type=int, default=7, help="runs per command and root (default 7)")
    ap.add_argument("--openai-fitter", type=Path, help="rbr_weight_fitter.py of OpenAI's release: time it too")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        datasets = {}  # name -> (rows file, orderings YAML)
        n = one_type_rows(args.examples, folder / "one_type.jsonl", folder / "one_type_orderings.yaml")
        datasets[f"one-type, {n} rows"] = (folder / "one_type.jsonl", folder / "one_type_orderings.yaml")
        if args.rows:
            n = replicate(args.rows, args.examples, folder / "synth.jsonl")
            datasets[f"synth, {n} rows"] = (folder / "synth.jsonl", ORDERINGS)
        commands = {"rbr --help": ["--help"], "rbr fit --help": ["fit", "--help"]}
        for name, (data, orderings) in datasets.items():
            commands[f"rbr fit ({name})"] = ["fit", "--data", str(data), "--out", str(folder / "w.json"),
                                             "--heldout", "0.2", "--orderings", str(orderings)]
        openai_commands = {}
        if args.openai_fitter:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            for name, (data, orderings) in datasets.items():
                as_json = data.with_suffix(".orderings.json")  # their process reads no YAML of ours
                as_json.write_text(json.dumps(yaml.safe_load(orderings.read_text())))
                openai_commands[f"{OPENAI} ({name})"] = [
                    sys.executable, str(OPENAI_DRIVER), "--fitter", str(args.openai_fitter.resolve()),
                    "--data", str(data), "--orderings", str(as_json)]
        times: dict[str, dict[str, list[float]]] = {c: {str(r): [] for r in args.root} for c in commands}
        times.update({c: {OPENAI: []} for c in openai_commands})
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                for root in args.root:
                    times[name][str(root)].append(timed(root, cmd, tmp))
            for name, cmd in openai_commands.items():
                times[name][OPENAI].append(wall_time(cmd, env, tmp, name))
    result = {name: {root: statistics.median(v) for root, v in per.items()} for name, per in times.items()}
    for name, per in result.items():
        cells = "  ".join(f"{root}: {t:.3f} s" for root, t in per.items())
        first, last = list(per.values())[0], list(per.values())[-1]
        print(f"{name:<40} {cells}  ratio first/last {first / last:.2f}x")
    for name in datasets if args.openai_fitter else ():
        theirs = result[f"{OPENAI} ({name})"][OPENAI]
        for root, ours in result[f"rbr fit ({name})"].items():
            print(f"{name}: OpenAI's fitter / rbr fit, whole processes ({root}): {theirs:.3f} / {ours:.3f} s"
                  f" = {theirs / ours:.1f}x")
    return result


if __name__ == "__main__":
    main()
