"""Build the RL-shaped grading workload for `bench_grading.py` from a `rbr synth` run.

An RL trainer grades several sampled completions per prompt (OpenRLHF's `n_samples_per_prompt`, GRPO's group).
A synth run has the same shape: each refusal prompt of our prompt set has one completion per ordering label
(7 for hard refusals, 7 for safe ones), written by the behaviour policy. This script writes those groups in
the gold-set JSONL shape that `bench_grading.py --data` reads, every row marked `hard_refuse` so one response
type's propositions grade them all (the row's own type is kept in `source_response_type`).

    python benchmarks/make_rl_groups.py out/synth-full/completions.jsonl benchmarks/data/rl_groups.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "rbr_model/data/prompts.jsonl"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("completions", help="completions.jsonl of a `rbr synth` run made with stored text")
    p.add_argument("out", help="JSONL to write (prompt, completion, response_type, source_response_type)")
    p.add_argument("--prompts", default=str(PROMPTS), help="the prompt set the synth run used")
    args = p.parse_args(argv)

    prompts = {}
    for line in Path(args.prompts).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompts[row["prompt_id"]] = row
    out = []
    for line in Path(args.completions).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["response_type"] == "comply" or row.get("status") != "accepted" or not row.get("completion"):
            continue
        if row["prompt_id"] not in prompts:
            raise SystemExit(f"{args.completions}: prompt_id {row['prompt_id']!r} is not in {args.prompts}")
        out.append({
            "response_type": "hard_refuse",
            "source_response_type": row["response_type"],
            "prompt_id": row["prompt_id"],
            "completion_label": row["completion_label"],
            "prompt": prompts[row["prompt_id"]]["messages"],
            "completion": [{"role": "assistant", "content": row["completion"]}],
        })
    out.sort(key=lambda r: (r["prompt_id"], r["completion_label"]))
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    groups = len({r["prompt_id"] for r in out})
    print(f"wrote {len(out)} completions of {groups} prompts to {args.out}")


if __name__ == "__main__":
    main()
