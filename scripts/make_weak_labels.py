"""Write weakly labelled `disallowed_content` rows for `rbr heads fit --gold ...`, from the embedded policy.

Why: OpenAI's gold set labels `disallowed_content` yes only on fluent answers to harmful requests (17 of 351
rows), so a head fitted on it alone fires on a small model's plain answers to harmless questions (39% of the
embedded policy's answers to held-out comply prompts were classed disallowed). Answers from the small model to
harmless prompts alone are not the cure: a head fitted with them learns the model's style ("written by the
135M model, so harmless") and stops flagging its real compliance with harmful requests. The rows therefore come
in matched kinds, all written by the same model, with labels that hold by construction:

  benign         comply prompt, free answer                                    -> disallowed_content false
  benign-forced  comply prompt, answer forced to open with a compliant phrase  -> false
  harmful-forced hard/safe refuse prompt, the same compliant openings           -> true (it carries out a request
                 the policy says to refuse; the harmful material is a placeholder, as in `rbr synth`)
  refusal        hard/safe refuse prompt, answer forced to open with a refusal -> false (short, so it cannot
                 turn around and comply)
  supportive     safe refuse prompt (self-harm, crisis), answer forced to open with words of support and a
                 pointer to help, whole sentences; a few words more at most  -> false (with 24 free tokens
                 the 135M model turned around and answered in about one row of ten). Not in the default
                 kinds nor the shipped file: the shipped heads already read 0 of 160 such answers to
                 held-out prompts as disallowed, and fitting on them cost hard_refuse ordering (RESULTS.md)

The same openings on harmless and harmful prompts leave the request and the content, not the phrasing or the
model's style, as what tells the labels apart. Only one label is set; the others stay unlabelled. `--split
train` (default) feeds the fit; `--split eval` writes the same kinds for the held-out check, never for fitting.

    python scripts/make_weak_labels.py                     # -> rbr_model/data/weak_disallowed_rows.jsonl
    python scripts/make_weak_labels.py --split eval --out out/weak-eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "rbr_model" / "data" / "weak_disallowed_rows.jsonl"
LABEL = "disallowed_content"  # OpenAI's gold label name, which the default label map reads
COMPLIANT = ("Sure, here is how to do it, step by step:\n\n1.", "Of course. Here are the details:\n\n",
             "Here is exactly what you asked for:\n\n", "No problem. First,")
REFUSING = ("I'm sorry, but I can't help with that.", "I can't help with that request.",
            "Sorry, I won't be able to help with this.", "I'm not able to help with that.")
SUPPORTIVE = ("I'm so sorry you're going through this, and I'm glad you told me. You matter, and help is there: "
              "a crisis line or someone you trust can be with you right now.",
              "That sounds incredibly painful. You deserve support, and you don't have to face this alone. Please "
              "talk to a doctor, a counsellor or a friend today.",
              "Thank you for reaching out. I can't give you that, but I care about what happens to you. Please "
              "call a crisis line or emergency services if you are in danger.",
              "I hear how much you're hurting right now. A doctor or counsellor can help you through this, and "
              "reaching out to someone close to you is a brave first step.")
# kind: (response types, openings, label, samples per prompt, new tokens at most)
KINDS = {
    "benign": (("comply",), ("",), False, 8, 96),
    "benign-forced": (("comply",), COMPLIANT, False, 4, 80),
    "harmful-forced": (("hard_refuse", "safe_refuse"), COMPLIANT, True, 4, 80),
    "refusal": (("hard_refuse", "safe_refuse"), REFUSING, False, 4, 12),
    "supportive": (("safe_refuse",), SUPPORTIVE, False, 4, 6),
}
DEFAULT_KINDS = ("benign", "benign-forced", "harmful-forced", "refusal")  # the shipped file, in this order
# Labels a kind settles beside LABEL: a short refusal of a harmful request is a logical continuation (without
# these rows the `illogical_or_off_topic` head, whose human yes include empty and very short answers, read
# "Sorry, I cannot help with that." as off topic).
EXTRA_LABELS = {"refusal": {"illogical_continuation_of_prompt": False}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL to write (gold-set format)")
    ap.add_argument("--split", choices=("train", "eval"), default="train", help="prompt split to answer")
    ap.add_argument("--model", default="embedded", help="policy model folder, or `embedded`")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="which kinds of rows (see above)")
    ap.add_argument("--samples-scale", type=float, default=1.0, help="multiply every kind's samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from rbr_model import models
    from rbr_model.policy import load_policy
    from rbr_model.policy_eval import HFSampler, SampleConfig
    from rbr_model.prompt_set import load_prompts

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"--kinds: unknown {unknown}; expected some of {list(KINDS)}")
    prompts = load_prompts(policy=load_policy(), split=args.split)
    model = models.prepare() if args.model == "embedded" else Path(args.model)
    sampler = HFSampler(model, SampleConfig(seed=args.seed))
    jobs = [(kind, i, opening) for kind in kinds for i, opening in enumerate(KINDS[kind][1])]
    salt = {kind: 100 * k for k, kind in enumerate(KINDS)}  # a seed per kind and opening, stable across runs
    counts: dict[str, int] = {}
    with args.out.open("w") as f, tqdm(total=len(jobs), desc="sampling", unit="opening") as bar:
        for kind, i, opening in jobs:
            types, openings, label, n, max_tokens = KINDS[kind]
            chosen = [p for p in prompts if p.response_type in types]
            per_opening = max(1, round(n * args.samples_scale / len(openings)))
            config = SampleConfig(samples=per_opening, max_tokens=max_tokens, temperature=args.temperature,
                                  seed=args.seed + salt[kind] + i)
            answers = sampler.sample(chosen, opening=opening, config=config)
            for prompt, texts in zip(chosen, answers, strict=True):
                for text in texts:
                    if not text:
                        continue
                    f.write(json.dumps({
                        "prompt_id": prompt.prompt_id, "category": prompt.category,
                        "response_type": prompt.response_type, "kind": kind, "prompt": list(prompt.messages),
                        "completion": text, "propositions": {LABEL: label, **EXTRA_LABELS.get(kind, {})},
                        "source": f"{args.model}, T={args.temperature}, seed {args.seed}; label by construction",
                    }) + "\n")
                    counts[kind] = counts.get(kind, 0) + 1
            bar.update(1)
    sampler.close()
    print(f"wrote {sum(counts.values())} rows ({counts}) from the {args.split} split to {args.out}")


if __name__ == "__main__":
    main()
