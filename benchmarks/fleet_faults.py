"""Faults under load, nothing lost: benchmarks/fleet.py's fleet under GRPO workers while its parts fail (#22 item 6).

The fleet (vLLM generate server, vLLM pooling server unless `--no-heads`, one redis-server, `--replicas` `rbr serve`
replicas with RBR_ENGINE=remote) starts once; `--workers` workers of fleet.py (each client holds every replica's URL)
run four phases of about `--duration` seconds, all with the same seed, so every phase asks for the same items in the
same order as the reference:

1. reference: no fault; the reward answered for each (prompt, completion) is recorded;
2. redis: Redis is killed `--fault-at` seconds in and restarted on its port `--redis-down` seconds later (empty, as
   a restarted cache is). Checked: no request fails (replicas serve without the cache), no wrong reward, the
   replicas use the cache again (rbr_cache_available) and how soon;
3. grading server: the cache is flushed (so workers need the grader), the vLLM server that grades is killed with
   SIGKILL, server and engine processes (`--grading-server auto`: the pooling server with heads, since the heads
   grade every proposition of the default policy, else the generate server), kept down `--engine-down` seconds, then
   started again on the same port. While it is down, probes to every replica must get 503 for a fresh item (never a
   200 with a reward) and /readyz 503 naming the engine; no worker request that started after the kill and ended
   before the server was back may carry an uncached item; after it is back every replica must be ready and grade
   again by itself within `--recover-timeout` seconds (recovery times printed). Worker requests that fail in the
   outage are counted, and must have failed with 503;
4. replica kill: the cache is flushed (items are graded again), and one replica is killed with SIGKILL mid-run:
   every worker request must be answered (client failover), no worker may crash, and the killed replica's child
   processes (in-process engines, if any) must be gone within 60 s (PR_SET_PDEATHSIG launcher).

Rewards of every phase are compared with the reference's for the same items: exactly for an item answered from the
cache before Redis was restarted (the very number the reference stored), else within a tolerance: the bound of
tests/test_fleet.py, ENGINE_FP32_TOL (tests/tolerances.py, a float32 P(yes) graded in another batch) times the
number of propositions times the sum of |weights| for the response type, the largest over response types (0.013 for
the default policy: a wrong item or a wrong grade moves a reward by far more); `--tol` overrides it. Requests,
failures, client retries and failovers (counted from rbr_client's log lines) are printed per phase.

One line per check, "ok" or "FAIL", with its numbers; exit status 1 when any check fails.

    python benchmarks/fleet_faults.py                       # 2 replicas, 8 workers, heads, 30 s phases
    python benchmarks/fleet_faults.py --no-heads --workers 2 --duration 10 --engine-down 5   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet  # noqa: E402  (benchmarks/fleet.py: the fleet and the workers; it puts tests/ on sys.path)
import httpx  # noqa: E402
import psutil  # noqa: E402
from fleet_procs import metric_value  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from tolerances import ENGINE_FP32_TOL  # noqa: E402

ENGINE_NAMES = {"generate": "the grader engine", "pooling": "the heads engine"}  # as /readyz names them
PROBE = [{"role": "user", "content": "Could you suggest a name for my new sourdough starter?"}]
RETRY_LINE = re.compile(r"; retry \d+/\d+ (on|in) ")


class RetryCounter(logging.Handler):
    """Counts rbr_client's retries (its WARNING lines): all, and those that moved to another replica at once."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.retries = self.failovers = 0

    def emit(self, record: logging.LogRecord) -> None:
        m = RETRY_LINE.search(record.getMessage())
        if m:
            self.retries += 1
            self.failovers += m.group(1) == "on"


