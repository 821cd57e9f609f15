"""Would other layers of the grader, or several at once, lift `fully_complies` enough for comply top-1? (issue #21)

comply top-1 class agreement is limited by the `fully_complies` head: its within-comply AUC is 0.898 at layer 15
and a simulated head needs about 0.97 for top-1 0.75 (docs/reward-accuracy.md). The heads read one layer; this
fits the same kind of head (standardised L2 logistic regression, balanced classes, C by inner 5-fold CV, Platt
calibration on the inner out-of-fold logits, mean-and-max pooling) on other layers and on concatenations of
layers, with the outer folds of an `rbr eval reward --cv` run, and reports per configuration:

  AUC        out-of-fold, within the comply rows (the figure the simulated head needs at ~0.97);
  top-1      comply top-1 class agreement with this `fully_complies` in place of the run's, every other
             proposition as the run served it (so only this head changes).

`--classifiers logreg,rbf` also fits, on the same states and folds, an RBF-kernel SVM (balanced classes; C and
gamma by inner 5-fold CV AUC, Platt-calibrated on the inner out-of-fold scores): is a nonlinear head the lever the
linear one is not? (The service's heads are linear; this only measures.)

`--model DIR` reads another grader's states instead (`benchmarks/prepare_gemma_grader.py`: Gemma 3 270M, the only
other model installable here): is it the trunk's size class or this trunk? `--plus NPZ:LAYER` fits each single
layer beside one layer of another states cache: do two trunks together carry more than either? `--direct-class`
reads comply's human class off the states with one multinomial head (no propositions, no product of conditions).

The states come from the full model (transformers, float32, each layer through the model's final norm as the trunk
does), cached in `out/fc-layers-states.npz` (`-<model folder>.npz` with `--model`). Only the train split: the
figures feed design choices.

    python benchmarks/bench_fc_layers.py --run out/reward-cv-final5 --layers 10,15,20,25,30 \
        --combos 15+20,10+15+20+25,10+15+20+25+30
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_GOLD = ROOT / "../shared/reference/openai-rbr/gold_train.jsonl"
LABEL = "fully_complies"


def layer_states(gold: list[dict], layers: list[int], cache: Path, max_tokens: int,
                 model_dir: Path | None = None) -> dict[int, np.ndarray]:
    """Mean-and-max pooled, normed states of every gold completion at each layer (cached by layer set)."""
    if cache.exists():
        data = np.load(cache)
        if all(f"layer{L}" in data for L in layers) and data[f"layer{layers[0]}"].shape[0] == len(gold):
            return {L: data[f"layer{L}"] for L in layers}
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rbr_model import models
    from rbr_model.heads import MEAN_AND_MAX, build_input, pool_span

    model_dir = model_dir or models.prepare()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[int, list[np.ndarray]] = {L: [] for L in layers}
    with torch.no_grad():
        for row in tqdm(gold, desc="states", unit="row"):
            text = row["completion"] if isinstance(row["completion"], str) else row["completion"][-1]["content"]
            inp = build_input(tok, row["prompt"], text, max_tokens)
            hidden = lm(torch.tensor([inp.ids]), output_hidden_states=True).hidden_states
            for L in layers:
                out[L].append(pool_span(lm.model.norm(hidden[L][0])[inp.start:inp.end].double().numpy(),
                                        MEAN_AND_MAX))
    arrays = {L: np.stack(v) for L, v in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"layer{L}": a for L, a in arrays.items()})
    return arrays


def fit_logreg_head(Xtr: np.ndarray, ytr: np.ndarray) -> tuple[Any, np.ndarray]:
    """The head `fit_heads` fits: C by inner CV AUC; returns the model and its inner out-of-fold logits."""
    from rbr_model.heads.fitting import DEFAULT_CS, _logreg, _oof_logits, _pick_C

    oof = _oof_logits(Xtr, ytr, DEFAULT_CS, 5, 0)
    C, _ = _pick_C(oof, ytr)
    return _logreg(C).fit(Xtr, ytr), oof[C]


RBF_GRID = [(C, g) for C in (1.0, 3.0) for g in (0.3, 1.0, 3.0)]  # gamma as a multiple of 1 / columns


def fit_rbf_head(Xtr: np.ndarray, ytr: np.ndarray) -> tuple[Any, np.ndarray]:
    """An RBF SVM, balanced classes, (C, gamma) by inner 5-fold CV AUC; the model and its inner OOF scores."""
    from scipy.special import expit
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.svm import SVC

    from rbr_model.metrics import roc_auc

    inner = StratifiedKFold(5, shuffle=True, random_state=0)
    best = None
    for C, g in RBF_GRID:
        svm = SVC(C=C, gamma=g / Xtr.shape[1], class_weight="balanced")
        oof = cross_val_predict(svm, Xtr, ytr, cv=inner, method="decision_function")
        score = roc_auc(expit(oof), ytr)
        if best is None or score > best[0] + 1e-9:
            best = (score, svm, oof)
    _, svm, oof = best
    return svm.fit(Xtr, ytr), oof


def oof_probabilities(X: np.ndarray, y: np.ndarray, fold: np.ndarray,
                      fit: Callable[[np.ndarray, np.ndarray], tuple[Any, np.ndarray]] = fit_logreg_head,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Outer-fold scores and calibrated P(yes): per outer fold, states standardised on its training rows, the head
    from `fit`, and a Platt map on the head's inner out-of-fold scores (as `fit_heads` calibrates)."""
    from scipy.special import expit

    from rbr_model.heads.fitting import Standardiser, platt

    z_out, p_out = np.empty(len(y)), np.empty(len(y))
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        std = Standardiser(X[tr])
        model, inner = fit(std(X[tr]), y[tr])
        a, c = platt(inner, y[tr])
        z = model.decision_function(std(X[te]))
        z_out[te], p_out[te] = z, expit(a * z + c)
    return z_out, p_out


