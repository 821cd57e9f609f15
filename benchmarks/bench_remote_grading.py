"""Remote grading: the Grader sending ready prompts in batches against one prompt per HTTP request.

One real vLLM OpenAI-compatible server (the embedded model, float32, prefix caching on) and one `RemoteEngine`.
before: `batch_size=1`, what the Grader did until issue #14 (each judgment its own `/v1/completions` request).
after: the engine's `batch_size` (32): the Grader groups the prompts one call has ready.
Workload: N conversations of one response type, every proposition it needs, all in one `Grader.grade` call (as
the service sends a request's misses). A warm-up pass fills the server's prefix cache first, then the two modes
alternate `--rounds` times on the same prompts, so both see the same cache. Reported: judgments/s per mode, HTTP
requests per mode, the ratio after/before from the same run, and the largest P(yes) difference between modes.

    python benchmarks/bench_remote_grading.py --items 16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_grading import BUILTIN  # noqa: E402
from helpers import SERVED_NAME, VLLMServer  # noqa: E402  (tests/helpers.py: the tests' vLLM server)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=16, help="conversations graded per round")
    p.add_argument("--response-type", default="hard_refuse")
    p.add_argument("--rounds", type=int, default=3, help="alternating before/after rounds")
    p.add_argument("--batch-size", type=int, default=32, help="RemoteEngine.batch_size for 'after'")
    return p.parse_args(argv)


async def main(args: argparse.Namespace) -> dict:
    from rbr_model import models
    from rbr_model.grading.grader import Grader
    from rbr_model.grading.remote_engine import RemoteEngine
    from rbr_model.grading.vllm_engine import cpu_engine_env
    from rbr_model.policy import load_policy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    cpu_engine_env()
    model = models.prepare()
    policy = load_policy(None)
    props = list(policy.propositions_for(args.response_type))
    items = [([{"role": "user", "content": f"{q} (case {i})"}], a, props)
             for i, (q, a) in enumerate(BUILTIN[i % len(BUILTIN)] for i in range(args.items))]
    server = VLLMServer(model, Path(tempfile.mkdtemp()) / "vllm.log")
    server.wait_ready(timeout=900)
    url = server.url
    requests = 0

    async def count(request: httpx.Request) -> None:
        nonlocal requests
        requests += request.url.path == "/v1/completions"

    try:
        client = httpx.AsyncClient(base_url=url, timeout=600, event_hooks={"request": [count]},
                                   limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        async with RemoteEngine(url, SERVED_NAME, tokenizer=model, batch_size=args.batch_size, client=client) as engine:
            grader = Grader(engine, policy)
            await grader.grade(items)  # warm-up: fills the prefix cache for both modes
            times: dict[str, list[float]] = {"before": [], "after": []}
            sent: dict[str, int] = {}
            results: dict[str, list] = {}
            for _ in range(args.rounds):
                for mode, size in (("before", 1), ("after", args.batch_size)):
                    engine.batch_size = size
                    requests = 0
                    start = time.perf_counter()
                    results[mode] = await grader.grade(items)
                    times[mode].append(time.perf_counter() - start)
                    sent[mode] = requests
        await client.aclose()
    finally:
        server.stop()
    n = len(items) * len(props)
    diff = max(abs(a[k] - b[k]) for a, b in zip(results["before"], results["after"], strict=True) for k in a)
    median = {m: statistics.median(t) for m, t in times.items()}
    return {"judgments": n, "rounds": args.rounds, "batch_size": args.batch_size,
            "judgments_per_s": {m: round(n / t, 2) for m, t in median.items()},
            "http_requests": sent, "speedup_after_over_before": round(median["before"] / median["after"], 2),
            "max_p_yes_diff": diff, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


if __name__ == "__main__":
    figures = asyncio.run(main(parse_args()))
    for key, value in figures.items():
        print(f"{key}: {value}")
