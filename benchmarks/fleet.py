"""The scale-out topology on one machine, as processes, and GRPO-shaped load through it (issue #22).

One command starts everything, plays the workers for `--duration` seconds, prints the figures and stops
everything (also on Ctrl-C):

- the grading fleet: one vLLM OpenAI-compatible server (the prompted propositions) and, unless `--no-heads`, one
  vLLM pooling server running the heads' trunk;
- one redis-server, the feature cache every replica shares;
- `--replicas` `rbr serve` processes with RBR_ENGINE=remote (CPU-only API replicas);
- `--workers` GRPO workers in this process: each takes a prompt of benchmarks/data/rl_groups.jsonl (drawn with
  replacement, so prompts come back, as in later epochs, and two workers may hold one prompt at once), samples
  `--group` completions: with probability `--repeat-share` one of that prompt's stored completions (a policy
  repeating a common answer, the same text again), else a new text (a stored one with a unique tail), and asks for
  their rewards, even workers through
  `/v1/rewards` (rbr_client), odd ones through OpenRLHF's `/get_reward` (ChatML strings). Every worker's client
  holds every replica's URL (spread and failover, no load balancer).

Printed: completions/s, p50/p99 latency per request, the cache hit rate (as the replicas answered it), errors, and
how many graded items another replica was grading at the same moment (what in-flight deduplication across
replicas could save).

    python benchmarks/fleet.py --replicas 2 --workers 8 --duration 60
    python benchmarks/fleet.py --replicas 1 --workers 4 --duration 30 --no-heads   # lighter: one vLLM server
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fleet_procs import ServeReplica, metric_value  # noqa: E402  (tests/fleet_procs.py: rbr serve processes)
from helpers import SERVED_NAME, VLLMServer  # noqa: E402  (tests/helpers.py: the vLLM server)
from redis_server import RedisServer  # noqa: E402

DATA = ROOT / "benchmarks/data/rl_groups.jsonl"


@dataclass
class Record:
    """One request as a worker saw it."""

    route: str
    items: int
    start: float
    end: float
    ok: bool
    error: str = ""
    keys: list[str] = field(default_factory=list)  # one per item: its (prompt, completion) hash
    cached: list[bool] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # one per item, as answered


def load_groups() -> list[tuple[list[dict], str, list[str]]]:
    """(prompt messages, response type, completions) per prompt of rl_groups.jsonl."""
    groups: dict[str, tuple[list[dict], str, list[str]]] = {}
    for line in DATA.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        completion = row["completion"][-1]["content"] if isinstance(row["completion"], list) else row["completion"]
        groups.setdefault(row["prompt_id"], (row["prompt"], row["response_type"], []))[2].append(completion)
    return list(groups.values())


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def key(prompt: list[dict], completion: str) -> str:
    return hashlib.sha256(json.dumps([prompt, completion]).encode()).hexdigest()[:16]


async def worker(index: int, urls: list[str], groups, args, stop: Callable[[], bool], records: list[Record]) -> None:
    """One GRPO worker: requests until `stop()` says so; one Record per request into `records`."""
    from rbr_client import AsyncRewardClient, Item, RewardServiceError

    rng = random.Random(args.seed * 1000 + index)
    route = "/v1/rewards" if index % 2 == 0 else "/get_reward"
    urls = urls[index % len(urls):] + urls[:index % len(urls)]  # workers start on different replicas
    async with AsyncRewardClient(urls, max_retries=6, backoff_base=0.2, timeout=600) as client:
        while not stop():
            prompt, rtype, completions = rng.choice(groups)
            sample = [c if rng.random() < args.repeat_share else f"{c} (sample {rng.getrandbits(48):012x})"
                      for c in (rng.choice(completions) for _ in range(args.group))]
            keys = [key(prompt, c) for c in sample]
            start = time.monotonic()
            try:
                if route == "/v1/rewards":
                    out = await client.rewards([Item(prompt, c, rtype, rm_score=0.0) for c in sample])
                    cached, rewards = [r.cached for r in out], [r.reward for r in out]
                else:
                    head = chatml(prompt)
                    got = await client.get_reward([head + c + "<|im_end|>" for c in sample],
                                                  prompts=[head] * len(sample), labels=[rtype] * len(sample))
                    cached = [bool(x) for x in got.extra_logs.get("cached", [0.0] * len(sample))]
                    rewards = list(got.rewards)
                records.append(Record(route, len(sample), start, time.monotonic(), True, keys=keys, cached=cached,
                                      rewards=rewards))
            except RewardServiceError as exc:
                records.append(Record(route, len(sample), start, time.monotonic(), False, str(exc), keys=keys))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def cross_replica_duplicates(records: list[Record]) -> tuple[int, int]:
    """(graded items, of which another request was grading the same item at the same moment).

    Two requests that both missed the cache for the same item and overlapped in time graded it twice unless
    they met on one replica (its grader shares work in flight). Counted on the client's side without knowing
    the replica, so this is an upper bound on what deduplication across replicas could save."""
    misses = defaultdict(list)
    graded = 0
    for r in records:
        if not r.ok:
            continue
        for k, c in zip(r.keys, r.cached, strict=False):
            if not c:
                graded += 1
                misses[k].append((r.start, r.end, id(r)))
    dup = 0
    for spans in misses.values():
        spans.sort()
        for i, (s, e, rid) in enumerate(spans):
            if any(s2 < e and s < e2 and rid2 != rid for s2, e2, rid2 in spans[:i] + spans[i + 1:]):
                dup += 1
    return graded, dup


def start_fleet(args, work: Path, procs: dict) -> None:
    """Redis, the vLLM server(s) and the replicas, into `procs` as they start (the caller stops them)."""
    from rbr_model import models

    procs.update(redis=RedisServer().start(), vllm=[], replicas=[])
    grader = models.prepare()
    generate = VLLMServer(grader, work / "vllm-generate.log")
    procs["vllm"].append(generate)
    env = {"RBR_ENGINE": "remote", "RBR_REMOTE_URL": generate.url, "RBR_REMOTE_MODEL": SERVED_NAME,
           "RBR_REDIS_URL": procs["redis"].url, "RBR_DEFAULT_RM_SCORE": "0", "RBR_LOG_LEVEL": "warning",
           "RBR_HEADS": "none"}
    if args.heads:
        from rbr_model.heads import Heads, packaged_heads_path

        trunk = models.prepare_trunk(int(Heads.load(packaged_heads_path()).grader["layer"]))
        pooler = json.dumps({"task": "token_embed", "use_activation": False})
        pooling = VLLMServer(trunk, work / "vllm-pooling.log", "--runner", "pooling", "--pooler-config", pooler)
        procs["vllm"].append(pooling)
        env.update(RBR_HEADS=str(packaged_heads_path()), RBR_HEADS_URL=pooling.url, RBR_HEADS_TRUNK=str(trunk))
    for server in procs["vllm"]:
        server.wait_ready(900)
    for i in range(args.replicas):
        procs["replicas"].append(ServeReplica(env, work / f"rbr-serve-{i}.log"))
    for replica in procs["replicas"]:
        replica.wait_ready()


def stop_on_sigterm() -> None:
    """SIGTERM ends this process as Ctrl-C does, so that `finally: stop_fleet(...)` runs and no server is left."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def stop_fleet(procs: dict) -> None:
    for replica in procs.get("replicas", []):
        replica.stop()
    for server in procs.get("vllm", []):
        server.stop()
    if procs.get("redis"):
        procs["redis"].stop()


