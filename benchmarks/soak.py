"""Soak test: a steady mixed load on a real `rbr serve` (CPU vLLM engine) with a real redis-server, on loopback.

Starts redis-server and `rbr serve` as subprocesses (environment from scripts/env.sh), waits for /readyz, grades a
small pool of items once so they are cached, then runs `--concurrency` closed-loop clients for `--duration`
seconds (or until `--max-requests`), plus `--new-concurrency` clients that send only new items:

- cached: 1-4 items from the graded pool (Redis hits), on /v1/rewards or OpenRLHF's /get_reward;
- rm-only (`--rm-fraction` of the first clients' requests): items with no response type (no grading);
- new: one never-seen item with a response type (graded by the engine; seconds each on a CPU), so the engine
  is kept busy for the whole run while the cached traffic flows beside it.

Reports requests and errors by kind and status, throughput, p50/p99 latency, and the service's RSS at the start
of the load and at the end (plus its engine child processes), as text and, with --json, as a JSON file.
Not part of CI: a full run takes `--duration` plus the engine start (about a minute or more on a small CPU).

    python benchmarks/soak.py --duration 600 --concurrency 16 --new-concurrency 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
CONV = [{"role": "user", "content": "Can you recommend a good book about the history of bread?"}]
CHAT = f"<|im_start|>user\n{CONV[0]['content']}<|im_end|>\n<|im_start|>assistant\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_env() -> dict[str, str]:
    """This environment with scripts/env.sh applied and no inherited RBR_* settings."""
    out = subprocess.run(["bash", "-c", 'source scripts/env.sh && python3 -c "import json, os; '
                          'print(json.dumps(dict(os.environ)))"'], cwd=ROOT, capture_output=True, text=True, check=True)
    return {k: v for k, v in json.loads(out.stdout).items() if not k.startswith("RBR_")}


def start_redis(port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: run scripts/setup.sh")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    sys.exit(f"redis-server did not start on port {port}")


def start_service(port: int, redis_port: int, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    rbr = shutil.which("rbr") or str(Path(sys.executable).with_name("rbr"))
    env = project_env() | {
        "RBR_PORT": str(port), "RBR_HOST": "127.0.0.1", "RBR_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "RBR_DEFAULT_RM_SCORE": "0.0", "RBR_LOG_LEVEL": "warning", "RBR_REDIS_TIMEOUT_S": str(args.redis_timeout),
        "RBR_MAX_INFLIGHT_JUDGMENTS": str(args.max_inflight),
    }
    fh = log.open("wb")
    return subprocess.Popen([rbr, "serve"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen | None, grace: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def rss_mib(pid: int) -> tuple[float, float]:
    """(RSS of the process, RSS of the process and all its descendants) in MiB."""
    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    total = own
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a child that just exited
            total += child.memory_info().rss
    return own / 2**20, total / 2**20


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def item(completion: str, response_type: str | None = "comply", rm: float | None = None) -> dict:
    return {"prompt": CONV, "completion": completion, "response_type": response_type, "rm_score": rm}


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"rbr serve exited ({proc.returncode}); see {log}")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)
    sys.exit(f"rbr serve not ready after {timeout:.0f}s; see {log}")


async def run(args: argparse.Namespace) -> dict:
    port, redis_port = args.port or free_port(), free_port()
    log = Path(args.log)
    redis = start_redis(redis_port)
    service = None
    try:
        service = start_service(port, redis_port, log, args)
        n = args.concurrency + args.new_concurrency + 4
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=args.timeout, limits=limits) as c:
            ready_s = await wait_ready(c, service, args.ready_timeout, log)
            print(f"service ready after {ready_s:.0f}s (pid {service.pid}); grading a pool of {args.pool} items",
                  flush=True)
            pool = [item(f"Try 'Six Thousand Years of Bread', volume {i}.") for i in range(args.pool)]
            for it in pool:
                r = await c.post("/v1/rewards", json={"items": [it]})
                r.raise_for_status()
            return await load(c, service.pid, pool, args) | {"ready_s": round(ready_s, 1)}
    finally:
        stop(service)
        stop(redis, grace=5)


async def load(c: httpx.AsyncClient, pid: int, pool: list[dict], args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    codes: dict[str, Counter] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    cached_hits = Counter()
    samples: list[tuple[float, float, float]] = []
    sent = 0
    rss_start = rss_mib(pid)
    start = time.monotonic()
    stop_at = start + args.duration

    def pick(new: bool) -> tuple[str, str, dict]:
        if new:
            return "new", "/v1/rewards", {"items": [item(f"Read 'Flour and Water' ({uuid.uuid4().hex}).")]}
        if rng.random() < args.rm_fraction:
            return "rm-only", "/v1/rewards", {"items": [item(f"Any book ({rng.random()})", None, rng.uniform(-1, 1))
                                                        for _ in range(rng.randint(1, 4))]}
        chosen = rng.sample(pool, rng.randint(1, min(4, len(pool))))
        if rng.random() < 0.3:  # OpenRLHF's contract, same items
            return "cached", "/get_reward", {"query": [CHAT + it["completion"] for it in chosen],
                                             "prompts": [CHAT] * len(chosen), "labels": ["comply"] * len(chosen)}
        return "cached", "/v1/rewards", {"items": chosen}

    async def worker(new: bool = False) -> None:
        nonlocal sent
        while time.monotonic() < stop_at and sent < args.max_requests:
            sent += 1
            kind, path, body = pick(new)
            t = time.perf_counter()
            try:
                r = await c.post(path, json=body)
                status = str(r.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
                r = None
            latency[kind].append(time.perf_counter() - t)
            codes[kind][status] += 1
            if r is not None and r.status_code == 200 and kind == "cached" and path == "/v1/rewards":
                cached_hits[all(res["cached"] for res in r.json()["results"])] += 1

    async def sampler() -> None:
        while time.monotonic() < stop_at and sent < args.max_requests:
            await asyncio.sleep(min(30.0, max(1.0, args.duration / 20)))
            own, total = rss_mib(pid)
            samples.append((round(time.monotonic() - start, 1), round(own, 1), round(total, 1)))
            done = sum(sum(v.values()) for v in codes.values())
            print(f"  t={samples[-1][0]:6.0f}s requests={done} rss={own:.0f} MiB (with engine {total:.0f} MiB)",
                  flush=True)

    await asyncio.gather(sampler(), *[worker() for _ in range(args.concurrency)],
                         *[worker(new=True) for _ in range(args.new_concurrency)])
    elapsed = time.monotonic() - start
    rss_end = rss_mib(pid)
    total = sum(sum(v.values()) for v in codes.values())
    errors = sum(n for v in codes.values() for s, n in v.items() if s != "200")
    return {
        "duration_s": round(elapsed, 1), "concurrency": args.concurrency, "new_concurrency": args.new_concurrency,
        "requests": total, "errors": errors,
        "throughput_rps": round(total / elapsed, 1),
        "by_kind": {k: {"requests": sum(v.values()), "statuses": dict(v), "rps": round(sum(v.values()) / elapsed, 2),
                        "p50_ms": round(1000 * pct(latency[k], 0.5), 1),
                        "p99_ms": round(1000 * pct(latency[k], 0.99), 1)} for k, v in codes.items()},
        "p50_ms": round(1000 * pct([x for v in latency.values() for x in v], 0.5), 1),
        "p99_ms": round(1000 * pct([x for v in latency.values() for x in v], 0.99), 1),
        "cached_requests_all_hits": cached_hits[True], "cached_requests_with_a_miss": cached_hits[False],
        "rss_mib_start": round(rss_start[0], 1), "rss_mib_end": round(rss_end[0], 1),
        "rss_growth_pct": round(100 * (rss_end[0] - rss_start[0]) / rss_start[0], 2),
        "rss_mib_with_engine_start": round(rss_start[1], 1), "rss_mib_with_engine_end": round(rss_end[1], 1),
        "rss_samples": samples,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of steady load (default 600)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--max-requests", type=int, default=2_000_000, help="stop after this many requests")
    p.add_argument("--new-concurrency", type=int, default=2, help="extra clients sending only never-seen items")
    p.add_argument("--rm-fraction", type=float, default=0.2, help="share of RM-only requests (no response type)")
    p.add_argument("--pool", type=int, default=8, help="items graded up front and then served from the cache")
    p.add_argument("--max-inflight", type=int, default=4096, help="RBR_MAX_INFLIGHT_JUDGMENTS for the service")
    p.add_argument("--redis-timeout", type=float, default=0.25, help="RBR_REDIS_TIMEOUT_S (loaded small machines)")
    p.add_argument("--timeout", type=float, default=300, help="per-request client timeout in seconds")
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /readyz")
    p.add_argument("--port", type=int, default=0, help="service port (default: a free one)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the request mix")
    p.add_argument("--log", default="/tmp/rbr-soak-service.log", help="where the service's output goes")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))
    med = statistics.median([s[1] for s in result["rss_samples"]]) if result["rss_samples"] else float("nan")
    print(f"\nrequests {result['requests']}, errors {result['errors']}, {result['throughput_rps']} req/s, "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, RSS {result['rss_mib_start']} -> "
          f"{result['rss_mib_end']} MiB ({result['rss_growth_pct']:+.2f}%), median sample {med:.0f} MiB")


if __name__ == "__main__":
    main()
