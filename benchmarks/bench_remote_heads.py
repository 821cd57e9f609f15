"""The remote heads path, one input per `/pooling` request (before) vs batches (after), against a real vLLM pooling
server running the heads' trunk (issue #22 item 4).

The Grader grades the headed propositions of GRPO-shaped groups (benchmarks/data/rl_groups.jsonl: the sampled
completions of one prompt together) through `RemoteStateEngine` with `batch_size` 1 (what the grader sent before:
one input per call) and 32. Two shapes: every item in one grade call (a large request), and groups of
`--group` items, `--callers` grade calls at once (GRPO workers' requests arriving together). Runs alternate
between the two settings so that the shared machine's drift hits both alike. P(yes) of the two must agree.

    python benchmarks/bench_remote_heads.py --items 64 --repeats 3

Only headed propositions are asked for, so the prompted grader engine (a RemoteEngine at an address nothing
listens on) is never called: the measurement is the heads path alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import SERVED_NAME, VLLMServer  # noqa: E402  (tests/helpers.py: the tests' vLLM server)

DATA = ROOT / "benchmarks/data/rl_groups.jsonl"


def load_items(n: int, heads, policy) -> list[tuple[list[dict], str, list[str]]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()][:n]
    out = []
    for row in rows:
        names = [p for p in policy.propositions_for(row["response_type"]) if p in heads]
        completion = row["completion"][-1]["content"] if isinstance(row["completion"], list) else row["completion"]
        out.append((row["prompt"], completion, names))
    return out


async def run(args) -> dict:
    from rbr_model import models
    from rbr_model.grading.grader import Grader
    from rbr_model.grading.remote_engine import RemoteEngine
    from rbr_model.grading.states import RemoteStateEngine
    from rbr_model.heads import Heads, packaged_heads_path
    from rbr_model.policy import load_policy

    policy = load_policy(None)
    heads = Heads.load(packaged_heads_path())
    trunk = models.prepare_trunk(int(heads.grader["layer"]))
    items = load_items(args.items, heads, policy)
    pooler = json.dumps({"task": "token_embed", "use_activation": False})
    log = Path(tempfile.mkdtemp(prefix="bench-remote-heads-")) / "pooling-server.log"
    server = VLLMServer(trunk, log, "--runner", "pooling", "--pooler-config", pooler)
    try:
        await asyncio.to_thread(server.wait_ready, 900)
        prompted = RemoteEngine("http://127.0.0.1:9", model=SERVED_NAME, tokenizer=str(models.prepare()))
        shapes = {"one call": lambda g: g.grade(items),
                  f"groups of {args.group}, {args.callers} at once": lambda g: grouped(g, items, args)}
        results: dict = {}
        for shape, call in shapes.items():
            per = {1: {"s": [], "requests": [], "p": None}, 32: {"s": [], "requests": [], "p": None}}
            for rep in range(args.repeats + 1):  # the first round warms the server and is not counted
                for size in (1, 32):
                    sent = []
                    client = httpx.AsyncClient(base_url=server.url, timeout=600,
                                               event_hooks={"request": [lambda r, s=sent: _count(r, s)]})  # async hooks
                    state = RemoteStateEngine(server.url, trunk, client=client, batch_size=size)
                    grader = Grader(prompted, policy, heads=heads, state_engine=state)
                    start = time.perf_counter()
                    out = await call(grader)
                    took = time.perf_counter() - start
                    await client.aclose()
                    if rep == 0:
                        continue
                    per[size]["s"].append(took)
                    per[size]["requests"].append(len(sent))
                    per[size]["p"] = out
            diff = max(abs(a[k] - b[k]) for a, b in zip(per[1]["p"], per[32]["p"], strict=True) for k in a)
            med = {size: statistics.median(v["s"]) for size, v in per.items()}
            results[shape] = {
                "items": len(items), "headed_propositions": sum(len(n) for _, _, n in items),
                "before_batch1": {"median_s": round(med[1], 3), "runs_s": [round(x, 3) for x in per[1]["s"]],
                                  "pooling_requests": per[1]["requests"][0],
                                  "completions_per_s": round(len(items) / med[1], 2)},
                "after_batch32": {"median_s": round(med[32], 3), "runs_s": [round(x, 3) for x in per[32]["s"]],
                                  "pooling_requests": per[32]["requests"][0],
                                  "completions_per_s": round(len(items) / med[32], 2)},
                "speedup": round(med[1] / med[32], 2), "max_abs_diff_p_yes": float(diff),
            }
        await prompted.close()
        return results
    finally:
        server.stop()


async def _count(request: httpx.Request, sent: list) -> None:
    if request.url.path.endswith("/pooling"):
        sent.append(1)


async def grouped(grader, items, args) -> list[dict[str, float]]:
    groups = [items[i:i + args.group] for i in range(0, len(items), args.group)]
    gate = asyncio.Semaphore(args.callers)

    async def one(group):
        async with gate:
            return await grader.grade(group)

    parts = await asyncio.gather(*(one(g) for g in groups))
    return [p for part in parts for p in part]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=64, help="rows of rl_groups.jsonl to grade")
    p.add_argument("--group", type=int, default=8, help="items per grade call in the grouped shape")
    p.add_argument("--callers", type=int, default=4, help="grade calls at once in the grouped shape")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (after one warm-up round)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print("\n| shape | items | /pooling requests before -> after | median s before -> after | speedup | "
          "max abs diff P(yes) |\n|---|---|---|---|---|---|")
    for shape, r in results.items():
        b, a = r["before_batch1"], r["after_batch32"]
        print(f"| {shape} | {r['items']} | {b['pooling_requests']} -> {a['pooling_requests']} | "
              f"{b['median_s']} -> {a['median_s']} | {r['speedup']}x | {r['max_abs_diff_p_yes']:.2e} |")
    return None


if __name__ == "__main__":
    main()