def cache_counts(urls: list[str]) -> dict[str, float]:
    """The replicas' feature-cache lookups so far, summed: {"hit": n, "miss": n}."""
    return {k: sum(metric_value(u, "rbr_cache_requests_total", result=k) for u in urls) for k in ("hit", "miss")}


def summarize(records: list[Record], duration: float, urls: list[str], args,
              cache_before: dict[str, float] | None = None) -> dict:
    """The figures of one run; `cache_before` (cache_counts at its start) when the replicas served earlier runs."""
    ok = [r for r in records if r.ok]
    lat = {route: [r.end - r.start for r in ok if r.route == route] for route in ("/v1/rewards", "/get_reward")}
    all_lat = [x for v in lat.values() for x in v]
    items = sum(r.items for r in ok)
    hits = sum(sum(r.cached) for r in ok)
    graded, dup = cross_replica_duplicates(records)
    cache = cache_counts(urls)
    if cache_before:
        cache = {k: v - cache_before.get(k, 0.0) for k, v in cache.items()}
    return {
        "replicas": args.replicas, "workers": args.workers, "group": args.group, "heads": args.heads,
        "repeat_share": args.repeat_share,
        "duration_s": round(duration, 1), "requests": len(records), "failed_requests": len(records) - len(ok),
        "errors": sorted({r.error for r in records if not r.ok})[:5],
        "completions": items, "completions_per_s": round(items / duration, 2),
        "latency_p50_s": round(percentile(all_lat, 0.5), 3), "latency_p99_s": round(percentile(all_lat, 0.99), 3),
        "latency_by_route": {k: {"n": len(v), "p50_s": round(percentile(v, 0.5), 3),
                                 "p99_s": round(percentile(v, 0.99), 3)} for k, v in lat.items()},
        "cache_hit_rate_answers": round(hits / items, 3) if items else None,
        "cache_hit_rate_lookups": round(cache["hit"] / (cache["hit"] + cache["miss"]), 3)
        if cache["hit"] + cache["miss"] else None,
        "graded_items": graded, "graded_while_another_request_graded_it": dup,
        "cross_replica_dedup_upper_bound": round(dup / graded, 4) if graded else None,
    }


async def play(urls: list[str], args) -> tuple[list[Record], float]:
    groups = load_groups()
    records: list[Record] = []
    start = time.monotonic()
    stop_at = start + args.duration
    await asyncio.gather(*(worker(i, urls, groups, args, lambda: time.monotonic() >= stop_at, records)
                           for i in range(args.workers)))
    return records, time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=int, default=2, help="rbr serve processes (RBR_ENGINE=remote)")
    p.add_argument("--workers", type=int, default=8, help="GRPO workers (half /v1/rewards, half /get_reward)")
    p.add_argument("--duration", type=float, default=60, help="seconds of load")
    p.add_argument("--group", type=int, default=8, help="completions per prompt per request (GRPO group size)")
    p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=True,
                   help="grade headed propositions on a vLLM pooling server (--no-heads: prompts only, one vLLM)")
    p.add_argument("--repeat-share", type=float, default=0.3,
                   help="share of sampled completions that repeat a stored one (an assumption, not a measurement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append the summary as one JSON line to this file")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

    stop_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="rbr-fleet-"))
    print(f"logs in {work}", flush=True)
    procs: dict = {}
    try:
        t0 = time.monotonic()
        start_fleet(args, work, procs)
        urls = [r.url for r in procs["replicas"]]
        print(f"fleet up in {time.monotonic() - t0:.0f} s: replicas {urls}", flush=True)
        records, duration = asyncio.run(play(urls, args))
        summary = summarize(records, duration, urls, args)
        summary.update(machine=f"{platform.machine()}, {os.cpu_count()} cores",
                       date=time.strftime("%Y-%m-%d"))
        print(json.dumps(summary, indent=2))
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(summary) + "\n")
    finally:
        stop_fleet(procs)


if __name__ == "__main__":
    main()
