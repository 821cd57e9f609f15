"""Write the ranking the default weights are fitted on (`rbr fit --data ... --orderings ...`).

From an `rbr eval reward --cv` output folder (every probability out of fold: no row graded by a head that saw it):

  gold rows       OpenAI's gold train rows labelled with their human class; pairs of different classes within
                  one (response type, fold) group, ranked by the policy's class order;
  synthetic rows  the weak-label rows whose order is certain by construction, on the same prompt: a forced
                  refusal beats forced compliance on a refuse prompt; an answer without an insult, a
                  first-person refusal, a hedged safe response and, on a hard-refuse prompt, a refusal that says it
                  cannot help beat their matched opposite
                  (rbr_model.reward_eval.CERTAIN_PAIRS).

    python scripts/make_ranking_rows.py out/reward-cv --out rbr_model/data/ranking_rows.jsonl \
        --orderings-out rbr_model/data/ranking_orderings.yaml

With `--rm`, every row's `rm_score` is the embedded helpful-only reward model's score of its completion (through
the in-process vLLM RM engine, as the service serves it), so `rbr fit` without `--no-rm` fits weights on top of that
RM, as the paper does: the total must rank, not the RBR alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("run", type=Path, help="an `rbr eval reward --cv` output folder")
    ap.add_argument("--out", type=Path, default=Path("out/ranking_rows.jsonl"), help="fit rows to write")
    ap.add_argument("--rm", action="store_true",
                    help="score every completion with the embedded helpful-only RM and keep it as rm_score")
    ap.add_argument("--orderings-out", type=Path, default=Path("out/ranking_orderings.yaml"),
                    help="orderings to write")
    args = ap.parse_args(argv)

    from rbr_model.policy import load_policy
    from rbr_model.reward_eval import EXTRA_ROWS_FILE, ROWS_FILE, ranking_orderings, ranking_rows

    policy = load_policy()
    gold = [json.loads(line) for line in (args.run / ROWS_FILE).read_text().splitlines()]
    extra_path = args.run / EXTRA_ROWS_FILE
    extra = [json.loads(line) for line in extra_path.read_text().splitlines()] if extra_path.is_file() else []
    if args.rm:
        add_rm_scores(args.run, gold, extra)
    rows = ranking_rows(policy, gold, extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    header = ("# Orderings for the ranking rows (scripts/make_ranking_rows.py): the policy's classes in class\n"
              "# order, plus the synthetic kinds whose order is certain by construction\n"
              "# (rbr_model.reward_eval.CERTAIN_PAIRS).\n")
    args.orderings_out.parent.mkdir(parents=True, exist_ok=True)
    args.orderings_out.write_text(header + yaml.safe_dump(ranking_orderings(policy), sort_keys=False))
    counts: dict[str, int] = {}
    for row in rows:
        key = f"{row['response_type']}/{'gold' if row['prompt_id'].startswith('gold-') else 'synthetic'}"
        counts[key] = counts.get(key, 0) + 1
    print(f"wrote {len(rows)} rows ({counts}) to {args.out} and the orderings to {args.orderings_out}")


def add_rm_scores(run: Path, gold: list[dict], extra: list[dict]) -> None:
    """Each record gets `rm_score`: the embedded RM's score of the completion it was graded on (the gold file's row,
    or the extra rows file's line)."""
    import asyncio

    from tqdm import tqdm

    from rbr_model.gold import load_gold
    from rbr_model.rm import build_rm_engine

    gold_path = json.loads((run / "reward_eval.json").read_text())["meta"]["gold"]
    gold_rows = load_gold(gold_path)
    items = [(gold_rows[rec["row"]]["prompt"], gold_rows[rec["row"]]["completion"]) for rec in gold]
    sources: dict[str, list[dict]] = {}
    for rec in extra:
        if rec["source"] not in sources:
            sources[rec["source"]] = [json.loads(line) for line in (ROOT / rec["source"]).read_text().splitlines()]
        source_row = sources[rec["source"]][rec["line"] - 1]
        if source_row.get("prompt_id") != rec["prompt_id"]:
            raise SystemExit(f"{rec['source']}:{rec['line']}: prompt_id {source_row.get('prompt_id')!r}, "
                             f"expected {rec['prompt_id']!r}: the extra rows file changed since the run")
        items.append((source_row["prompt"], source_row["completion"]))

    async def score() -> list[float]:
        engine = await asyncio.to_thread(build_rm_engine, "vllm", None, None, max_model_len=2048)
        scores: list[float] = []
        try:
            with tqdm(total=len(items), desc="rm scores", unit="completion") as bar:
                for start in range(0, len(items), 64):
                    part = items[start:start + 64]
                    scores += await engine.score([list(p) for p, _ in part], [c for _, c in part])
                    bar.update(len(part))
        finally:
            await engine.close()
        return scores

    for rec, value in zip([*gold, *extra], asyncio.run(score()), strict=True):
        rec["rm_score"] = round(value, 6)


if __name__ == "__main__":
    main()
