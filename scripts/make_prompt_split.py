"""Write the held-out train/eval split of the packaged prompt set (rbr_model/data/prompt_split.json).

Stratified by response type: exactly --eval-per-type prompts of each type go to `eval`, the rest to `train`.
Within a type the eval prompts are spread over its categories in proportion to their sizes (largest remainder,
ties broken at random), and drawn at random inside each category; everything is seeded, so the same prompt file
and seed always give the same split.

    .venv/bin/python scripts/make_prompt_split.py            # rewrite the split file
    .venv/bin/python scripts/make_prompt_split.py --check    # fail if the file is not what the script makes
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "rbr_model/data/prompts.jsonl"
SPLIT = ROOT / "rbr_model/data/prompt_split.json"
SEED = 15
EVAL_PER_TYPE = 40


def eval_quota(sizes: dict[str, int], n_eval: int, rng: random.Random) -> dict[str, int]:
    """Eval prompts per category: proportional to size, remainders to the largest fractions (random ties)."""
    total = sum(sizes.values())
    exact = {cat: n_eval * n / total for cat, n in sizes.items()}
    quota = {cat: int(x) for cat, x in exact.items()}
    cats = sorted(sizes)
    rng.shuffle(cats)  # random order first, then a stable sort by remainder: ties stay in random order
    cats.sort(key=lambda c: exact[c] - quota[c], reverse=True)
    for cat in cats[: n_eval - sum(quota.values())]:
        quota[cat] += 1
    return quota


def make_split(rows: list[dict], seed: int = SEED, eval_per_type: int = EVAL_PER_TYPE) -> dict:
    rng = random.Random(seed)
    by_type: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_type[row["response_type"]][row["category"]].append(row["prompt_id"])
    eval_ids: set[str] = set()
    for rt in sorted(by_type):
        cats = by_type[rt]
        n = sum(map(len, cats.values()))
        if n <= eval_per_type:
            raise SystemExit(f"{rt}: only {n} prompts, need more than {eval_per_type}")
        quota = eval_quota({c: len(ids) for c, ids in cats.items()}, eval_per_type, rng)
        for cat in sorted(cats):
            eval_ids.update(rng.sample(sorted(cats[cat]), quota[cat]))
    order = [row["prompt_id"] for row in rows]
    return {
        "description": (
            f"Held-out split of rbr_model/data/prompts.jsonl, made by scripts/make_prompt_split.py: "
            f"{eval_per_type} eval prompts per response type, spread over each type's categories in proportion "
            "to their sizes; every other prompt is train. Fit weights on train (rbr synth --split train) and "
            "keep eval for measuring them."),
        "seed": seed,
        "train": [pid for pid in order if pid not in eval_ids],
        "eval": [pid for pid in order if pid in eval_ids],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, default=PROMPTS, help="prompt JSONL (default: the packaged set)")
    p.add_argument("--out", type=Path, default=SPLIT, help="split JSON to write (default: the packaged one)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--eval-per-type", type=int, default=EVAL_PER_TYPE)
    p.add_argument("--check", action="store_true", help="only check that --out holds what would be written")
    args = p.parse_args(argv)

    rows = [json.loads(line) for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = json.dumps(make_split(rows, args.seed, args.eval_per_type), indent=1) + "\n"
    if args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
            sys.exit(f"{args.out} is out of date: run scripts/make_prompt_split.py")
        print(f"{args.out} is up to date")
        return
    args.out.write_text(text, encoding="utf-8")
    split = json.loads(text)
    print(f"wrote {args.out}: {len(split['train'])} train, {len(split['eval'])} eval prompts")


if __name__ == "__main__":
    main()