DIRECT_CS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def direct_class_predictions(X: np.ndarray, classes: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold classes from one multinomial head on the states (standardised L2 logistic regression, C by
    inner 4-fold CV accuracy): the class read off the states directly, no propositions in between."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from rbr_model.heads.fitting import Standardiser

    out = np.empty(len(classes), dtype=object)
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        std = Standardiser(X[tr])
        search = GridSearchCV(LogisticRegression(max_iter=3000), {"C": DIRECT_CS},
                              cv=StratifiedKFold(4, shuffle=True, random_state=0))
        out[te] = search.fit(std(X[tr]), classes[tr]).predict(std(X[te]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an `rbr eval reward --cv` output folder (its folds)")
    ap.add_argument("--gold", type=Path, default=DEFAULT_GOLD, help="the gold TRAIN file the run was made on")
    ap.add_argument("--layers", default="10,15,20,25,30", help="single layers to compare (0 = embeddings)")
    ap.add_argument("--combos", default="15+20,10+15+20+25,10+15+20+25+30", help="layer sets, concatenated")
    ap.add_argument("--classifiers", default="logreg", help="heads to fit per layer set: logreg (as shipped), rbf")
    ap.add_argument("--max-tokens", type=int, default=4096, help="conversation + completion tokens at most")
    ap.add_argument("--model", type=Path, default=None,
                    help="another grader's folder (transformers format, with a chat template; "
                         "benchmarks/prepare_gemma_grader.py makes one); default: the embedded model")
    ap.add_argument("--cache", type=Path, default=None,
                    help="states cache (default out/fc-layers-states.npz, or -<model folder>.npz with --model)")
    ap.add_argument("--plus", default="", metavar="NPZ:LAYER",
                    help="also fit each single layer beside this layer of another states cache (e.g. the other "
                         "grader's: do two trunks together carry more than either?)")
    ap.add_argument("--direct-class", action="store_true",
                    help="also fit, per layer set, one multinomial head predicting comply's human class from the "
                         "states (no propositions, no product): is the class itself easier to read than the rule?")
    args = ap.parse_args(argv)
    if args.cache is None:
        suffix = f"-{args.model.name}" if args.model else ""
        args.cache = ROOT / "out" / f"fc-layers-states{suffix}.npz"
    if "test" in args.gold.name:
        raise SystemExit(f"{args.gold}: use the train split")
    if args.model and not (args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: not a transformers model folder (no config.json); "
                         "benchmarks/prepare_gemma_grader.py makes one")
    npz, _, other = args.plus.rpartition(":")
    extra = np.load(npz) if args.plus and Path(npz).is_file() else {}
    if args.plus and f"layer{other}" not in extra:
        raise SystemExit(f"--plus {args.plus}: expected an existing states cache and one of its layers, "
                         "e.g. out/fc-layers-states-gemma-3-270m.npz:9")

    from scipy.special import expit

    from rbr_model.features import FeatureBuilder
    from rbr_model.metrics import roc_auc
    from rbr_model.policy import load_policy

    gold = [json.loads(line) for line in args.gold.read_text().splitlines()]
    served = [json.loads(line) for line in (args.run / "reward_rows.jsonl").read_text().splitlines()]
    singles = [int(x) for x in args.layers.split(",") if x.strip()]
    combos = [[int(x) for x in c.split("+")] for c in args.combos.split(",") if c.strip()]
    needed = sorted({*singles, *(L for c in combos for L in c)})
    states = layer_states(gold, needed, args.cache, args.max_tokens, args.model)

    labelled = [r for r in served if LABEL in gold[r["row"]]["propositions"]]
    idx = np.array([r["row"] for r in labelled])
    y = np.array([bool(gold[i]["propositions"][LABEL]) for i in idx])
    fold = np.array([r["fold"] for r in labelled])
    comply = np.array([r["response_type"] == "comply" for r in labelled])
    builder = FeatureBuilder(load_policy(None))

    def comply_top1(p: np.ndarray) -> float:
        hits = []
        for r, pk, is_comply in zip(labelled, p, comply, strict=True):
            if not is_comply:
                continue
            spec = builder["comply"]
            probs = {**r["probabilities"], LABEL: float(pk)}
            cp = spec.class_probabilities(spec.matrix([probs]))[0]
            hits.append(spec.classes[int(np.argmax(cp))] == r["human_class"])
        return float(np.mean(hits))

    served_p = np.array([r["probabilities"][LABEL] for r in labelled])
    print(f"{len(labelled)} rows labelled `{LABEL}` ({int(comply.sum())} comply), outer folds of {args.run}\n")
    fitters = {"logreg": fit_logreg_head, "rbf": fit_rbf_head}
    kinds = [c.strip() for c in args.classifiers.split(",") if c.strip()]
    if not kinds or any(c not in fitters for c in kinds):
        raise SystemExit(f"--classifiers {args.classifiers!r}: choose from {', '.join(fitters)}")
    print("| states | head | columns | AUC within comply | AUC all rows | comply top-1 |")
    print("|---|---|---|---|---|---|")
    print(f"| as served in the run | logreg | - | {roc_auc(served_p[comply], y[comply]):.3f} | "
          f"{roc_auc(served_p, y):.3f} | {comply_top1(served_p):.3f} |")
    sets = [(f"layer {'+'.join(map(str, c))}", np.concatenate([states[L][idx] for L in c], axis=1))
            for c in [[L] for L in singles] + combos]
    if args.plus:
        other_states = extra[f"layer{other}"]
        if other_states.shape[0] != len(gold):
            raise SystemExit(f"--plus {args.plus}: {other_states.shape[0]} rows, the gold file has {len(gold)}")
        sets += [(f"layer {L} + {Path(npz).stem} layer {other}",
                  np.concatenate([states[L][idx], other_states[idx]], axis=1)) for L in singles]
    for name, X in sets:
        for kind in kinds:
            z, p = oof_probabilities(X, y, fold, fitters[kind])
            r = expit(z)  # roc_auc takes probabilities; the uncalibrated ones rank as the logits do
            print(f"| {name} | {kind} | {X.shape[1]} | "
                  f"{roc_auc(r[comply], y[comply]):.3f} | {roc_auc(r, y):.3f} | {comply_top1(p):.3f} |", flush=True)
    if args.direct_class:
        human = np.array([r["human_class"] for r in labelled])[comply]
        served_class = np.array([r["served_class"] for r in labelled])[comply]
        print(f"\n| states | columns | comply top-1, one class head on the states ({int(comply.sum())} rows) |")
        print("|---|---|---|")
        print(f"| as served in the run (product rule) | - | {np.mean(served_class == human):.3f} |")
        for name, X in sets:
            hits = direct_class_predictions(X[comply], human, fold[comply]) == human
            print(f"| {name} | {X.shape[1]} | {np.mean(hits):.3f} |", flush=True)


if __name__ == "__main__":
    main()
