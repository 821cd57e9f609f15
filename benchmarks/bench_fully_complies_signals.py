"""Do cheap signals beside the heads tell `fully_complies` apart on comply rows? (issue #21)

comply top-1 class agreement is limited by the `fully_complies` head (within-comply AUC 0.898, about 0.97 needed;
docs/reward-accuracy.md). Before asking for a larger grader, this checks two signals the embedded model gives for
free, on the gold train split's comply rows, against the human label:

  length     the completion's length in characters (long answers tend to answer);
  log p      the policy model's mean log-probability of the completion's tokens after the conversation, and
             without it (an empty user turn);
  PMI        their difference per token (mean) and summed: does the conversation make the completion likelier,
             as an answer to this question would be, where a generic deflection is likely anyway?

and whether length adds to the head's out-of-fold logit (`rbr eval reward --cv` output): a logistic regression on
both, 5-fold CV over all 351 rows, AUC within comply. Only the train split: the figures feed design choices.

    python benchmarks/bench_fully_complies_signals.py --run out/reward-cv-final4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_GOLD = ROOT / "../shared/reference/openai-rbr/gold_train.jsonl"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an `rbr eval reward --cv` output folder")
    ap.add_argument("--gold", type=Path, default=DEFAULT_GOLD, help="the gold TRAIN file the run was made on")
    ap.add_argument("--max-tokens", type=int, default=512, help="completion tokens scored at most")
    args = ap.parse_args(argv)
    if "test" in args.gold.name:
        raise SystemExit(f"{args.gold}: use the train split")

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score  # scores, not probabilities
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rbr_model import models

    gold = [json.loads(line) for line in args.gold.read_text().splitlines()]
    served = {r["row"]: r for r in map(json.loads, (args.run / "reward_rows.jsonl").read_text().splitlines())}
    model_dir = models.prepare()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def completion_logprobs(messages: list[dict], text: str) -> np.ndarray:
        prefix = tok.apply_chat_template(messages or [{"role": "user", "content": ""}], tokenize=False,
                                         add_generation_prompt=True)
        a = tok(prefix, add_special_tokens=False)["input_ids"][-3000:]
        b = tok(text, add_special_tokens=False)["input_ids"][:args.max_tokens]
        ids = torch.tensor([a + b])
        with torch.no_grad():
            logp = lm(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        return logp[torch.arange(len(targets)), targets][len(a) - 1:].numpy()

    # every row for the length + head regression; comply rows with a completion for the model signals
    y_all, head_all, len_all, is_comply = [], [], [], []
    names = ("length", "log p after the conversation", "log p after an empty turn", "PMI per token", "PMI summed")
    sig: dict[str, list[float]] = {k: [] for k in names}
    y_sig = []
    for i, g in enumerate(tqdm(gold, desc="rows", unit="row")):
        text = g["completion"][0]["content"]
        p = min(max(served[i]["probabilities"]["fully_complies"], 1e-6), 1 - 1e-6)
        y_all.append(bool(g["propositions"]["fully_complies"]))
        head_all.append(np.log(p / (1 - p)))
        len_all.append(np.log1p(len(text)))
        is_comply.append(g["response_type"] == "Comply")
        if g["response_type"] != "Comply" or not text.strip():
            continue
        cond, free = completion_logprobs(g["prompt"], text), completion_logprobs([], text)
        y_sig.append(y_all[-1])
        values = (len(text), cond.mean(), free.mean(), (cond - free).mean(), (cond - free).sum())
        for k, v in zip(names, values, strict=True):
            sig[k].append(float(v))

    ys = np.array(y_sig, dtype=float)
    print(f"\ncomply rows with a completion: {len(ys)} ({int(ys.sum())} fully_complies)\n")
    print("| signal | AUC for fully_complies within comply |\n|---|---|")
    for k, v in sig.items():
        print(f"| {k} | {roc_auc_score(ys, np.array(v)):.3f} |")
    y, m = np.array(y_all, dtype=float), np.array(is_comply)
    X = np.column_stack([head_all, len_all])
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    print("\n| logistic regression on (5-fold CV, all rows) | AUC within comply |\n|---|---|")
    for name, cols in (("the head's out-of-fold logit", [0]), ("log length", [1]), ("both", [0, 1])):
        z = cross_val_predict(LogisticRegression(C=10), X[:, cols], y, cv=cv, method="decision_function")
        print(f"| {name} | {roc_auc_score(y[m], z[m]):.3f} |")
    print(f"\ncorrelation of the head's logit and log length on comply rows: "
          f"{np.corrcoef(X[m, 0], X[m, 1])[0, 1]:.2f}")


if __name__ == "__main__":
    main()
