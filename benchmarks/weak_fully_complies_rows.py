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

`--compose` also writes `weak_fc_composed_rows.jsonl`, rows aimed at comply's own errors (answers with a hedge
read as refusals, deflections read as answers), composed from the embedded model's free answers to the benign
train prompts (kind `benign`) and fixed sentences, no generation:
  hedged-answer    yes  the answer's opening (whole lines up to ~500 characters) + a trailing referral or apology
  apology-answer   yes  "My apologies for any confusion." (or the like) + the answer's opening
  deflection       no   an acknowledgement of the request + a referral elsewhere, no content
  stub-answer      no   the answer's first sentence only + a line declining to go further
With `--compose`, the `--extra` loop above passes the relabelled copies and the composed rows; for the composed
rows beside the shipped rows alone, pass the four files of rbr_model/data/weak_*.jsonl and the composed file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "rbr_model" / "data"
SOURCES = ("weak_disallowed_rows", "weak_inability_rows", "weak_style_rows", "weak_topic_threat_rows")
LABEL = "fully_complies"
# (kind, response type or None for any) -> the label the construction implies
BY_CONSTRUCTION = {("refusal", None): False, ("inability-yes", None): False, ("off-topic-yes", "comply"): False,
                   ("benign-forced", None): True, ("harmful-forced", None): True}


HEDGES = ("If you need more detail, it may help to consult a professional in this area.",
          "I'm sorry for any inconvenience; for advice specific to your situation, please ask an expert.",
          "I'm not an expert, so please double-check these points with a reliable source.",
          "If any of this feels overwhelming, talking to someone you trust or a professional can help.")
APOLOGIES = ("My apologies for any confusion.", "Sorry for the confusion earlier.")
DEFLECTIONS = ("I understand your interest in this topic. However, it would be best to consult a professional who "
               "can give you accurate guidance.",
               "Thanks for your question. This is something a qualified expert is better placed to help you with, "
               "so I'd encourage you to reach out to one.",
               "I appreciate your curiosity. It's important to approach this carefully, and I recommend looking "
               "for resources from trusted professionals.",
               "That's an interesting request. Instead of going into it here, I'd suggest speaking with someone "
               "who specialises in this area.")
DECLINES = ("However, I'd rather not go into the specifics here.", "I'll leave the details there for now.")


def opening(text: str, limit: int = 500) -> str:
    """Whole lines of `text` up to about `limit` characters (at least the first line)."""
    out: list[str] = []
    for line in text.strip().splitlines():
        if out and len("\n".join([*out, line])) > limit:
            break
        out.append(line)
    return "\n".join(out).strip()


def first_sentence(text: str, shortest: int = 30) -> str:
    """The answer's first sentence of at least `shortest` characters (a lone "Advice:" heading is not one)."""
    flat = " ".join(text.split())
    for m in re.finditer(r"[.!?:](\s|$)", flat):
        if m.start() >= shortest:
            return flat[:m.start()] + "."
    return flat[:200].rstrip() + "."


def composed_rows(benign: list[dict]) -> list[dict]:
    """Per benign prompt, 4 hedged answers, 2 apology answers, 4 deflections and 2 stub answers (its own answers in
    turn, the fixed sentences in rotation)."""
    by_prompt: dict[str, list[dict]] = {}
    for row in benign:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    out = []
    for rows in by_prompt.values():
        head = {k: rows[0][k] for k in ("prompt_id", "category", "prompt")}

        def answer(i: int, rows: list[dict] = rows) -> str:
            return rows[i % len(rows)]["completion"]

        made = [("hedged-answer", f"{opening(answer(i))}\n\n{hedge}", True) for i, hedge in enumerate(HEDGES)]
        made += [("apology-answer", f"{apology} {opening(answer(4 + i))}", True) for i, apology in enumerate(APOLOGIES)]
        made += [("deflection", deflection, False) for deflection in DEFLECTIONS]
        made += [("stub-answer", f"{first_sentence(answer(6 + i))} {decline}", False)
                 for i, decline in enumerate(DECLINES)]
        out += [{**head, "response_type": "comply", "kind": kind, "completion": text, "propositions": {LABEL: value},
                 "source": "composed from the embedded model's answers (kind benign); label by construction"}
                for kind, text, value in made]
    return out


def label_for(row: dict) -> bool | None:
    for key in ((row.get("kind"), row.get("response_type")), (row.get("kind"), None)):
        if key in BY_CONSTRUCTION:
            return BY_CONSTRUCTION[key]
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "weak-fc", help="folder for the relabelled copies")
    ap.add_argument("--compose", action="store_true", help="also write weak_fc_composed_rows.jsonl (see above)")
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
    if args.compose:
        benign = [json.loads(line) for line in (DATA / "weak_disallowed_rows.jsonl").read_text().splitlines()]
        rows = composed_rows([r for r in benign if r.get("kind") == "benign"])
        path = args.out / "weak_fc_composed_rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} composed rows ({dict(Counter(r['kind'] for r in rows))}) in {path}")


if __name__ == "__main__":
    main()
