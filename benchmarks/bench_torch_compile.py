"""torch.compile on or off for the CPU engine: the same prompted grading, the same model, alternating runs.

vLLM wraps a few sampler helpers in torch.compile even with enforce_eager; on the CPU, Inductor compiles them at
the first request that asks for logprobs, which needs g++, Python headers and an executable /tmp. The project
turns it off (TORCHDYNAMO_DISABLE=1, `cpu_engine_env`). This measures what that costs: each run is a fresh
process (the switch is read at import) that starts a VLLMEngine on the embedded model, sends one warm-up
judgment (where compilation happens), then grades the benchmark's conversations on every proposition of one
response type. Reported per mode: the first judgment's latency, judgments/s after it (median over runs) and the
largest P(yes) difference between modes. Needs a C++ compiler for the compiled mode (this dev machine has one).

    python benchmarks/bench_torch_compile.py --runs 2 --conversations 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


async def one_run(args) -> dict:
    import bench_grading as bg

    from rbr_model import models
    from rbr_model.grading import Grader
    from rbr_model.grading.vllm_engine import VLLMEngine
    from rbr_model.policy import load_policy

    policy = load_policy(None)
    t0 = time.perf_counter()
    engine = VLLMEngine(models.prepare(), max_model_len=4096, max_num_seqs=64)
    boot = time.perf_counter() - t0
    bargs = bg.parse_args(["--conversations", str(args.conversations), "--response-type", args.response_type])
    pairs, *_ = bg.load_items(bargs, policy, engine.tokenizer)
    props = [p for p in policy.propositions_for(args.response_type)]
    try:
        grader = Grader(engine, policy, layout="proposition_first")
        t0 = time.perf_counter()
        await grader.grade_judgments([(pairs[0][0], "warm-up answer.", props[:1])])
        first = time.perf_counter() - t0
        judged, elapsed, _, _ = await bg.run_ours(engine, policy, pairs, props, bargs)
    finally:
        await engine.close()
    return {"dynamo_disabled": os.environ.get("TORCHDYNAMO_DISABLE") == "1", "boot_s": boot, "first_judgment_s": first,
            "judgments": len(judged), "judgments_per_s": len(judged) / elapsed,
            "p_yes": [j.p_yes for j in judged]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="runs per mode, alternating")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--response-type", default="hard_refuse")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(asyncio.run(one_run(args))), flush=True)
        return
    runs: dict[str, list[dict]] = {"eager (TORCHDYNAMO_DISABLE=1)": [], "compiled (TORCHDYNAMO_DISABLE=0)": []}
    for _ in range(args.runs):
        for mode, flag in (("eager (TORCHDYNAMO_DISABLE=1)", "1"), ("compiled (TORCHDYNAMO_DISABLE=0)", "0")):
            env = {**os.environ, "TORCHDYNAMO_DISABLE": flag,
                   "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="rbr-bench-inductor-")}  # cold every run
            out = subprocess.run([sys.executable, __file__, "--child", "--conversations", str(args.conversations),
                                  "--response-type", args.response_type], env=env, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            assert res["dynamo_disabled"] == (flag == "1"), res["dynamo_disabled"]
            runs[mode].append(res)
            print(f"{mode}: first judgment {res['first_judgment_s']:.2f} s, "
                  f"{res['judgments_per_s']:.1f} judgments/s", flush=True)
    eager, compiled = runs.values()
    def max_diff(a: dict, b: dict) -> float:
        return max(abs(x - y) for x, y in zip(a["p_yes"], b["p_yes"], strict=True))

    # Batches form differently from run to run, and float32 sums in another order differ in the last bits: the
    # spread between two runs of one mode is the yardstick for the difference between modes.
    fig = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "judgments": eager[0]["judgments"],
           "max_abs_p_yes_diff_between_modes": max(max_diff(e, c) for e in eager for c in compiled),
           "max_abs_p_yes_diff_within_eager": max((max_diff(a, b) for a in eager for b in eager if a is not b),
                                                  default=None),
           "max_abs_p_yes_diff_within_compiled": max((max_diff(a, b) for a in compiled for b in compiled
                                                      if a is not b), default=None)}
    for mode, rs in runs.items():
        fig[mode] = {"first_judgment_s": statistics.median(r["first_judgment_s"] for r in rs),
                     "judgments_per_s": statistics.median(r["judgments_per_s"] for r in rs)}
    e, c = fig["eager (TORCHDYNAMO_DISABLE=1)"], fig["compiled (TORCHDYNAMO_DISABLE=0)"]
    fig["eager_over_compiled_throughput"] = e["judgments_per_s"] / c["judgments_per_s"]
    print(json.dumps(fig, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
