"""Sweep the scale-out fleet over workers and replicas, and say what each stage costs (issue #22 item 5).

For each replica count in `--replicas` the fleet of benchmarks/fleet.py (vLLM generate server, vLLM pooling server
unless `--no-heads`, one redis-server, N `rbr serve` replicas with RBR_ENGINE=remote) starts ONCE; then, for each
worker count in `--workers`, the same GRPO-shaped load as fleet.py runs for `--duration` seconds (the feature cache is
flushed before each step, unless `--keep-cache`, so that every step starts cold and steps compare; each step draws
its own seed). Per step, one JSON line with:

- completions/s, p50/p99 latency, cache hit rate, failed requests (fleet.py's summary of that step);
- `cpu_s`: CPU seconds each process group consumed during the step, read from /proc/<pid>/stat (utime + stime of the
  process and of every live descendant: the vLLM servers' EngineCore and worker processes count with their server):
  `api` (the replicas), `vllm_generate`, `vllm_pooling`, `redis`, `load` (this process: the workers), and `other`
  (the rest of the machine's busy time from /proc/stat: anything else running; keep it near 0 for clean figures);
  `cores` is the same divided by the step's seconds, `cpu_s_per_completion` divided by its completions;
- `vllm`: per vLLM server, prompt tokens and requests (passes) during the step, and per completion, from the
  server's /metrics: what a GPU fleet would have to process per completion;
- `stage_s`: seconds the replicas spent per pipeline stage (rbr_stage_duration_seconds, summed over requests).

A final `summary` line gives, per replica count, the saturation point (the first worker count after which doubling
the workers adds under 10% throughput) and the process group using the most CPU there (what saturates). The plot
(`--plot`): completions/s and p50/p99 vs workers, one line per replica count, and each step's CPU share per stage.

    python benchmarks/fleet_sweep.py                        # replicas 1,2,3 x workers 1..64, 30 s each
    python benchmarks/fleet_sweep.py --quick                # smoke: 1 replica, workers 1,2, 10 s each
    python benchmarks/fleet_sweep.py --plot-only out/fleet_sweep.jsonl   # redraw the plot from the JSON lines
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet  # noqa: E402  (benchmarks/fleet.py: the fleet and the workers)
import httpx  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
GROUPS = ("api", "vllm_generate", "vllm_pooling", "redis", "load", "other")
GAIN = 1.10  # a step whose next doubling of workers adds less than 10% throughput is the saturation point


# ---- CPU accounting from /proc ------------------------------------------------------------------------------------
def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds it has used: utime + stime, all its threads) for every process now alive."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def tree_cpu(table: dict[int, tuple[int, float]], roots: list[int]) -> float:
    """CPU seconds of `roots` and all their live descendants."""
    children = defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        todo += children[pid]
    return sum(table[p][1] for p in seen)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, idle and iowait excluded)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK  # user nice system idle iowait irq softirq steal


def cpu_snapshot(procs: dict) -> dict[str, float]:
    """CPU seconds used so far per process group of the fleet (see the module's docstring)."""
    table = proc_table()
    vllm = procs["vllm"]
    snap = {
        "api": tree_cpu(table, [r.proc.pid for r in procs["replicas"] if r.proc is not None]),
        "vllm_generate": tree_cpu(table, [vllm[0].proc.pid]),
        "vllm_pooling": tree_cpu(table, [vllm[1].proc.pid]) if len(vllm) > 1 else 0.0,
        "redis": tree_cpu(table, [procs["redis"].proc.pid]),
        "load": table.get(os.getpid(), (0, 0.0))[1],  # this process alone: its descendants are the fleet
    }
    snap["machine"] = machine_busy_s()
    return snap


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {k: max(0.0, after[k] - before[k]) for k in before}
    machine = delta.pop("machine")
    delta["other"] = max(0.0, machine - sum(delta.values()))
    return delta


# ---- /metrics counters --------------------------------------------------------------------------------------------
def metric_sums(url: str, names: tuple[str, ...], by: str | None = None) -> dict[str, float]:
    """Samples of `names` on `url`/metrics summed over their labels (or per value of label `by`, as "name|value")."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    sums: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                label = f"|{sample.labels.get(by, '')}" if by else ""
                sums[sample.name + label] += float(sample.value)
    return dict(sums)


VLLM_COUNTERS = ("vllm:prompt_tokens_total", "vllm:request_success_total")


def counters(procs: dict) -> dict:
    """What the vLLM servers processed and where the replicas spent their time, so far."""
    names = ["vllm_generate", "vllm_pooling"]
    out = {"vllm": {names[i]: metric_sums(s.url, VLLM_COUNTERS) for i, s in enumerate(procs["vllm"])},
           "stage": defaultdict(float), "engine_prompts": 0.0}
    for r in procs["replicas"]:
        for k, v in metric_sums(r.url, ("rbr_stage_duration_seconds_sum",), by="stage").items():
            out["stage"][k.split("|", 1)[1]] += v
        out["engine_prompts"] += metric_sums(r.url, ("rbr_engine_prompts_total",)).get("rbr_engine_prompts_total", 0)
    return out


def counters_delta(before: dict, after: dict, completions: int) -> dict:
    per = (lambda v: round(v / completions, 3)) if completions else (lambda v: None)
    vllm = {}
    for name, now in after["vllm"].items():
        was = before["vllm"].get(name, {})
        tokens = now.get(VLLM_COUNTERS[0], 0) - was.get(VLLM_COUNTERS[0], 0)
        requests = now.get(VLLM_COUNTERS[1], 0) - was.get(VLLM_COUNTERS[1], 0)
        vllm[name] = {"prompt_tokens": tokens, "requests": requests, "prompt_tokens_per_completion": per(tokens),
                      "requests_per_completion": per(requests)}
    prompts = after["engine_prompts"] - before["engine_prompts"]
    return {"vllm": vllm, "grading_prompts": prompts, "grading_prompts_per_completion": per(prompts),
            "stage_s": {k: round(v - before["stage"].get(k, 0.0), 2) for k, v in after["stage"].items()}}


# ---- the sweep ----------------------------------------------------------------------------------------------------
def flush_cache(procs: dict) -> None:
    subprocess.run(["redis-cli", "-p", str(procs["redis"].port), "FLUSHALL"], check=True, capture_output=True)


def step(procs: dict, args, replicas: int, workers: int, seed: int) -> dict:
    """One load step on the running fleet: fleet.py's summary plus the cost split."""
    urls = [r.url for r in procs["replicas"]]
    step_args = argparse.Namespace(**{**vars(args), "replicas": replicas, "workers": workers, "seed": seed})
    if not args.keep_cache:
        flush_cache(procs)
    cache0, count0, cpu0 = fleet.cache_counts(urls), counters(procs), cpu_snapshot(procs)
    records, duration = asyncio.run(fleet.play(urls, step_args))
    cpu = cpu_delta(cpu0, cpu_snapshot(procs))
    summary = fleet.summarize(records, duration, urls, step_args, cache_before=cache0)
    n = summary["completions"]
    fleet_total = sum(v for k, v in cpu.items() if k != "other")
    summary.update(
        kind="step", seed=seed,
        cpu_s={k: round(v, 2) for k, v in cpu.items()},
        cores={k: round(v / duration, 3) for k, v in cpu.items()},
        cpu_share={k: round(cpu[k] / fleet_total, 3) if fleet_total else None for k in GROUPS if k != "other"},
        cpu_s_per_completion={k: round(v / n, 4) if n else None for k, v in cpu.items()},
        machine_cores=os.cpu_count(),
        **counters_delta(count0, counters(procs), n))
    return summary


def saturation(steps: list[dict]) -> list[dict]:
    """Per replica count: the saturation point and the process group using the most CPU there."""
    out = []
    for r in sorted({s["replicas"] for s in steps}):
        rows = sorted((s for s in steps if s["replicas"] == r), key=lambda s: s["workers"])
        best = max(rows, key=lambda s: s["completions_per_s"])
        at = next((a for a, b in zip(rows, rows[1:], strict=False)
                   if b["completions_per_s"] < GAIN * a["completions_per_s"]), rows[-1])
        fleet_cores = {k: v for k, v in at["cores"].items() if k != "other"}
        top = max(fleet_cores, key=fleet_cores.get)
        out.append({"kind": "summary", "replicas": r, "saturation_workers": at["workers"],
                    "completions_per_s_there": at["completions_per_s"], "latency_p99_s_there": at["latency_p99_s"],
                    "max_completions_per_s": best["completions_per_s"], "max_at_workers": best["workers"],
                    "busiest_group": top, "busiest_group_cores": fleet_cores[top],
                    "fleet_cores": round(sum(fleet_cores.values()), 2), "other_cores": at["cores"].get("other"),
                    "machine_cores": at["machine_cores"],
                    "saturated_by": "machine CPU" if sum(at["cores"].values()) > 0.9 * at["machine_cores"]
                    else f"{top} (machine CPU not full)"})
    return out


def plot(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_l, ax_c) = plt.subplots(1, 3, figsize=(17, 4.8))
    for r in sorted({s["replicas"] for s in steps}):
        rows = sorted((s for s in steps if s["replicas"] == r), key=lambda s: s["workers"])
        w = [s["workers"] for s in rows]
        ax_t.plot(w, [s["completions_per_s"] for s in rows], "o-", label=f"{r} replica(s)")
        line = ax_l.plot(w, [s["latency_p99_s"] for s in rows], "o-", label=f"p99, {r} replica(s)")[0]
        ax_l.plot(w, [s["latency_p50_s"] for s in rows], "x--", color=line.get_color(), label=f"p50, {r}")
    for ax, title, ylabel in ((ax_t, "throughput", "completions/s"), (ax_l, "latency per request", "seconds")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_ylim(bottom=0)  # from 0: a noisy flat line must look flat
        ax.set_xlabel("workers")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ordered = sorted(steps, key=lambda s: (s["replicas"], s["workers"]))
    labels = [f"{s['replicas']}r/{s['workers']}w" for s in ordered]
    bottom = [0.0] * len(ordered)
    for g in GROUPS:
        vals = [s["cores"].get(g, 0.0) for s in ordered]
        ax_c.bar(labels, vals, bottom=bottom, label=g)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    if ordered:
        ax_c.axhline(ordered[0]["machine_cores"], color="k", lw=0.8, ls=":", label="machine cores")
    ax_c.set_ylabel("CPU cores used (CPU s / s)")
    ax_c.set_title("cost split per stage")
    ax_c.tick_params(axis="x", rotation=70, labelsize=7)
    ax_c.legend(fontsize=7)
    machine = ordered[0].get("machine", "") if ordered else ""
    fig.suptitle(f"rbr-serve fleet sweep ({machine}; heads={ordered[0]['heads'] if ordered else ''})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=ints, default=[1, 2, 3], help="replica counts, comma-separated (default 1,2,3)")
    p.add_argument("--workers", type=ints, default=[1, 2, 4, 8, 16, 32, 64],
                   help="worker counts per replica count, comma-separated (default 1,2,4,8,16,32,64)")
    p.add_argument("--duration", type=float, default=30, help="seconds of load per step (default 30)")
    p.add_argument("--group", type=int, default=8, help="completions per request (GRPO group size; default 8)")
    p.add_argument("--heads", action=argparse.BooleanOptionalAction, default=True,
                   help="grade headed propositions on a vLLM pooling server (default; --no-heads: one vLLM server)")
    p.add_argument("--repeat-share", type=float, default=0.3,
                   help="share of sampled completions that repeat a stored one (default 0.3)")
    p.add_argument("--keep-cache", action="store_true",
                   help="do not flush Redis before each step (later steps then hit what earlier ones graded)")
    p.add_argument("--seed", type=int, default=0, help="base seed; step k draws with seed + k (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke: --replicas 1 --workers 1,2 --duration 10")
    p.add_argument("--out", type=Path, default=Path("out/fleet_sweep.jsonl"),
                   help="JSON lines, appended: one per step, one summary per replica count (default %(default)s)")
    p.add_argument("--plot", type=Path, default=None, help="the PNG (default: --out with .png)")
    p.add_argument("--plot-only", type=Path, metavar="JSONL", help="redraw the plot from these JSON lines, run nothing")
    args = p.parse_args()
    plot_path = args.plot or (args.plot_only or args.out).with_suffix(".png")
    if args.plot_only:
        rows = [json.loads(x) for x in args.plot_only.read_text().splitlines() if x.strip()]
        steps = [r for r in rows if r.get("kind") == "step"]
        for line in saturation(steps):
            print(json.dumps(line))
        plot(steps, plot_path)
        return
    if args.quick:
        args.replicas, args.workers, args.duration = [1], [1, 2], 10.0
    for k, v in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1")):
        os.environ.setdefault(k, v)
    # one request to the grading servers may wait long at 64 workers; a timeout would be a 503 for the wrong reason
    os.environ.setdefault("RBR_REMOTE_TIMEOUT_S", "900")

    fleet.stop_on_sigterm()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    steps: list[dict] = []
    seed = args.seed
    for replicas in args.replicas:
        work = Path(tempfile.mkdtemp(prefix=f"rbr-sweep-{replicas}r-"))
        print(f"== {replicas} replica(s); logs in {work}", flush=True)
        procs: dict = {}
        try:
            t0 = time.monotonic()
            fleet.start_fleet(argparse.Namespace(**{**vars(args), "replicas": replicas}), work, procs)
            up_s = round(time.monotonic() - t0, 1)
            print(f"fleet up in {up_s:.0f} s", flush=True)
            for workers in args.workers:
                seed += 1
                row = step(procs, args, replicas, workers, seed)
                row.update(fleet_start_s=up_s, machine=machine, date=time.strftime("%Y-%m-%d"))
                steps.append(row)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                cores = " ".join(f"{k}={v:.2f}" for k, v in row["cores"].items())
                print(f"{replicas}r {workers:>3}w: {row['completions_per_s']:8.2f} completions/s  "
                      f"p50 {row['latency_p50_s']:.2f} s  p99 {row['latency_p99_s']:.2f} s  "
                      f"hits {row['cache_hit_rate_answers']}  failed {row['failed_requests']}/{row['requests']}  "
                      f"cores: {cores}", flush=True)
        finally:
            fleet.stop_fleet(procs)
    summaries = saturation(steps) if steps else []
    with open(args.out, "a") as fh:
        for line in summaries:
            fh.write(json.dumps(line) + "\n")
            print(json.dumps(line))
    print(f"JSON lines: {args.out}", flush=True)
    if steps:
        plot(steps, plot_path)


if __name__ == "__main__":
    main()