@dataclass
class Phase:
    name: str
    records: list = field(default_factory=list)
    duration_s: float = 0.0
    crashes: list[str] = field(default_factory=list)
    retries: int = 0
    failovers: int = 0
    events: dict = field(default_factory=dict)  # monotonic times of what the fault did
    facts: dict = field(default_factory=dict)  # what the fault measured

    def counts(self) -> dict:
        ok = [r for r in self.records if r.ok]
        return {"requests": len(self.records), "answered": len(ok), "failed": len(self.records) - len(ok),
                "items": sum(r.items for r in ok), "retries": self.retries, "failovers": self.failovers,
                "worker_crashes": len(self.crashes), "duration_s": round(self.duration_s, 1)}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


# ---- running a phase ----------------------------------------------------------------------------------------------
async def run_phase(name: str, urls: list[str], args, counter: RetryCounter, fault=None) -> Phase:
    """The workers for `args.duration` s; `fault(phase)`, a coroutine, runs beside them from the start, and the
    workers go on `args.tail` s after it returns if that is later."""
    phase = Phase(name)
    groups = fleet.load_groups()
    counter.retries = counter.failovers = 0
    start = time.monotonic()
    stop_at = [start + args.duration]
    tasks = [asyncio.create_task(fleet.worker(i, urls, groups, args, lambda: time.monotonic() >= stop_at[0],
                                              phase.records)) for i in range(args.workers)]
    if fault is not None:
        await fault(phase)
        stop_at[0] = max(stop_at[0], time.monotonic() + args.tail)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    phase.crashes = [repr(r) for r in results if isinstance(r, BaseException)]
    phase.duration_s = time.monotonic() - start
    phase.retries, phase.failovers = counter.retries, counter.failovers
    c = phase.counts()
    print(f"-- {name}: {c['requests']} requests, {c['failed']} failed, {c['items']} items answered, "
          f"{c['retries']} retries ({c['failovers']} failovers), {c['worker_crashes']} worker crashes, "
          f"{c['duration_s']} s", flush=True)
    return phase


def flush(procs: dict) -> None:
    subprocess.run(["redis-cli", "-p", str(procs["redis"].port), "FLUSHALL"], check=True, capture_output=True)


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def kill_tree(pid: int) -> int:
    """SIGKILL to `pid` and every descendant of it (a crashed server and its engine processes); how many."""
    procs = descendants(pid)
    with contextlib.suppress(psutil.NoSuchProcess):
        procs.append(psutil.Process(pid))
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    return len(procs)


def restart_vllm(server) -> None:
    """The same vLLM server command again, on the same port (tests/helpers.py VLLMServer keeps it in proc.args)."""
    with contextlib.suppress(OSError):
        server._log.close()
    server._log = open(server.log_path, "ab")  # noqa: SIM115 - closed by VLLMServer.stop()
    server.proc = subprocess.Popen(server.proc.args, stdout=server._log, stderr=subprocess.STDOUT,
                                   env=os.environ.copy())


async def fresh_reward(client: httpx.AsyncClient, url: str) -> tuple[int, dict]:
    """One POST /v1/rewards of an item no one graded before, no retries: (status, body)."""
    item = {"prompt": PROBE, "completion": f"How about Clint Yeastwood? ({uuid.uuid4().hex})",
            "response_type": "comply", "rm_score": 0.0}
    try:
        r = await client.post(f"{url}/v1/rewards", json={"items": [item]})
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return -1, {"error": repr(exc)}


async def readyz(client: httpx.AsyncClient, url: str) -> tuple[int, str]:
    try:
        r = await client.get(f"{url}/readyz")
        return r.status_code, r.text
    except httpx.HTTPError as exc:
        return -1, repr(exc)


