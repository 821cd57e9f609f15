"""Write preference pairs for the embedded helpful-only reward model (`rbr rm fit --pairs ...`), order by construction.

Why by construction: there are no human preference labels for a 135M model's answers, but some orders hold
whatever the text says. All completions are written by the embedded model itself, so its style cannot tell chosen
from rejected; what differs is whether the answer does what the user asked:

  comply   any prompt, the answer forced to open with a compliant phrase    (does what was asked)
  free     comply prompt, the model's own answer                           (does what was asked)
  refuse   any prompt, forced to open with a refusal                       (does not)
  hedge    any prompt, forced to open with the apologetic "I'm here to support you" register the RBR-only GRPO
           run learned (docs/policy-eval.md)                                (does not)
  repeat   a comply/free answer whose tail is replaced by a loop of its own words  (degenerate)
  offtopic a comply/free answer written for another prompt of the split     (does not answer this one)

Pairs, per prompt: comply > refuse, comply > hedge, free > refuse, free > hedge, x > repeat(x), x > offtopic, for
x in the prompt's comply and free answers. Harmful prompts get the same comply > refuse pairs as harmless ones:
the model is helpful-only (the paper's Helpful-RM); safety is the RBR's part of the reward.

The openings of the train split and of the eval split are different phrases, so the held-out accuracy measures
more than recognising a fixed opening. Sampled with vLLM, seeded: the same machine and batch repeat them.

    python scripts/make_rm_pairs.py                        # -> rbr_model/data/rm_pairs.jsonl (train prompts)
    python scripts/make_rm_pairs.py --split eval --out out/rm/pairs-eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "rbr_model" / "data" / "rm_pairs.jsonl"
# kind: ({split: openings}, response types or None for all, new tokens at most)
OPENINGS = {
    "comply": ({"train": ("Sure, here is how to do it, step by step:\n\n1.", "Of course. Here are the details:\n\n"),
                "eval": ("Here is exactly what you asked for:\n\n", "No problem. First,")}, None, 48),
    "refuse": ({"train": ("I'm sorry, but I can't help with that.", "I can't help with that request."),
                "eval": ("Sorry, I won't be able to help with this.", "I'm not able to help with that.")}, None, 20),
    "hedge": ({"train": ("I'm so sorry you're dealing with this. As an AI, I'm here to support you. However,",),
               "eval": ("Thank you for reaching out, I'm here to help and support you. However, it's important",)},
              None, 32),
    "free": ({"train": ("",), "eval": ("",)}, ("comply",), 48),
}
GOOD, BAD = ("comply", "free"), ("refuse", "hedge")


def repeat_tail(text: str, rng: random.Random) -> str:
    """The answer's first few words, then a loop of 1-3 of its words up to the same length (degenerate text)."""
    words = text.split()
    if len(words) < 4:
        words = [*words, "no", "no", "no", "no"]
    keep = rng.randint(2, min(8, len(words) - 1))
    loop = words[keep - rng.randint(1, min(3, keep)):keep]
    out = words[:keep]
    while len(out) < max(len(words), 24):
        out.extend(loop)
    return " ".join(out[:max(len(words), 24)])


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    """Pairs of known order from sampled rows (see the module docstring), in a stable order."""
    rng = random.Random(seed)
    by_prompt: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], {}).setdefault(r["kind"], []).append(r)
    ids = sorted(by_prompt)
    good = {pid: [r for k in GOOD for r in by_prompt[pid].get(k, [])] for pid in ids}
    # off-topic: each prompt gets a good answer of the prompt `shift` places on (never itself)
    shift = rng.randint(1, len(ids) - 1) if len(ids) > 1 else 0
    pairs = []

    def pair(chosen: dict, rejected: str, kind: str) -> None:
        pairs.append({"prompt_id": chosen["prompt_id"], "response_type": chosen["response_type"], "kind": kind,
                      "prompt": chosen["prompt"], "chosen": chosen["completion"], "rejected": rejected})

    for i, pid in enumerate(ids):
        kinds = by_prompt[pid]
        for g in good[pid]:
            for b in (r for k in BAD for r in kinds.get(k, [])):
                pair(g, b["completion"], f"{g['kind']}>{b['kind']}")
            pair(g, repeat_tail(g["completion"], rng), f"{g['kind']}>repeat")
            others = good[ids[(i + shift) % len(ids)]] if shift else []
            if others:
                pair(g, rng.choice(others)["completion"], f"{g['kind']}>offtopic")
    return pairs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="pairs JSONL to write (rbr rm fit --pairs)")
    ap.add_argument("--split", choices=("train", "eval"), default="train", help="prompt split to answer")
    ap.add_argument("--model", default="embedded", help="policy model folder, or `embedded`")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    ap.add_argument("--seed", type=int, default=0, help="sampling and pairing seed")
    ap.add_argument("--limit", type=int, default=0, help="first N prompts of the split only (a smoke run); 0: all")
    args = ap.parse_args(argv)

    from rbr_model import models
    from rbr_model.grading.vllm_engine import cpu_engine_env, default_dtype
    from rbr_model.policy import load_policy
    from rbr_model.prompt_set import load_prompts

    prompts = load_prompts(policy=load_policy(), split=args.split)
    if args.limit:
        prompts = prompts[:args.limit]
    model = models.prepare() if args.model == "embedded" else Path(args.model)
    # vLLM's offline engine: batched decoding, ~10x HFSampler's speed on this CPU.
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), dtype=default_dtype(), max_model_len=1024, enforce_eager=True, seed=args.seed,
              **cpu_engine_env())
    tokenizer = llm.get_tokenizer()
    jobs = []  # (prompt, kind, opening index, opening, params): one completion each
    for kind, (by_split, types, max_tokens) in OPENINGS.items():
        for i, opening in enumerate(by_split[args.split]):
            for p in prompts:
                if types is None or p.response_type in types:
                    # No per-request seed: vLLM 0.32's CPU runner fails on seeded requests whose prompt is split
                    # across steps (set_offset on a CPU generator); the engine's seed makes the run repeat.
                    jobs.append((p, kind, i, opening, SamplingParams(temperature=args.temperature,
                                                                     max_tokens=max_tokens)))
    texts = [tokenizer.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True) + opening
             for p, _, _, opening, _ in jobs]
    outs = llm.generate([{"prompt": t} for t in texts], [j[4] for j in jobs])
    rows: list[dict] = []
    for (prompt, kind, i, opening, _), out in zip(jobs, outs, strict=True):
        text = (opening + out.outputs[0].text).strip()
        if text:
            rows.append({"prompt_id": prompt.prompt_id, "response_type": prompt.response_type, "kind": kind,
                         "opening": i, "prompt": list(prompt.messages), "completion": text})
    pairs = make_pairs(rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    source = f"{args.model}, T={args.temperature}, seed {args.seed}, {args.split} split; order by construction"
    with args.out.open("w") as f:
        for p in pairs:
            f.write(json.dumps({**p, "source": source}) + "\n")
    kinds: dict[str, int] = {}
    for p in pairs:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    print(f"wrote {len(pairs)} pairs ({kinds}) from {len(rows)} completions of {len(prompts)} {args.split} prompts "
          f"to {args.out}")


if __name__ == "__main__":
    main()
