"""vLLM's shared-memory queues at their defaults or shrunk for a 64 MiB /dev/shm: the default grading stack.

A container started without `--shm-size` has Docker's 64 MiB /dev/shm, less than vLLM's default queues need
(about 400 MiB per CPU engine); `cpu_engine_env` then gives them 1 MiB chunks (rbr_model/grading/small_shm.py), and
messages over a chunk (the heads' per-token states, most of all) go through vLLM's socket instead. This measures
what that costs, on the stack `rbr serve` builds by default (prompted grader + heads trunk): each run is a fresh
process; the small-/dev/shm runs get a private 64 MiB tmpfs on /dev/shm (`unshare --mount`, so root), exactly what
such a container sees. Reported per mode: start-up, completions/s over every proposition of one response type
(after one warm-up item), and the largest P(yes) difference between and within modes.

    sudo .venv/bin/python benchmarks/bench_small_shm.py --runs 2 --conversations 24
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

# mode: (tmpfs size for a private /dev/shm or None for the machine's, shrink the queues in a roomy /dev/shm)
MODES = {"default /dev/shm": (None, False), "64 MiB /dev/shm": ("64m", False),
         "1 MiB chunks in roomy /dev/shm": (None, True)}


async def one_run(args) -> dict:
    import shutil

    import bench_grading as bg

    from rbr_model.policy import load_policy
    from rbr_model.stack import StackSettings, build_stack

    if args.force_small:  # what the 64 MiB mode does, with /dev/shm out of the picture
        from rbr_model.grading import vllm_engine

        vllm_engine.DEFAULT_QUEUES_SHM_BYTES = 1 << 62
    policy = load_policy(None)
    t0 = time.perf_counter()
    stack = await build_stack(StackSettings(), policy)
    boot = time.perf_counter() - t0
    try:
        bargs = bg.parse_args(["--conversations", str(args.conversations), "--response-type", args.response_type])
        pairs, *_ = bg.load_items(bargs, policy, stack.engine.tokenizer)
        props = policy.propositions_for(args.response_type)
        await stack.grader.grade([(pairs[0][0], "warm-up answer.", props)])
        t0 = time.perf_counter()
        graded = await stack.grader.grade([(conv, completion, props) for conv, completion in pairs])
        elapsed = time.perf_counter() - t0
    finally:
        await stack.close()
    return {"shm_free_mib": shutil.disk_usage("/dev/shm").free >> 20,
            "chunk_mb": os.environ.get("VLLM_MQ_MAX_CHUNK_BYTES_MB"), "boot_s": boot,
            "completions": len(pairs), "headed": sorted(n for n in props if stack.grader.method(n) == "head"),
            "completions_per_s": len(pairs) / elapsed, "names": sorted(graded[0]),
            "p_yes": [[g[n] for n in sorted(g)] for g in graded]}


def child_command(args, shm: str | None, force_small: bool) -> list[str]:
    own = [sys.executable, __file__, "--child", "--conversations", str(args.conversations),
           "--response-type", args.response_type, *(["--force-small"] if force_small else [])]
    if shm is None:
        return own
    inner = f"mount -t tmpfs -o size={shm} tmpfs /dev/shm && exec {shlex.join(own)}"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="runs per mode, alternating")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--response-type", default="comply")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--force-small", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(asyncio.run(one_run(args))), flush=True)
        return
    if os.geteuid() != 0:
        sys.exit("needs root: the 64 MiB mode mounts a private tmpfs on /dev/shm (unshare --mount)")
    modes = [m.strip() for m in args.modes.split(",")]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.runs):
        for mode in modes:
            out = subprocess.run(child_command(args, *MODES[mode]), capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            runs[mode].append(res)
            print(f"{mode} ({res['shm_free_mib']} MiB free, chunks {res['chunk_mb'] or 'default'} MB): start "
                  f"{res['boot_s']:.1f} s, {res['completions_per_s']:.2f} completions/s", flush=True)

    def per_proposition(a: list[dict], b: list[dict]) -> dict[str, float]:
        return {name: max(abs(ra[k] - rb[k]) for x in a for y in b if x is not y
                          for ra, rb in zip(x["p_yes"], y["p_yes"], strict=True))
                for k, name in enumerate(a[0]["names"])}

    default = runs[modes[0]]
    fig = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "completions": default[0]["completions"], "response_type": args.response_type,
           "headed": default[0]["headed"], "max_abs_p_yes_diff": {}}
    for mode, rs in runs.items():
        fig[mode] = {"boot_s": statistics.median(r["boot_s"] for r in rs),
                     "completions_per_s": statistics.median(r["completions_per_s"] for r in rs),
                     "shm_free_mib": rs[0]["shm_free_mib"]}
        fig["max_abs_p_yes_diff"][f"within {mode}"] = per_proposition(rs, rs) if len(rs) > 1 else None
        if mode != modes[0]:
            fig["max_abs_p_yes_diff"][f"{mode} vs {modes[0]}"] = per_proposition(rs, default)
            fig[mode]["throughput_over_" + modes[0]] = (fig[mode]["completions_per_s"]
                                                         / fig[modes[0]]["completions_per_s"])
    fig["runs"] = runs
    print(json.dumps(fig, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