# ---- the faults ---------------------------------------------------------------------------------------------------
def redis_fault(procs: dict, urls: list[str], args):
    async def fault(phase: Phase) -> None:
        errors0 = {u: await asyncio.to_thread(metric_value, u, "rbr_cache_errors_total") for u in urls}
        await asyncio.sleep(args.fault_at)
        port = procs["redis"].port
        procs["redis"].stop()  # SIGKILL
        phase.events["redis_down"] = time.monotonic()
        await asyncio.sleep(args.redis_down)
        procs["redis"] = await asyncio.to_thread(RedisServer(port=port).start)
        phase.events["redis_up"] = time.monotonic()
        resumed: dict[str, float | None] = {}
        deadline = time.monotonic() + args.recover_timeout
        while len(resumed) < len(urls) and time.monotonic() < deadline:
            for u in urls:
                if u not in resumed and await asyncio.to_thread(metric_value, u, "rbr_cache_available") == 1:
                    resumed[u] = round(time.monotonic() - phase.events["redis_up"], 2)
            await asyncio.sleep(0.25)
        phase.facts["cache_resumed_after_s"] = {u: resumed.get(u) for u in urls}
        phase.facts["cache_errors"] = {u: await asyncio.to_thread(metric_value, u, "rbr_cache_errors_total")
                                       - errors0[u] for u in urls}  # 0: that replica never noticed the outage
    return fault


def grading_server_fault(procs: dict, urls: list[str], args, which: str):
    server = procs["vllm"][1 if which == "pooling" else 0]
    engine = ENGINE_NAMES[which]

    async def fault(phase: Phase) -> None:
        await asyncio.sleep(args.fault_at)
        phase.facts["killed_processes"] = await asyncio.to_thread(kill_tree, server.proc.pid)
        phase.events["engine_down"] = t_kill = time.monotonic()
        probes = phase.facts["probes"] = {"rewards": defaultdict(int), "readyz": defaultdict(int),
                                          "reward_200": 0, "readyz_not_naming_engine": [], "examples": []}
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < t_kill + args.engine_down:
                for u in urls:
                    status, body = await fresh_reward(client, u)
                    probes["rewards"][str(status)] += 1
                    if status == 200:
                        probes["reward_200"] += 1
                        probes["examples"].append(body)
                    status, text = await readyz(client, u)
                    probes["readyz"][str(status)] += 1
                    if status != 503 or engine not in text:
                        if time.monotonic() > t_kill + args.grace:
                            probes["readyz_not_naming_engine"].append(f"{status} {text[:200]}")
                    elif len(probes["examples"]) < 2:
                        probes["examples"].append(text[:300])
                await asyncio.sleep(0.5)
            await asyncio.to_thread(restart_vllm, server)
            phase.events["engine_restarted"] = time.monotonic()
            deadline = time.monotonic() + args.server_start_timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{server.url}/health", timeout=2)).status_code == 200:
                        break
                if server.proc.poll() is not None:
                    break
                await asyncio.sleep(0.5)
            else:
                phase.facts["server_not_back"] = True
            phase.events["engine_up"] = t_up = time.monotonic()
            ready, graded = {}, {}
            deadline = t_up + args.recover_timeout
            while (len(ready) < len(urls) or len(graded) < len(urls)) and time.monotonic() < deadline:
                for u in urls:
                    if u not in ready and (await readyz(client, u))[0] == 200:
                        ready[u] = round(time.monotonic() - t_up, 2)
                    if u not in graded and (await fresh_reward(client, u))[0] == 200:
                        graded[u] = round(time.monotonic() - t_up, 2)
                await asyncio.sleep(0.25)
        phase.facts.update(ready_after_s={u: ready.get(u) for u in urls},
                           graded_after_s={u: graded.get(u) for u in urls},
                           server_start_s=round(t_up - phase.events["engine_restarted"], 1),
                           outage_s=round(max([t_up + v for v in graded.values()] or [time.monotonic()]) - t_kill, 1))
    return fault


def replica_fault(procs: dict, args):
    victim = procs["replicas"][-1]

    async def fault(phase: Phase) -> None:
        await asyncio.sleep(args.fault_at)
        children = descendants(victim.proc.pid)
        await asyncio.to_thread(victim.kill)  # SIGKILL to the replica's process alone, as a crash
        phase.events["replica_down"] = time.monotonic()
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 60)
        phase.facts.update(killed=victim.url, children_before=[f"{p.pid} {p.name()}" for p in children],
                           children_left=[p.pid for p in alive])
    return fault


