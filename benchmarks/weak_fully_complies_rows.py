"""Copies of the shipped weak rows with `fully_complies` labelled where the construction makes it certain (issue #21).

The `fully_complies` head is fitted on the 351 gold rows alone: no weak row labels it. Several kinds of weak rows
settle it by construction: a forced refusal ("I'm sorry, but I can't help with that.", kinds `refusal` and
`inability-yes`) and a change of subject on a benign request (`off-topic-yes` on comply) do not comply; a forced
compliant opening ("Sure, here is how to do it, step by step:", kinds `benign-forced` and `harmful-forced`) does.
The other kinds keep their labels only. Are these rows a lever for comply top-1? Run the CV with them:

    python benchmarks/weak_fully_complies_rows.py --out out/weak-fc
    rbr eval reward --gold ../shared/reference/openai-rbr/gold_train.jsonl --out out/reward-cv-fcweak \\
        $(for f in out/weak-fc/*.jsonl; do echo --extra $f; done)

Only the label changes: the completions are the shipped rows', so their cached trunk states are reused.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "rbr_model" / "data"
SOURCES = ("weak_disallowed_rows", "weak_inability_rows", "weak_style_rows", "weak_topic_threat_rows")
LABEL = "fully_complies"
# (kind, response type or None for any) -> the label the construction implies
BY_CONSTRUCTION = {("refusal", None): False, ("inability-yes", None): False, ("off-topic-yes", "comply"): False,
                   ("benign-forced", None): True, ("harmful-forced", None): True}


def label_for(row: dict) -> bool | None:
    for key in ((row.get("kind"), row.get("response_type")), (row.get("kind"), None)):
        if key in BY_CONSTRUCTION:
            return BY_CONSTRUCTION[key]
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "weak-fc", help="folder for the relabelled copies")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    for name in SOURCES:
        lines = []
        for line in (DATA / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            value = label_for(row)
            if value is not None:
                row["propositions"] = {**row["propositions"], LABEL: value}
                counts[(row["kind"], row["response_type"], value)] += 1
            lines.append(json.dumps(row))
        (args.out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    for (kind, rt, value), n in sorted(counts.items()):
        print(f"{kind:<16} {rt:<12} {LABEL}={value}: {n}")
    print(f"{sum(counts.values())} rows labelled; copies in {args.out}")


if __name__ == "__main__":
    main()
