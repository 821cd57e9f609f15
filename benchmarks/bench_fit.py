"""Benchmark: `rbr_model.fit.HingeFitter` against a straightforward reference fitter.

The reference does what OpenAI's released weight fitter does, written here from scratch: it builds pairs with
a Python loop over every two completions of each prompt, stacks the features into torch tensors and runs a
fixed number of full-batch AdamW steps on the hinge loss. (The released code loops over every two examples of
the whole set and compares prompts inside the loop; looping within each prompt is the kinder version. The
reference also skips the per-step validation loss the release computes.)

Both fitters see the same generated rows, the same orderings and the same held-out prompts; both held-out
pair accuracies are computed afterwards by the same function (`rbr_model.fit.pair_accuracy`). Wall time is
end to end from the list of rows to fitted weights: for ours the whole `fit()` call (checks, feature matrix,
pairs, solve, metrics); for the reference pair building, tensors and the optimisation.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_fit.py            # the default 350 x 17 set
    PYTHONPATH=. .venv/bin/python benchmarks/bench_fit.py --help
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rbr_model.fit import HingeFitter, pair_accuracy, split_prompts  # noqa: E402

RESPONSE_TYPE = "hard_refuse"
LABELS = (  # best first; each beats every label after it
    "ideal",
    "minimum_acceptable_style",
    "unacceptable_completion",
    "illogical_completion",
    "disallowed_completion",
)


def generate(prompts: int, completions: int, n_props: int, flip: float, seed: int) -> list[dict]:
    """Rows that look like graded completions.

    Each label has a profile: the chance that each proposition is true of a completion with that label. A
    completion draws its true propositions from its label's profile; the grader then reports a probability
    per proposition (confident most of the time, wrong with probability `flip`), and class probabilities
    that lean towards the true class with noise. The reward model score is only weakly related to the label.
    """
    rng = np.random.default_rng(seed)
    n_labels = len(LABELS)
    profile = rng.uniform(0.05, 0.95, size=(n_labels, n_props))
    label_weights = rng.dirichlet(np.full(n_labels, 3.0))
    rows = []
    for p in range(prompts):
        labels = rng.choice(n_labels, size=completions, p=label_weights)
        truth = rng.random((completions, n_props)) < profile[labels]
        wrong = rng.random((completions, n_props)) < flip
        said = truth ^ wrong
        logits = np.where(said, 1.0, -1.0) * rng.gamma(4.0, 0.7, size=(completions, n_props))
        props = 1.0 / (1.0 + np.exp(-logits))
        class_logits = 2.0 * np.eye(n_labels)[labels] + rng.normal(0.0, 1.2, size=(completions, n_labels))
        classes = np.exp(class_logits)
        classes /= classes.sum(axis=1, keepdims=True)
        rm = rng.normal(0.0, 1.0, size=completions) - 0.15 * labels
        for k in range(completions):
            feats = {f"prop_{j:02d}": float(props[k, j]) for j in range(n_props)}
            feats.update({f"class:{LABELS[c]}": float(classes[k, c]) for c in range(n_labels)})
            rows.append({
                "prompt_id": f"prompt-{p:05d}",
                "response_type": RESPONSE_TYPE,
                "completion_label": LABELS[labels[k]],
                "rm_score": float(rm[k]),
                "features": feats,
            })
    return rows


def orderings() -> dict[str, dict[str, list[str]]]:
    """Each label beats every label below it, written out in full (the reference does not close orderings)."""
    return {RESPONSE_TYPE: {label: list(LABELS[i + 1:]) for i, label in enumerate(LABELS)}}


def reference_fit(rows, order, feature_names, heldout, margin, steps, lr, weight_decay):
    """The straightforward way: Python pair loop per prompt, torch AdamW on the hinge. Returns weights."""
    import torch

    by_prompt: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_prompt[(row["response_type"], row["prompt_id"])].append(i)
    train = []
    for (rt, pid), members in by_prompt.items():
        if pid in heldout:
            continue
        beats = order[rt]
        for i, j in itertools.combinations(members, 2):
            li, lj = rows[i]["completion_label"], rows[j]["completion_label"]
            if lj in beats.get(li, ()):
                train.append((i, j, margin))
            elif li in beats.get(lj, ()):
                train.append((j, i, margin))
    pairs = torch.tensor([(i, j) for i, j, _ in train], dtype=torch.int64)
    margins = torch.tensor([m for _, _, m in train], dtype=torch.float32)
    better, worse = pairs[:, 0], pairs[:, 1]
    values = torch.tensor([[row["features"][f] for f in feature_names] for row in rows], dtype=torch.float32)
    base = torch.tensor([row["rm_score"] for row in rows], dtype=torch.float32)

    w = torch.zeros(len(feature_names), requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        scores = base + values @ w
        loss = torch.relu(margins + scores[worse] - scores[better]).mean()
        loss.backward()
        opt.step()
    return w.detach().numpy().astype(float)


def heldout_accuracy(rows, order, feature_names, weights, heldout) -> float:
    """Pair accuracy of rm_score + w · features on the held-out prompts, the same code for both fitters."""
    held_rows = [r for r in rows if r["prompt_id"] in heldout]
    x = np.array([[r["features"][f] for f in feature_names] for r in held_rows])
    scores = np.array([r["rm_score"] for r in held_rows]) + x @ np.asarray(weights)
    return pair_accuracy(held_rows, order, scores)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description="Time rbr_model.fit.HingeFitter against a reference fitter (Python pair loop + torch "
        "AdamW, as OpenAI's release does it) on generated graded completions; report both held-out pair "
        "accuracies and the time ratio (reference / ours) from the same run.",
    )
    ap.add_argument("--prompts", type=int, default=350, help="prompts in the generated set (default 350)")
    ap.add_argument("--completions", type=int, default=17, help="completions per prompt (default 17)")
    ap.add_argument("--propositions", type=int, default=20,
                    help="proposition features; 5 class features are added (default 20, so 25 features)")
    ap.add_argument("--flip", type=float, default=0.08,
                    help="chance the simulated grader gets a proposition wrong (default 0.08)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the data and the held-out split (default 0)")
    ap.add_argument("--heldout", type=float, default=0.2, help="fraction of prompts held out (default 0.2)")
    ap.add_argument("--margin", type=float, default=1.0, help="hinge margin for both fitters (default 1.0)")
    ap.add_argument("--ref-steps", type=int, default=1000, help="reference AdamW steps (default 1000)")
    ap.add_argument("--ref-lr", type=float, default=0.01, help="reference AdamW learning rate (default 0.01)")
    ap.add_argument("--ref-weight-decay", type=float, default=0.0,
                    help="reference AdamW decoupled weight decay (default 0, as in OpenAI's release)")
    ap.add_argument("--weight-decay", type=float, default=HingeFitter().weight_decay,
                    help=f"our L2 weight decay (default {HingeFitter().weight_decay:g}, the fitter's default)")
    ap.add_argument("--ref-threads", type=int, default=1,
                    help="torch threads for the reference; 0 keeps torch's default. Default 1: on a small shared "
                    "VM, torch's multithreaded kernels for these tiny tensors are several times slower, so one "
                    "thread is the reference's best case")
    ap.add_argument("--solver", choices=("newton", "adam"), default="newton", help="our solver (default newton)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of ours; the median is reported (default 5)")
    ap.add_argument("--ref-repeats", type=int, default=3,
                    help="timed runs of the reference; the median is reported (default 3)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object only")
    args = ap.parse_args(argv)

    import torch  # imported before timing, so neither side pays for it

    if args.ref_threads > 0:
        torch.set_num_threads(args.ref_threads)

    rows = generate(args.prompts, args.completions, args.propositions, args.flip, args.seed)
    order = orderings()
    feature_names = sorted(rows[0]["features"])
    heldout = split_prompts([r["prompt_id"] for r in rows], args.heldout, args.seed)

    def ours():
        fitter = HingeFitter(margin=args.margin, weight_decay=args.weight_decay, heldout_fraction=args.heldout,
                             seed=args.seed, solver=args.solver)
        fitter.fit(rows, order, feature_names=feature_names)  # the reference is handed the same list
        return fitter

    def reference(steps=args.ref_steps):
        return reference_fit(rows, order, feature_names, heldout, args.margin, steps, args.ref_lr,
                             args.ref_weight_decay)

    ours()  # warm-up: first-call costs (imports, allocator) are not what we compare
    reference(steps=5)
    ours_times, ref_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fitter = ours()
        ours_times.append(time.perf_counter() - t0)
    for _ in range(args.ref_repeats):
        t0 = time.perf_counter()
        ref_w = reference()
        ref_times.append(time.perf_counter() - t0)

    assert fitter.heldout_prompts_ == heldout, "both fitters must hold out the same prompts"
    our_w = [fitter.weights_.weights[RESPONSE_TYPE][f] for f in feature_names]
    m = fitter.metrics_[RESPONSE_TYPE]
    result = {
        "examples": len(rows),
        "features": len(feature_names),
        "train_pairs": m["n_train_pairs"],
        "heldout_pairs": m["n_heldout_pairs"],
        "ours_solver": args.solver,
        "ours_steps": m["steps_run"],
        "ours_median_s": statistics.median(ours_times),
        "ours_min_s": min(ours_times),
        "ref_median_s": statistics.median(ref_times),
        "ref_min_s": min(ref_times),
        "ratio_median": statistics.median(ref_times) / statistics.median(ours_times),
        "ours_heldout_acc": heldout_accuracy(rows, order, feature_names, our_w, heldout),
        "ref_heldout_acc": heldout_accuracy(rows, order, feature_names, ref_w, heldout),
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(f"{result['examples']} examples, {result['features']} features, {result['train_pairs']} train pairs, "
          f"{result['heldout_pairs']} held-out pairs")
    print(f"{'fitter':<34}{'median s':>10}{'min s':>10}{'held-out pair acc':>20}")
    print(f"{'ours (' + args.solver + ', ' + str(m['steps_run']) + ' steps)':<34}{result['ours_median_s']:>10.4f}"
          f"{result['ours_min_s']:>10.4f}{result['ours_heldout_acc']:>20.4f}")
    print(f"{'reference (' + str(args.ref_steps) + ' AdamW steps)':<34}{result['ref_median_s']:>10.4f}"
          f"{result['ref_min_s']:>10.4f}{result['ref_heldout_acc']:>20.4f}")
    print(f"ratio (reference / ours, medians): {result['ratio_median']:.1f}x")
    return result


if __name__ == "__main__":
    main()
