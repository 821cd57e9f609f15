"""Service benchmark: a real `rbr serve` process with Redis, driven over loopback by concurrent clients.

Measures throughput and p50/p99 latency of 64-item `/v1/rewards` requests, uncached (every item graded by
the engine) and fully cached (every item a Redis hit). Run it from the repository root:

    source scripts/env.sh && .venv/bin/python benchmarks/bench_service.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from redis_server import RedisServer, free_port  # noqa: E402

RESPONSE_TYPES = ("comply", "hard_refuse", "safe_refuse")


def make_items(n: int, tag: str) -> list[dict]:
    """n distinct items across the response types; `tag` makes them new to the cache."""
    items = []
    for i in range(n):
        rt = RESPONSE_TYPES[i % 3]
        items.append({
            "prompt": [{"role": "user", "content": f"Question {i} about topic {i % 7}: can you help me with this?"}],
            "completion": f"[{tag}] Here is answer number {i}. I hope it helps with topic {i % 7}.",
            "response_type": rt,
            "rm_score": (i % 10) / 10,
            "id": f"{tag}-{i}",
        })
    return items


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(q / 100 * (len(values) - 1))))
    return values[k]


async def drive(client: httpx.AsyncClient, bodies: list[dict], concurrency: int) -> tuple[list[float], float, dict]:
    """Send every body once with `concurrency` workers; return latencies (s), wall time and status counts."""
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def worker() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            r = await client.post("/v1/rewards", json=body)
            latencies.append(time.perf_counter() - start)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, statuses


def start_service(port: int, redis_url: str, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, RBR_PORT=str(port), RBR_REDIS_URL=redis_url, RBR_LOG_LEVEL="warning",
               RBR_REDIS_TIMEOUT_S="0.5")
    log = log_path.open("w")
    return subprocess.Popen([str(ROOT / ".venv" / "bin" / "rbr"), "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"rbr serve exited with {proc.returncode}")
            try:
                if (await c.get("/readyz")).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("service not ready")


async def main(args: argparse.Namespace) -> None:
    redis = RedisServer().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_service(port, redis.url, Path(args.log))
    try:
        ready_s = await wait_ready(base, proc, args.start_timeout)
        print(f"service ready after {ready_s:.1f} s (log: {args.log})", flush=True)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=1800, limits=limits) as client:
            tag = f"run{int(time.time())}"
            # Uncached: each request brings 64 items the cache has never seen.
            uncached = [{"items": make_items(args.items, f"{tag}-u{k}")} for k in range(args.uncached_requests)]
            lat_u, wall_u, st_u = await drive(client, uncached, concurrency=1)
            metrics = (await client.get("/metrics")).text
            judgments = sum(float(line.split()[-1]) for line in metrics.splitlines()
                            if line.startswith("rbr_judgments_total "))
            # Cached: the first uncached body again and again.
            warm = uncached[0]
            results = {}
            for conc in args.concurrency:
                bodies = [warm] * args.cached_requests
                lat, wall, st = await drive(client, bodies, concurrency=conc)
                results[conc] = (lat, wall, st)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        print(f"\nmachine: {os.cpu_count()} cores, {cpu}; python {platform.python_version()}")
        print(f"{args.items}-item requests, Redis cache, rbr serve on loopback\n")
        print("| load | requests | concurrency | req/s | items/s | p50 ms | p99 ms | statuses |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| uncached | {len(lat_u)} | 1 | {len(lat_u) / wall_u:.3f} | {len(lat_u) * args.items / wall_u:.1f} | "
              f"{pct(lat_u, 50) * 1e3:.0f} | {pct(lat_u, 99) * 1e3:.0f} | {st_u} |")
        for conc, (lat, wall, st) in results.items():
            print(f"| cached | {len(lat)} | {conc} | {len(lat) / wall:.1f} | {len(lat) * args.items / wall:.0f} | "
                  f"{pct(lat, 50) * 1e3:.1f} | {pct(lat, 99) * 1e3:.1f} | {st} |")
        print(f"\nuncached: {judgments:.0f} judgments in {wall_u:.1f} s = {judgments / wall_u:.1f} judgments/s; "
              f"mean uncached latency {statistics.mean(lat_u):.1f} s")
        c1 = results[args.concurrency[0]][0]
        print(f"cached/uncached latency ratio (p50, same run): {pct(lat_u, 50) / pct(c1, 50):.0f}x")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64, help="items per request (default 64)")
    parser.add_argument("--uncached-requests", type=int, default=2,
                        help="requests of new items, sent one at a time (each is graded: slow on CPU)")
    parser.add_argument("--cached-requests", type=int, default=400, help="cached requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="client concurrency levels")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for /readyz")
    parser.add_argument("--log", default="/tmp/rbr-bench-service.log", help="where the service log goes")
    asyncio.run(main(parser.parse_args()))
