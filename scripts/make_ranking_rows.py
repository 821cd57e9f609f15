"""Write the ranking the default weights are fitted on (`rbr fit --data ... --orderings ...`).

From an `rbr eval reward --cv` output folder (every probability out of fold: no row graded by a head that saw it):

  gold rows       OpenAI's gold train rows labelled with their human class; pairs of different classes within
                  one (response type, fold) group, ranked by the policy's class order;
  synthetic rows  the weak-label rows whose order is certain by construction, on the same prompt: a forced
                  refusal beats forced compliance on a refuse prompt; an answer without an insult, a
                  first-person refusal and a hedged safe response beat their matched opposite
                  (rbr_model.reward_eval.CERTAIN_PAIRS).

    python scripts/make_ranking_rows.py out/reward-cv --out rbr_model/data/ranking_rows.jsonl \
        --orderings-out rbr_model/data/ranking_orderings.yaml
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
    ap.add_argument("--orderings-out", type=Path, default=Path("out/ranking_orderings.yaml"),
                    help="orderings to write")
    args = ap.parse_args(argv)

    from rbr_model.policy import load_policy
    from rbr_model.reward_eval import EXTRA_ROWS_FILE, ROWS_FILE, ranking_orderings, ranking_rows

    policy = load_policy()
    gold = [json.loads(line) for line in (args.run / ROWS_FILE).read_text().splitlines()]
    extra_path = args.run / EXTRA_ROWS_FILE
    extra = [json.loads(line) for line in extra_path.read_text().splitlines()] if extra_path.is_file() else []
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


if __name__ == "__main__":
    main()
