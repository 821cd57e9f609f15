"""Heads vs the prompted grader: completions per second and prefill tokens per completion, same engine family,
same completions, every proposition of one response type.

- prompted: `Grader` on a `VLLMEngine` (prefix caching on, as the service runs it), every judgment in flight.
- heads, mixed: `Grader` with the packaged heads and the trunk's pooling engine; the propositions without a
  head still go to the prompted engine (what the service does by default).
- heads only: the headed propositions alone (one trunk pass per completion, nothing prompted).
The prompted engine's prefix cache is reset between runs, so no run reuses another's work. Rates are measured
in one process, one run after the other; compare them as ratios.

    python benchmarks/bench_heads.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_grading import GOLD, _cpu_env, cpu_seconds, load_items  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--response-type", default="hard_refuse", help="grade every proposition of this type")
    p.add_argument("--conversations", type=int, default=32, help="number of conversations")
    p.add_argument("--completions-per-conversation", type=int, default=1)
    p.add_argument("--data", default=str(GOLD), help="JSONL with prompt/completion/response_type (OpenAI gold)")
    p.add_argument("--heads", default=None, help="heads file (default: the packaged heads)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--dtype", default=None, help="prompted engine dtype (default: vLLM's choice for this CPU)")
    p.add_argument("--layout", default=None, help="unused (bench_grading's loader reads it)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


async def timed(grader, items, desc: str) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="completion")

    async def one(item):
        res = await grader.grade_judgments([item])
        bar.update(1)
        return res[0]

    cpu0, start = cpu_seconds(), time.perf_counter()
    results = await asyncio.gather(*(one(it) for it in items))
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    bar.close()
    prompted = [j for res, it in zip(results, items, strict=True) for n, j in res.items()
                if grader.method(n) == "prompt"]
    computed = sum(j.prompt_tokens - (j.cached_tokens or 0) for j in prompted)
    head_tokens = 0
    if grader.heads is not None:
        from rbr_model.heads import build_input

        head_tokens = sum(len(build_input(grader.state_engine.tokenizer, c, a, grader.state_engine.max_model_len).ids)
                          for c, a, names in items if any(grader.method(n) == "head" for n in names))
    return {"completions": len(items), "wall_s": wall, "cpu_s": cpu, "completions_per_s": len(items) / wall,
            "cpu_s_per_completion": cpu / len(items),
            "prefill_tokens_per_completion": (computed + head_tokens) / len(items),
            "prompted_judgments_per_completion": len(prompted) / len(items),
            "results": results}


def max_diff(a: list[dict], b: list[dict]) -> float:
    return max((abs(x[n].p_yes - y[n].p_yes) for x, y in zip(a, b, strict=True) for n in x if n in y), default=0.0)


async def main(args) -> dict:
    from rbr_model import models
    from rbr_model.grading import Grader
    from rbr_model.grading.states import VLLMStateEngine
    from rbr_model.grading.vllm_engine import VLLMEngine
    from rbr_model.heads import Heads, packaged_heads_path
    from rbr_model.policy import load_policy

    policy = load_policy(None)
    heads = Heads.load(args.heads or packaged_heads_path())
    engine = VLLMEngine(models.prepare(), max_model_len=args.max_model_len, dtype=args.dtype)
    states = VLLMStateEngine(models.prepare_trunk(int(heads.grader["layer"])), max_model_len=args.max_model_len)
    try:
        pairs, n_conv, props, source, skipped, _ = load_items(args, policy, engine.tokenizer)
        headed = [p for p in props if p in heads]
        print(f"{len(pairs)} completions ({n_conv} conversations from {source}, {skipped} too long skipped); "
              f"{args.response_type}: {len(props)} propositions, {len(headed)} with heads")
        prompted = Grader(engine, policy, max_in_flight=args.max_in_flight)
        mixed = Grader(engine, policy, max_in_flight=args.max_in_flight, heads=heads, state_engine=states)
        runs = {}
        for name, grader, names in (("prompted", prompted, props), ("heads_mixed", mixed, props),
                                    ("heads_only", mixed, headed)):
            await engine._llm.reset_prefix_cache()
            runs[name] = await timed(grader, [(c, a, list(names)) for c, a in pairs], name)
        agree = max_diff([{n: j for n, j in r.items() if mixed.method(n) == "prompt"}
                          for r in runs["heads_mixed"]["results"]], runs["prompted"]["results"])
    finally:
        await states.close()
        await engine.close()
    for r in runs.values():
        r.pop("results")
    base = runs["prompted"]
    fig = {
        "machine": f"{platform.node()} {platform.machine()} ({__import__('os').cpu_count()} CPUs)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "response_type": args.response_type, "propositions": len(props), "headed": len(headed),
        "completions": len(pairs), "runs": runs,
        "speedup_heads_mixed": runs["heads_mixed"]["completions_per_s"] / base["completions_per_s"],
        "speedup_heads_only": runs["heads_only"]["completions_per_s"] / base["completions_per_s"],
        "prefill_ratio_heads_only": base["prefill_tokens_per_completion"]
        / runs["heads_only"]["prefill_tokens_per_completion"],
        "max_prompted_p_diff_mixed_vs_prompted": agree,
    }
    return fig


def report(fig: dict) -> str:
    lines = [f"{fig['completions']} completions, {fig['response_type']}: {fig['propositions']} propositions "
             f"({fig['headed']} headed); {fig['machine']}, {fig['date']}",
             f"{'run':<12} {'compl/s':>8} {'cpu s/compl':>11} {'prefill tok/compl':>17} {'prompted/compl':>14}"]
    for name, r in fig["runs"].items():
        lines.append(f"{name:<12} {r['completions_per_s']:>8.2f} {r['cpu_s_per_completion']:>11.2f} "
                     f"{r['prefill_tokens_per_completion']:>17.0f} {r['prompted_judgments_per_completion']:>14.1f}")
    lines.append(f"speed-up vs prompted: heads only {fig['speedup_heads_only']:.1f}x, mixed "
                 f"{fig['speedup_heads_mixed']:.1f}x; prefill tokens {fig['prefill_ratio_heads_only']:.1f}x fewer "
                 f"(heads only); prompted P(yes) in the mixed run vs alone: max |diff| "
                 f"{fig['max_prompted_p_diff_mixed_vs_prompted']:.1e}")
    return "\n".join(lines)


if __name__ == "__main__":
    _cpu_env()
    cli = parse_args()
    figures = asyncio.run(main(cli))
    print(report(figures))
    if cli.json:
        Path(cli.json).write_text(json.dumps(figures, indent=1) + "\n")
