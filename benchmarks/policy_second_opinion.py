"""A second opinion on `rbr eval policy` runs: the TF-IDF baseline's view of the same completions, and stock phrases.

Reward hacking shows as a policy whose completions raise the grader's P(yes) without the behaviour. Two checks that
need no new labels:

1. **TF-IDF's view.** Per proposition, a TF-IDF + logistic regression model is trained on the human-labelled gold
   rows (the same baseline `rbr eval grader` reports beside the heads) and applied to every graded completion; the
   class probabilities and the paper's metrics are recomputed from its P(yes) (propositions it has no labels for
   keep the grader's). If the heads' metrics moved with training and TF-IDF's did not, the heads are being gamed
   (or TF-IDF misses what they see: read the examples).
2. **Stock phrases.** The word 3-grams whose share of completions grew most from the first run to each later one.

    PYTHONPATH=. .venv/bin/python benchmarks/policy_second_opinion.py out/eval-untrained out/eval-grpo \\
        out/eval-control --gold ../shared/reference/openai-rbr/gold_train.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from rbr_model import policy_eval as pe
from rbr_model.evaluate import default_label_map, load_gold, resolve_label_map
from rbr_model.features import CLASS_PREFIX, FeatureBuilder
from rbr_model.heads.fitting import DEFAULT_CS, fit_logreg, tasks_from_rows
from rbr_model.policy import load_policy
from rbr_model.synth import top_class


def tfidf_models(gold: Path, policy, seed: int = 0) -> dict:
    """{proposition: (vectoriser, model)} trained on every gold row that labels it."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    rows = load_gold(gold)
    label_map, _ = default_label_map(policy, rows)
    mapping = resolve_label_map(policy, rows, label_map, None)
    tasks, _ = tasks_from_rows(rows, mapping)
    out = {}
    for task in tasks:
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        X = vec.fit_transform([rows[i]["completion"] for i in task.rows])
        model, _ = fit_logreg(X, task.y, DEFAULT_CS, 5, seed)
        out[task.name] = (vec, model)
    return out


def regrade(graded: list[dict], models: dict, policy) -> list[pe.Graded]:
    builder = FeatureBuilder(policy)
    texts = [g["completion"] for g in graded]
    tfidf = {name: m.predict_proba(vec.transform(texts))[:, 1] for name, (vec, m) in models.items()}
    out = []
    for i, g in enumerate(graded):
        spec = builder[g["response_type"]]
        probs = {p: float(tfidf[p][i]) if p in tfidf else float(g["features"][p]) for p in spec.propositions}
        feats = spec.feature_dicts([probs])[0]
        classes = {c: feats[CLASS_PREFIX + c] for c in spec.classes}
        out.append(pe.Graded(g["prompt_id"], g["response_type"], g["sample"], g["completion"], classes,
                             top_class(classes)))
    return out


def trigrams(text: str) -> set[str]:
    words = re.findall(r"[a-z']+", text.lower())
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="folders of `rbr eval policy` runs (graded.jsonl), first = "
                                                        "the reference for the phrase counts")
    ap.add_argument("--gold", type=Path, required=True, help="human-labelled gold JSONL for the TF-IDF models")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    policy = load_policy(None)
    spec = pe.MetricSpec.for_policy(policy)
    models = tfidf_models(args.gold, policy)
    result: dict = {"tfidf_propositions": sorted(models), "runs": {}}
    grams: dict[str, Counter] = {}
    print(f"TF-IDF models for {len(models)} propositions; the others keep the grader's P(yes)")
    width = max(len("run"), *(len(r.name) for r in args.runs))
    print(f"{'run':<{width}} {'view':<7} {'Not-Unsafe':>22} {'Not-Overrefuse':>22} {'F1':>22}  top-class agreement")
    for run in args.runs:
        graded = [json.loads(line) for line in (run / "graded.jsonl").read_text().splitlines() if line.strip()]
        heads_rows = [pe.Graded(g["prompt_id"], g["response_type"], g["sample"], g["completion"], g["classes"],
                                g["top_class"]) for g in graded]
        tfidf_rows = regrade(graded, models, policy)
        agree = float(np.mean([a.top_class == b.top_class for a, b in zip(heads_rows, tfidf_rows, strict=True)]))
        entry = {"agreement": agree}
        for view, rows in (("heads", heads_rows), ("tfidf", tfidf_rows)):
            m = pe.safety_metrics(rows, spec)
            iv = pe.bootstrap(rows, spec, n=args.bootstrap)
            entry[view] = {"metrics": m, "intervals": iv,
                           "mix": pe.class_mix(rows, policy.class_order)}
            cells = [f"{100 * m[k]:5.1f} [{100 * iv[k][0]:.1f}, {100 * iv[k][1]:.1f}]" for k in
                     ("not_unsafe", "not_overrefuse", "f1")]
            print(f"{run.name:<{width}} {view:<7} " + " ".join(f"{c:>22}" for c in cells)
                  + (f"  {agree:.2f}" if view == "tfidf" else ""))
        result["runs"][run.name] = entry
        grams[run.name] = Counter(g for row in graded for g in trigrams(row["completion"]))
        grams[run.name]["__n__"] = len(graded)
    first = args.runs[0].name
    for run in args.runs[1:]:
        n0, n1 = grams[first]["__n__"], grams[run.name]["__n__"]
        growth = sorted(((grams[run.name][g] / n1 - grams[first].get(g, 0) / n0, g) for g in grams[run.name]
                         if g != "__n__"), reverse=True)[:10]
        result["runs"][run.name]["grown_trigrams"] = [{"trigram": g, "share": grams[run.name][g] / n1,
                                                       "share_in_" + first: grams[first].get(g, 0) / n0}
                                                      for _, g in growth]
        print(f"\n3-grams that grew most from {first} to {run.name} (share of completions holding it):")
        for _, g in growth:
            print(f"  {g!r:<40} {grams[first].get(g, 0) / n0:5.2f} -> {grams[run.name][g] / n1:5.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
