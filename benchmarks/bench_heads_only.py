"""Uncached `/v1/rewards` throughput of the default configuration with two heads files, in one run.

For each heads file given (`--heads LABEL=PATH`, in order), a real `rbr serve` (default policy and weights, no
Redis: the in-process cache, and every item is new to it) grades the same gold-set conversations, each with its
response type, in requests of `--items` items; completions per second is items / wall time. The first file is
typically the heads shipped before (three propositions still prompted), the second the heads that cover every
proposition of the default policy, so that no prompted judgment runs at all. The prompted judgments each
configuration runs are the items' propositions its heads file lacks.

    source scripts/env.sh && .venv/bin/python benchmarks/bench_heads_only.py \
        --gold ../shared/reference/openai-rbr/gold_train.jsonl \
        --heads before=out/heads-before.npz --heads after=rbr_model/policies/default_heads.npz
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_service import wait_ready  # noqa: E402
from redis_server import free_port  # noqa: E402

TYPES = {"Comply": "comply", "Hard Refuse": "hard_refuse", "Safe Refuse 1": "safe_refuse",
         "Safe Refuse 2": "safe_refuse"}


def gold_items(path: Path, n: int) -> list[dict]:
    """The first n gold rows of each response type in turn (comply, hard_refuse, safe_refuse, ...)."""
    by_type: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rt = TYPES.get(row["response_type"])
        if rt:
            by_type.setdefault(rt, []).append(row)
    items, k = [], 0
    while len(items) < n:
        for rt in ("comply", "hard_refuse", "safe_refuse"):
            if k < len(by_type[rt]) and len(items) < n:
                row = by_type[rt][k]
                items.append({"prompt": row["prompt"], "completion": row["completion"][0]["content"],
                              "response_type": rt, "rm_score": 0.0})
        k += 1
    return items


async def measure(label: str, heads: str, items: list[dict], per_request: int, timeout: float) -> dict:
    port = free_port()
    log = Path(f"/tmp/rbr-bench-heads-{label}.log")
    env = dict(os.environ, RBR_PORT=str(port), RBR_HEADS=heads, RBR_LOG_LEVEL="warning", RBR_DEFAULT_RM_SCORE="0")
    env.pop("RBR_REDIS_URL", None)
    with log.open("w") as out:
        proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "rbr"), "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready_s = await wait_ready(base, proc, timeout)
        async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
            warm = {"items": [dict(items[0], completion=items[0]["completion"] + " (warm-up)")]}
            assert (await client.post("/v1/rewards", json=warm)).status_code == 200
            start = time.perf_counter()
            for i in range(0, len(items), per_request):
                r = await client.post("/v1/rewards", json={"items": items[i:i + per_request]})
                r.raise_for_status()
                assert not any(res.get("cached") for res in r.json()["results"])
            wall = time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"label": label, "heads": heads, "ready_s": ready_s, "items": len(items), "wall_s": wall,
            "completions_per_s": len(items) / wall, "prompted_judgments": prompted_judgments(heads, items)}


def prompted_judgments(heads_path: str, items: list[dict]) -> int:
    """Judgments the prompted grader runs for `items`: their response types' propositions without a head."""
    sys.path.insert(0, str(ROOT))
    from rbr_model.heads import Heads
    from rbr_model.policy import load_policy

    policy, heads = load_policy(), Heads.load(heads_path)
    return sum(1 for it in items for p in policy.propositions_for(it["response_type"]) if p not in heads)


async def main(args: argparse.Namespace) -> None:
    items = gold_items(args.gold, args.n)
    results = []
    for spec in args.heads:
        label, _, path = spec.partition("=")
        res = await measure(label, path, items, args.items, args.start_timeout)
        print(json.dumps(res), flush=True)
        results.append(res)
    print(f"\n{len(items)} gold conversations, {args.items}-item requests, uncached, one `rbr serve` at a time\n")
    print("| heads | prompted judgments | wall s | completions/s | s per completion |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} ({r['heads']}) | {r['prompted_judgments']:.0f} | {r['wall_s']:.1f} | "
              f"{r['completions_per_s']:.2f} | {r['wall_s'] / r['items']:.2f} |")
    if len(results) >= 2:
        print(f"\nspeed-up {results[-1]['label']} vs {results[0]['label']}: "
              f"{results[-1]['completions_per_s'] / results[0]['completions_per_s']:.1f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gold", type=Path, required=True, help="gold-format rows whose conversations are graded")
    ap.add_argument("--heads", action="append", required=True, help="LABEL=PATH, once per configuration, in order")
    ap.add_argument("--n", type=int, default=48, help="completions graded per configuration")
    ap.add_argument("--items", type=int, default=16, help="items per request")
    ap.add_argument("--start-timeout", type=float, default=600)
    asyncio.run(main(ap.parse_args()))