# ---- checks -------------------------------------------------------------------------------------------------------
def default_tolerance() -> float:
    from rbr_model.policy import load_policy
    from rbr_model.reward import Weights, default_weights_path

    policy, weights = load_policy(None), Weights.load(default_weights_path()).weights
    return max(ENGINE_FP32_TOL * len(policy.propositions_for(rt)) * sum(abs(w) for w in weights[rt].values())
               for rt in policy.classes)


def reference_rewards(phase: Phase) -> dict[str, list[float]]:
    ref: dict[str, list[float]] = defaultdict(list)
    for r in phase.records:
        if r.ok:
            for k, v in zip(r.keys, r.rewards, strict=True):
                if v not in ref[k]:
                    ref[k].append(v)
    return ref


def compare(phase: Phase, ref: dict[str, list[float]], tol: float, exact_before: float | None = None) -> dict:
    """Every answered item of `phase` against the reference: exactly for an item answered from the cache by a
    request that ended before `exact_before` when no request of this phase had graded it before, else within
    `tol`."""
    out = {"compared": 0, "not_in_reference": 0, "exact": 0, "exact_required": 0, "max_abs_diff": 0.0,
           "wrong": 0, "examples": []}
    graded_here: set[str] = set()
    for r in sorted((r for r in phase.records if r.ok), key=lambda r: r.end):
        for k, cached, v in zip(r.keys, r.cached, r.rewards, strict=True):
            if k not in ref:
                out["not_in_reference"] += 1
                continue
            diff = min(abs(v - x) for x in ref[k])
            must_be_exact = cached and exact_before is not None and r.end < exact_before and k not in graded_here
            out["compared"] += 1
            out["exact"] += diff == 0.0
            out["exact_required"] += must_be_exact
            out["max_abs_diff"] = max(out["max_abs_diff"], diff)
            if (must_be_exact and diff != 0.0) or diff > tol:
                out["wrong"] += 1
                if len(out["examples"]) < 3:
                    out["examples"].append({"key": k, "got": v, "reference": ref[k], "cached": cached})
            if not cached:
                graded_here.add(k)
    return out


def phase_checks(phase: Phase, cmp: dict | None, tol: float, allow_failures: bool = False) -> list[Check]:
    c = phase.counts()
    checks = [Check(f"{phase.name}: no worker crashed", not phase.crashes,
                    f"{c['worker_crashes']} crashes {phase.crashes[:2]}")]
    if not allow_failures:
        errors = sorted({r.error for r in phase.records if not r.ok})[:3]
        checks.append(Check(f"{phase.name}: every request answered", c["failed"] == 0 and c["requests"] > 0,
                            f"{c['answered']}/{c['requests']} answered, {c['retries']} retries "
                            f"({c['failovers']} failovers) {errors if errors else ''}".rstrip()))
    if cmp is not None:
        checks.append(Check(
            f"{phase.name}: rewards equal the reference's", cmp["wrong"] == 0 and cmp["compared"] > 0,
            f"{cmp['compared']} items compared ({cmp['exact']} identical, {cmp['exact_required']} required identical),"
            f" max |diff| {cmp['max_abs_diff']:.2e} (tolerance {tol:.3g}), {cmp['wrong']} wrong, "
            f"{cmp['not_in_reference']} beyond the reference {cmp['examples'] or ''}".rstrip()))
    return checks


