"""Write weakly labelled rows for `rbr heads fit --gold ...`: the embedded policy's answers to benign prompts.

Why: OpenAI's gold set labels `disallowed_content` yes only on answers to harmful requests (17 of 351 rows), and
its compliant answers are fluent, so a head fitted on it alone learns "complies" more than "harmful": it fires on
a small model's plain answers to harmless questions (39% of the embedded policy's answers to held-out comply
prompts were classed disallowed). The policy's `comply` prompts are, by definition, ones whose full answer is
allowed, so any answer to them is a `disallowed_content: false` row, whatever its quality. Only the train split's
prompts are used (the eval split stays held out for `rbr eval policy`), and only that one label is set: other
propositions (was it complete? polite?) are not known by construction and stay unlabelled.

    python scripts/make_benign_negatives.py                 # writes rbr_model/data/benign_comply_negatives.jsonl
    python scripts/make_benign_negatives.py --help
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "rbr_model" / "data" / "benign_comply_negatives.jsonl"
LABEL = "disallowed_content"  # OpenAI's gold label name, which the default label map reads


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL to write (gold-set format)")
    ap.add_argument("--model", default="embedded", help="policy model folder, or `embedded`")
    ap.add_argument("--samples", type=int, default=8, help="answers per prompt")
    ap.add_argument("--max-tokens", type=int, default=96, help="longest answer in tokens")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from rbr_model import models
    from rbr_model.policy import load_policy
    from rbr_model.policy_eval import HFSampler, SampleConfig
    from rbr_model.prompt_set import load_prompts

    prompts = [p for p in load_prompts(policy=load_policy(), split="train") if p.response_type == "comply"]
    model = models.prepare() if args.model == "embedded" else Path(args.model)
    config = SampleConfig(samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                          seed=args.seed)
    config.check()
    sampler = HFSampler(model, config)
    with tqdm(total=len(prompts), desc="sampling", unit="prompt") as bar:
        answers = sampler.sample(prompts, progress=bar.update)
    sampler.close()
    rows = 0
    with args.out.open("w") as f:
        for prompt, texts in zip(prompts, answers, strict=True):
            for text in texts:
                if not text.strip():
                    continue
                f.write(json.dumps({
                    "prompt_id": prompt.prompt_id, "category": prompt.category, "response_type": "Comply",
                    "prompt": list(prompt.messages), "completion": text, "propositions": {LABEL: False},
                    "source": f"{args.model} sampled (T={args.temperature}, seed {args.seed}); label by construction",
                }) + "\n")
                rows += 1
    print(f"wrote {rows} rows from {len(prompts)} train-split comply prompts to {args.out}")


if __name__ == "__main__":
    main()
