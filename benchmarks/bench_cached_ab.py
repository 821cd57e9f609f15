"""Cached `/v1/rewards` requests against two running services, in interleaved rounds: an A/B of two versions.

This machine is shared and noisy: two benchmark runs minutes apart differ by more than most code changes. Here
both services run at once (say, two commits on two ports) and take turns, round by round, with the order
flipped every round, so both see the same noise; compare the medians as a ratio. Each service first grades
the request's items once (slow on a CPU), then every request is a cache hit. Items and percentiles are
bench_service.py's.

    # two services, for example the old commit in a git worktree on 18301 and this tree on 18300
    .venv/bin/python benchmarks/bench_cached_ab.py --a http://127.0.0.1:18301 --b http://127.0.0.1:18300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx
from bench_service import drive, make_items, pct  # same items and percentiles as bench_service


async def one_round(client: httpx.AsyncClient, body: dict, concurrency: int, n: int) -> tuple[float, ...]:
    """(requests/s, p50 ms, p99 ms) for `n` copies of `body` sent by `concurrency` workers."""
    latencies, wall, statuses = await drive(client, [body] * n, concurrency)
    if set(statuses) != {200}:
        raise SystemExit(f"{client.base_url}: expected only 200s, got {statuses}")
    return len(latencies) / wall, pct(latencies, 50) * 1e3, pct(latencies, 99) * 1e3


async def run(args: argparse.Namespace) -> None:
    body = {"items": make_items(args.items, "ab")}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=args.timeout) for name, url in (("A", args.a),
                                                                                          ("B", args.b))}
    for name, client in clients.items():
        start = time.perf_counter()
        r = await client.post("/v1/rewards", json=body)
        if r.status_code != 200:
            raise SystemExit(f"{name} ({client.base_url}): warm-up answered {r.status_code}: {r.text[:200]}")
        print(f"{name} = {client.base_url}: warm-up (grading {args.items} items) {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    rows: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    print("| round | service | concurrency | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for k in range(args.rounds):
        for name in ("A", "B") if k % 2 == 0 else ("B", "A"):
            for conc in args.concurrency:
                res = await one_round(clients[name], body, conc, args.requests)
                rows.setdefault((name, conc), []).append(res)
                print(f"| {k} | {name} | {conc} | {res[0]:.1f} | {res[1]:.1f} | {res[2]:.1f} |", flush=True)
    print("\n| concurrency | A median req/s | B median req/s | B/A | A worst p99 ms | B worst p99 ms |")
    print("|---|---|---|---|---|---|")
    for conc in args.concurrency:
        a = statistics.median(r[0] for r in rows[("A", conc)])
        b = statistics.median(r[0] for r in rows[("B", conc)])
        worst_a = max(r[2] for r in rows[("A", conc)])
        worst_b = max(r[2] for r in rows[("B", conc)])
        print(f"| {conc} | {a:.1f} | {b:.1f} | {b / a:.2f} | {worst_a:.1f} | {worst_b:.1f} |")
    for name, client in clients.items():  # still every item a cache hit: the rounds measured the cached path
        r = await client.post("/v1/rewards", json=body)
        if not all(x["cached"] for x in r.json()["results"]):
            print(f"warning: {name} answered uncached items after the rounds (cache evicted or down?)",
                  file=sys.stderr)
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="base URL of service A (the baseline)")
    parser.add_argument("--b", required=True, help="base URL of service B (the candidate)")
    parser.add_argument("--items", type=int, default=64, help="items per request (default 64)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds; each runs A and B (default 6)")
    parser.add_argument("--requests", type=int, default=200, help="requests per service, round and level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="client concurrency levels")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per request (the warm-up grades)")
    args = parser.parse_args(argv)
    if args.items < 1 or args.rounds < 1 or args.requests < 1 or min(args.concurrency) < 1:
        parser.error("--items, --rounds, --requests and --concurrency must be positive")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