def grading_checks(phase: Phase, which: str, args) -> list[Check]:
    f, ev = phase.facts, phase.events
    probes = f["probes"]
    engine = ENGINE_NAMES[which]
    early = [r for r in phase.records if r.ok and r.start > ev["engine_down"] and r.end < ev["engine_up"]
             and not all(r.cached)]
    failed = [r for r in phase.records if not r.ok]
    not_503 = sorted({r.error for r in failed if not r.error.startswith("503 ")})
    ready, graded = f["ready_after_s"], f["graded_after_s"]
    return [
        Check(f"{phase.name}: replicas answer 503 for a fresh item, never a reward",
              probes["reward_200"] == 0 and sum(probes["rewards"].values()) > 0,
              f"probe answers {dict(probes['rewards'])} over {args.engine_down:.0f} s down "
              f"({f['killed_processes']} processes killed) {probes['examples'][:1] if probes['reward_200'] else ''}"
              .rstrip()),
        Check(f"{phase.name}: /readyz is 503 naming {engine}", not probes["readyz_not_naming_engine"]
              and probes["readyz"].get("503", 0) > 0,
              f"readyz answers {dict(probes['readyz'])}, after {args.grace:.0f} s grace not naming it: "
              f"{probes['readyz_not_naming_engine'][:2]}; e.g. {probes['examples'][:1]}"),
        Check(f"{phase.name}: no worker got a graded reward while it was down", not early,
              f"{len(early)} requests started after the kill and answered before it was back with an uncached item"),
        Check(f"{phase.name}: worker requests failed only with 503 in the outage", not not_503,
              f"{len(failed)} of {len(phase.records)} failed after {phase.retries} retries, "
              f"other errors: {not_503[:2]}"),
        Check(f"{phase.name}: replicas recover by themselves", None not in ready.values()
              and None not in graded.values() and not f.get("server_not_back"),
              f"server back {f['server_start_s']} s after restart; then ready after {ready} s, graded after "
              f"{graded} s; outage {f['outage_s']} s from kill to grading on every replica"),
    ]


async def main_async(args, procs: dict, counter: RetryCounter) -> tuple[list[Check], dict]:
    urls = [r.url for r in procs["replicas"]]
    tol = args.tol if args.tol is not None else default_tolerance()
    which = args.grading_server if args.grading_server != "auto" else ("pooling" if args.heads else "generate")
    if which == "pooling" and not args.heads:
        raise SystemExit("--grading-server pooling needs heads (no pooling server runs with --no-heads)")
    checks: list[Check] = []
    report: dict = {"tolerance": tol, "grading_server": which, "phases": {}}

    reference = await run_phase("reference", urls, args, counter)
    checks += phase_checks(reference, None, tol)
    ref = reference_rewards(reference)

    redis = await run_phase("redis restart", urls, args, counter, redis_fault(procs, urls, args))
    cmp = compare(redis, ref, tol, exact_before=redis.events.get("redis_down"))
    checks += phase_checks(redis, cmp, tol)
    resumed = redis.facts.get("cache_resumed_after_s", {})
    checks.append(Check("redis restart: replicas use the cache again", bool(resumed) and None not in resumed.values(),
                        f"cache available again after {resumed} s (down {args.redis_down:.0f} s; "
                        f"cache errors seen per replica {redis.facts.get('cache_errors')})"))
    report["phases"][redis.name] = {"compare": cmp}

    flush(procs)
    grading = await run_phase(f"{which} server down", urls, args, counter,
                              grading_server_fault(procs, urls, args, which))
    cmp = compare(grading, ref, tol)
    checks += phase_checks(grading, cmp, tol, allow_failures=True) + grading_checks(grading, which, args)
    report["phases"][grading.name] = {"compare": cmp}

    flush(procs)
    kill = await run_phase("replica killed", urls, args, counter, replica_fault(procs, args))
    cmp = compare(kill, ref, tol)
    checks += phase_checks(kill, cmp, tol)
    checks.append(Check("replica killed: the client failed over", kill.failovers > 0,
                        f"{kill.failovers} immediate moves to another replica, {kill.retries} retries in all"))
    left = kill.facts["children_left"]
    checks.append(Check("replica killed: none of its child processes left", not left,
                        f"{len(kill.facts['children_before'])} children before the kill "
                        f"{kill.facts['children_before'][:4]}, {len(left)} left after 60 s"))
    report["phases"][kill.name] = {"compare": cmp}

    for phase in (reference, redis, grading, kill):
        t0 = min((r.start for r in phase.records), default=0.0)
        report["phases"].setdefault(phase.name, {}).update(
            counts=phase.counts(), facts=phase.facts, events_s={k: round(v - t0, 2) for k, v in phase.events.items()})
    return checks, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2, help="rbr serve replicas, at least 2 (default 2)")
    p.add_argument("--workers", type=int, default=8, help="GRPO workers, half /v1/rewards, half /get_reward (8)")
    p.add_argument("--duration", type=float, default=30, help="seconds of load per phase, at least (default 30)")
    p.add_argument("--fault-at", type=float, default=None, help="seconds into a phase to inject (default duration/3)")
    p.add_argument("--group", type=int, default=8, help="completions per request (default 8)")
    p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=True,
                   help="heads on a vLLM pooling server (default; --no-heads: one vLLM server, prompts only)")
    p.add_argument("--repeat-share", type=float, default=0.3, help="share of repeated completions (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="the workers' seed, the same in every phase (default 0)")
    p.add_argument("--grading-server", choices=("auto", "generate", "pooling"), default="auto",
                   help="which vLLM server to kill (auto: pooling with heads, else generate)")
    p.add_argument("--engine-down", type=float, default=15, help="seconds the grading server stays down (15)")
    p.add_argument("--grace", type=float, default=2,
                   help="seconds after the kill before /readyz must say so (its health check may be in flight; 2)")
    p.add_argument("--redis-down", type=float, default=3, help="seconds Redis stays down (default 3)")
    p.add_argument("--server-start-timeout", type=float, default=900, help="for the restarted vLLM server (900)")
    p.add_argument("--recover-timeout", type=float, default=120,
                   help="seconds for replicas to become ready and grade again once the server is back (120)")
    p.add_argument("--tail", type=float, default=5, help="seconds of load after a fault is over (default 5)")
    p.add_argument("--tol", type=float, default=None, help="reward tolerance for regraded items (default: derived)")
    p.add_argument("--json", type=Path, help="write the report (checks, counts, timings) to this file")
    args = p.parse_args()
    if args.replicas < 2:
        p.error("--replicas must be at least 2: a client fails over to another replica")
    if args.fault_at is None:
        args.fault_at = args.duration / 3
    for k, v in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1")):
        os.environ.setdefault(k, v)
    # one request to the grading servers may wait long on a loaded CPU; a timeout would be a 503 for the wrong reason
    os.environ.setdefault("RBR_REMOTE_TIMEOUT_S", "900")

    counter = RetryCounter()
    client_log = logging.getLogger("rbr.client")
    client_log.addHandler(counter)
    client_log.setLevel(logging.WARNING)
    client_log.propagate = False  # counted, not printed

    fleet.stop_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="rbr-faults-"))
    print(f"logs in {work}", flush=True)
    procs: dict = {}
    checks: list[Check] = []
    report: dict = {}
    try:
        t0 = time.monotonic()
        fleet.start_fleet(args, work, procs)
        print(f"fleet up in {time.monotonic() - t0:.0f} s: replicas {[r.url for r in procs['replicas']]}",
              flush=True)
        checks, report = asyncio.run(main_async(args, procs, counter))
    finally:
        fleet.stop_fleet(procs)
    print()
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks ok", flush=True)
    if args.json:
        report.update(checks=[{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
                      args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      machine=f"{platform.machine()}, {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d"),
                      logs=str(work))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"report: {args.json}")
    sys.exit(1 if failed or not checks else 0)


if __name__ == "__main__":
    main()
