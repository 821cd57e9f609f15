"""Does the reward rank completions the way people do? `rbr eval reward` on human-labelled rows.

Every labelled row (OpenAI's gold format, through a label map) gets a **human class**: its labels, as the
policy's propositions, through the policy's own class rules (`rbr_model.features.derive_class`). A proposition
the row does not label counts as false (the rows record which were assumed). The classes are ranked by the
policy's `class_order` (first is best).

The **reward as served** comes from proposition probabilities graded in process, through a running service
(`/v1/rewards`), or, for the rows the heads were fitted on, from heads refitted out of fold
(`cv_probabilities`). The same weights are then applied to **oracle features**: the human labels as the
propositions' probabilities. The served figures fall short of the oracle's by what the grader loses; the
oracle's fall short of 1 by what the weights (and the class rules) lose.

Per response type, each with a bootstrap interval over rows:
- pair accuracy: over pairs of rows whose human classes differ, the share where the better class gets the
  higher reward (ties count half);
- AUC of the reward for the best class present (`ideal` where there is one) against the rest;
- top-1 agreement: the share of rows whose most likely class is the human class; and the confusion matrix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.features import FeatureBuilder, FeatureSpec, derive_class
from rbr_model.policy import Policy

REPORT_FILE = "reward_eval.json"
PLOT_FILE = "reward_eval.png"
ROWS_FILE = "reward_rows.jsonl"
EXTRA_ROWS_FILE = "extra_rows_oof.jsonl"


class RewardEvalError(ValueError):
    """Rows, labels or settings that cannot be evaluated; the message says which."""


# ---- human classes ------------------------------------------------------------------------------------------


@dataclass
class LabelledRow:
    """One gold row as the reward evaluation sees it."""

    index: int  # position in the gold file
    response_type: str  # the policy's key
    messages: list[dict[str, str]]
    completion: str
    labels: dict[str, bool]  # the policy's needed propositions -> human label (unlabelled ones False)
    assumed: tuple[str, ...]  # needed propositions the row had no label for
    human_class: str
    human_rank: int  # index in the response type's classes (0 is best)


@dataclass
class HumanRows:
    rows: list[LabelledRow]
    skipped: dict[str, int] = field(default_factory=dict)  # why -> count


def human_rows(policy: Policy, gold: Sequence[Mapping[str, Any]], mapping: Mapping[str, str]) -> HumanRows:
    """The gold rows with a response type of the policy and a human class; the rest counted in `skipped`.

    `mapping` is `{policy proposition: gold label}` (as `rbr_model.evaluate.resolve_label_map` returns)."""
    builder = FeatureBuilder(policy)
    out: list[LabelledRow] = []
    skipped: dict[str, int] = {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for i, row in enumerate(gold):
        rt = policy.find_response_type(row.get("response_type"))
        if rt is None:
            skip(f"response type {row.get('response_type')!r} not in the policy")
            continue
        spec = builder[rt]
        labels: dict[str, bool] = {}
        assumed = []
        for name in spec.propositions:
            label = mapping.get(name, name)
            if label in row["labels"]:
                labels[name] = bool(row["labels"][label])
            else:
                labels[name] = False
                assumed.append(name)
        cls, hits = derive_class(spec, labels)
        if cls is None:
            skip("labels match no class" if hits == 0 else "labels match several classes")
            continue
        out.append(LabelledRow(i, rt, list(row["prompt"]), row["completion"], labels, tuple(assumed), cls,
                               spec.classes.index(cls)))
    return HumanRows(out, skipped)


def oracle_matrix(spec: FeatureSpec, rows: Sequence[LabelledRow]) -> np.ndarray:
    """[n, propositions]: the human labels as probabilities (unlabelled propositions 0, as the human class)."""
    return np.array([[float(r.labels[p]) for p in spec.propositions] for r in rows]).reshape(len(rows), -1)


# ---- metrics ------------------------------------------------------------------------------------------------


def pair_accuracy(reward: np.ndarray, rank: np.ndarray) -> tuple[float | None, int]:
    """Share of pairs with different human ranks ordered right by `reward` (lower rank is better; ties half)."""
    reward, rank = np.asarray(reward, float), np.asarray(rank)
    better = rank[:, None] < rank[None, :]  # i's class beats j's
    n = int(better.sum())
    if n == 0:
        return None, 0
    diff = reward[:, None] - reward[None, :]
    score = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    return float(score[better].sum() / n), n


def auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann-Whitney AUC of `score` for `positive` rows against the rest (ties half); None with one class."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    diff = pos[:, None] - neg[None, :]
    return float(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0)).mean())


def metrics(reward: np.ndarray, class_probs: np.ndarray, rank: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Pair accuracy, AUC for the best class present, top-1 agreement and the confusion matrix."""
    rank = np.asarray(rank, int)
    pa, pairs = pair_accuracy(reward, rank)
    best = int(rank.min()) if len(rank) else 0
    predicted = np.asarray(class_probs).argmax(axis=1) if len(rank) else np.zeros(0, int)
    confusion = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(confusion, (rank, predicted), 1)
    return {"pair_accuracy": pa, "pairs": pairs, "auc_best": auc(reward, rank == best), "best_class_rank": best,
            "top1": float(np.mean(predicted == rank)) if len(rank) else None, "confusion": confusion.tolist()}


def bootstrap(reward: np.ndarray, class_probs: np.ndarray, rank: np.ndarray, *, n: int, seed: int,
              level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile intervals of pair accuracy, AUC (best class of the full rows) and top-1 over rows resampled."""
    rng = np.random.default_rng(seed)
    rank = np.asarray(rank, int)
    best = rank.min()
    predicted = np.asarray(class_probs).argmax(axis=1)
    draws: dict[str, list[float]] = {"pair_accuracy": [], "auc_best": [], "top1": []}
    for _ in range(n):
        i = rng.integers(0, len(rank), len(rank))
        pa, _ = pair_accuracy(reward[i], rank[i])
        a = auc(reward[i], rank[i] == best)
        for key, value in (("pair_accuracy", pa), ("auc_best", a), ("top1", float(np.mean(predicted[i] == rank[i])))):
            if value is not None:
                draws[key].append(value)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: ([float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v else None) for k, v in draws.items()}


# ---- the evaluation -----------------------------------------------------------------------------------------


ClassProbabilities = Callable[[FeatureSpec, np.ndarray], np.ndarray]


def product_classes(spec: FeatureSpec, p: np.ndarray) -> np.ndarray:
    """The policy's class probabilities as served (`FeatureSpec.class_probabilities`)."""
    return spec.class_probabilities(p)


def evaluate_reward(policy: Policy, reward_model: Any, rows: Sequence[LabelledRow],
                    probabilities: Sequence[Mapping[str, float]], *, served_rewards: Sequence[float] | None = None,
                    n_boot: int = 1000, seed: int = 0, classes_from: ClassProbabilities = product_classes,
                    ) -> dict[str, Any]:
    """Per response type: served and oracle metrics with bootstrap intervals, and one record per row.

    `probabilities[i]` holds P(yes) of every proposition row i's response type needs. The served reward is
    `reward_model` on the features of those probabilities; `served_rewards` (from a service) replace it, and the
    largest difference to the local computation is reported (`weights_check`), which says whether the local
    weights are the ones served. `classes_from` turns probabilities into class probabilities (top-1 and the
    class features)."""
    if len(probabilities) != len(rows):
        raise RewardEvalError(f"{len(probabilities)} probability rows for {len(rows)} labelled rows")
    builder = FeatureBuilder(policy)
    per_type: dict[str, Any] = {}
    records: list[dict[str, Any]] = [{} for _ in rows]
    check: list[float] = []
    for rt in policy.classes:
        idx = [i for i, r in enumerate(rows) if r.response_type == rt]
        if not idx:
            continue
        spec = builder[rt]
        sub = [rows[i] for i in idx]
        rank = np.array([r.human_rank for r in sub])
        w = reward_model.weight_vector(rt)
        entry: dict[str, Any] = {"n": len(sub), "classes": list(spec.classes),
                                 "human_counts": {c: int(np.sum(rank == k)) for k, c in enumerate(spec.classes)}}
        for kind in ("served", "oracle"):
            p = spec.matrix([probabilities[i] for i in idx]) if kind == "served" else oracle_matrix(spec, sub)
            cp = classes_from(spec, p)
            reward = np.concatenate([p, cp], axis=1) @ w
            if kind == "served" and served_rewards is not None:
                remote = np.array([served_rewards[i] for i in idx], dtype=float)
                check.append(float(np.max(np.abs(remote - reward))))
                reward = remote
            m = metrics(reward, cp, rank, len(spec.classes))
            m["ci"] = bootstrap(reward, cp, rank, n=n_boot, seed=seed)
            m["mean_class_probability"] = {c: float(cp[:, k].mean()) for k, c in enumerate(spec.classes)}
            entry[kind] = m
            for j, i in enumerate(idx):
                rec = records[i]
                rec[f"{kind}_reward"] = float(reward[j])
                rec[f"{kind}_class"] = spec.classes[int(cp[j].argmax())]
                if kind == "served":
                    rec["probabilities"] = {n: float(v) for n, v in zip(spec.propositions, p[j], strict=True)}
                    rec["class_probabilities"] = {c: float(v) for c, v in zip(spec.classes, cp[j], strict=True)}
        per_type[rt] = entry
    for r, rec in zip(rows, records, strict=True):
        rec.update({"row": r.index, "response_type": r.response_type, "human_class": r.human_class,
                    "assumed_false": list(r.assumed)})
    report: dict[str, Any] = {"response_types": per_type, "rows": records,
                              "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "over": "rows"}}
    if served_rewards is not None:
        report["weights_check"] = {"max_abs_diff": max(check) if check else None,
                                   "note": "served reward minus the local weights on the served features"}
    return report


def features_for(spec: FeatureSpec, p: np.ndarray, classes_from: ClassProbabilities = product_classes) -> np.ndarray:
    return np.concatenate([p, classes_from(spec, p)], axis=1)


# ---- heads out of fold ----------------------------------------------------------------------------------------


def fold_of(rows: Sequence[LabelledRow], folds: int, seed: int) -> np.ndarray:
    """Fold number per row: stratified by response type and human class, so every fold sees each kind."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(rows), dtype=int)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.response_type, r.human_class), []).append(i)
    start = 0
    for key in sorted(groups):
        members = np.array(groups[key])
        rng.shuffle(members)
        out[members] = (np.arange(len(members)) + start) % folds
        start += len(members)  # continue the rotation so small groups do not all land in fold 0
    return out


def extra_fold(row: Mapping[str, Any], folds: int, seed: int) -> int:
    """The fold of an extra row: by its prompt (its `prompt_id`, else the conversation), so that completions of
    one prompt share a fold."""
    import hashlib

    key = str(row.get("prompt_id") or json.dumps(row["prompt"], sort_keys=True))
    return int(hashlib.sha256(f"{seed}|{key}".encode()).hexdigest(), 16) % folds


def cv_probabilities(pooled: np.ndarray, gold: Sequence[Mapping[str, Any]], rows: Sequence[LabelledRow],
                     mapping: Mapping[str, str], *, folds: int = 5, seed: int = 0,
                     extra: Sequence[Mapping[str, Any]] = (), Cs: Sequence[float] | None = None,
                     progress: Callable[[int], None] | None = None, heads_fit: Callable[..., Any] | None = None,
                     calibrate: bool = False,
                     ) -> tuple[list[dict[str, float]], list[dict[str, float]], dict[str, Any]]:
    """P(yes) from heads refitted out of fold: for each fold, heads are fitted (as `rbr heads fit` fits them) on
    the gold rows and the `extra` rows of the other folds, and predict the fold's rows of both kinds.

    Gold rows are folded by response type and human class (`fold_of`), extra rows by prompt (`extra_fold`).
    `pooled` holds the states of `gold` then of `extra`, in order. Propositions without a head in a fold (too
    few labels) are left out of that fold's dicts; the caller grades them another way. Returns the gold rows'
    probabilities (in `rows` order), the extra rows' (in `extra` order) and a summary. `calibrate` fits the heads
    with their out-of-fold Platt map (`rbr_model.heads.fitting.fit_heads`), as the heads file was fitted."""
    from rbr_model.heads.fitting import DEFAULT_CS, fit_heads, tasks_from_rows

    if pooled.shape[0] != len(gold) + len(extra):
        raise RewardEvalError(f"{pooled.shape[0]} pooled states for {len(gold)} + {len(extra)} rows")
    fit = heads_fit or fit_heads
    fold = fold_of(rows, folds, seed)
    gold_fold = np.full(len(gold), -1)
    gold_fold[[r.index for r in rows]] = fold  # gold rows without a class train every fold, never scored
    all_fold = np.concatenate([gold_fold, [extra_fold(r, folds, seed) for r in extra]]).astype(int)
    all_rows = [*gold, *extra]
    scored = [r.index for r in rows] + list(range(len(gold), len(all_rows)))
    out: dict[int, dict[str, float]] = {}
    headed: list[set[str]] = []
    for k in range(folds):
        train = np.flatnonzero(all_fold != k)
        tasks, _ = tasks_from_rows([all_rows[j] for j in train], mapping)
        fitted = fit(pooled[train], tasks, Cs=Cs or DEFAULT_CS, seed=seed, calibrate=calibrate)
        names = [t.name for t in tasks]
        headed.append(set(names))
        test = [j for j in scored if all_fold[j] == k]
        x = pooled[test]
        z = ((x - fitted["mean"]) / fitted["scale"]) @ np.asarray(fitted["weights"]).T + fitted["bias"]
        p = 1.0 / (1.0 + np.exp(-z))
        for i, j in enumerate(test):
            out[j] = {n: float(v) for n, v in zip(names, p[i], strict=True)}
        if progress:
            progress(k + 1)
    common = set.intersection(*headed) if headed else set()
    summary = {"folds": folds, "seed": seed, "headed_in_every_fold": sorted(common),
               "fold_sizes": [int(np.sum(fold == k)) for k in range(folds)], "extra_rows": len(extra),
               "extra": "folded by prompt: trains the other folds, scored out of fold", "calibrated": calibrate,
               "row_folds": fold.tolist(), "extra_folds": all_fold[len(gold):].tolist()}
    return ([out[r.index] for r in rows], [out[len(gold) + i] for i in range(len(extra))], summary)


# ---- output -------------------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "    -" if v is None else f"{v:.3f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "[  -  ,   -  ]" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def format_report(report: Mapping[str, Any]) -> str:
    """A table: per response type, served and oracle pair accuracy, AUC (best class) and top-1, with intervals."""
    lines = [f"{'response type':<13} {'n':>4} {'pairs':>6}  {'':<6} {'pair acc [95% CI]':>21}  "
             f"{'AUC best [95% CI]':>21}  {'top-1 [95% CI]':>21}"]
    for rt, e in report["response_types"].items():
        for kind in ("served", "oracle"):
            m = e[kind]
            lead = f"{rt:<13} {e['n']:>4} {m['pairs']:>6}" if kind == "served" else " " * 25
            lines.append(f"{lead}  {kind:<6} {_fmt(m['pair_accuracy'])} {_ci(m['ci']['pair_accuracy']):>15}  "
                         f"{_fmt(m['auc_best'])} {_ci(m['ci']['auc_best']):>15}  {_fmt(m['top1'])} "
                         f"{_ci(m['ci']['top1']):>15}")
    for rt, e in report["response_types"].items():
        classes = e["classes"]
        short = [c[:10] for c in classes]
        lines.append(f"\n{rt}: human class (rows) x most likely class as served (columns)")
        lines.append(f"{'':<26}" + "".join(f"{s:>11}" for s in short))
        for k, c in enumerate(classes):
            lines.append(f"{c:<26}" + "".join(f"{v:>11}" for v in e["served"]["confusion"][k]))
    return "\n".join(lines)


def plot_report(report: Mapping[str, Any], path: str | Path, title: str) -> Path:
    """Served vs oracle pair accuracy, AUC and top-1 per response type (95% intervals), and the served confusion
    matrices (row-normalised)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    types = list(report["response_types"])
    keys = (("pair_accuracy", "pair accuracy"), ("auc_best", "AUC, best class vs rest"), ("top1", "top-1 class"))
    fig, axes = plt.subplots(2, max(3, len(types)), figsize=(4.2 * max(3, len(types)), 8.0))
    colors = {"served": "#3b6ea8", "oracle": "#8e8e8e"}
    for col, (key, label) in enumerate(keys):
        ax = axes[0][col]
        pos = np.arange(len(types))
        for k, kind in enumerate(("served", "oracle")):
            vals = [report["response_types"][t][kind][key] for t in types]
            vals = [np.nan if v is None else v for v in vals]
            cis = [report["response_types"][t][kind]["ci"][key] for t in types]
            err = np.array([[v - c[0], c[1] - v] if c and np.isfinite(v) else [0, 0]
                            for v, c in zip(vals, cis, strict=True)]).T
            ax.bar(pos + (k - 0.5) * 0.38, vals, width=0.38, yerr=err, color=colors[kind],
                   label=f"{kind} features" if kind == "served" else "oracle (human labels)", capsize=3)
        ax.axhline(0.5 if key != "top1" else 0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(pos)
        ax.set_xticklabels(types, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(label, fontsize=10)
        if col == 0:
            ax.legend(fontsize=8, loc="lower left")
    for col in range(3, axes.shape[1]):
        axes[0][col].axis("off")
    for col in range(axes.shape[1]):
        ax = axes[1][col]
        if col >= len(types):
            ax.axis("off")
            continue
        e = report["response_types"][types[col]]
        conf = np.array(e["served"]["confusion"], dtype=float)
        norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        short = [c.replace("_completion", "").replace("minimum_acceptable_style", "min_style") for c in e["classes"]]
        ax.set_xticks(range(len(short)))
        ax.set_xticklabels(short, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(short)))
        ax.set_yticklabels(short, fontsize=7)
        for (a, b), v in np.ndenumerate(conf):
            if v:
                ax.text(b, a, str(int(v)), ha="center", va="center", fontsize=7,
                        color="white" if norm[a, b] > 0.6 else "black")
        ax.set_title(f"{types[col]}: human (rows) x served top-1", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- a ranking to fit weights on ------------------------------------------------------------------------------

# Synthetic rows whose order is certain by construction (scripts/make_weak_labels.py and
# make_weak_style_labels.py): on the same prompt, the `better` kind beats the `worse` kind whatever the grader says.
# Off-topic rows rank only on comply prompts: on a refusal prompt an on-topic answer may be the disallowed one.
CERTAIN_PAIRS = {
    "hard_refuse": {"refusal": ["harmful-forced"], "insulting-refuse-no": ["insulting-refuse-yes"],
                    "third-person-no": ["third-person-yes"], "inability-yes": ["inability-no"],
                    "threatening-refuse-no": ["threatening-refuse-yes"]},
    "safe_refuse": {"refusal": ["harmful-forced"], "insulting-refuse-no": ["insulting-refuse-yes"],
                    "third-person-no": ["third-person-yes"], "definitive-no": ["definitive-yes"],
                    "threatening-refuse-no": ["threatening-refuse-yes"]},
    "comply": {"insulting-comply-no": ["insulting-comply-yes"],
               "threatening-comply-no": ["threatening-comply-yes"], "off-topic-no": ["off-topic-yes"]},
}


def ranking_orderings(policy: Policy) -> dict[str, dict[str, list[str]]]:
    """Orderings for `rbr fit`: each response type's classes in class order (each beats the next), plus the
    certain synthetic pairs; labels of the two kinds never meet (a gold row and a synthetic row share no prompt)."""
    out: dict[str, dict[str, list[str]]] = {}
    for rt in policy.classes:
        classes = list(policy.classes[rt])
        table = {c: ([classes[k + 1]] if k + 1 < len(classes) else []) for k, c in enumerate(classes)}
        for better, worse in CERTAIN_PAIRS.get(rt, {}).items():
            table[better] = list(worse)
            for w in worse:
                table.setdefault(w, [])
        out[rt] = table
    return out


def ranking_rows(policy: Policy, gold_records: Sequence[Mapping[str, Any]],
                 extra_records: Sequence[Mapping[str, Any]] = (),
                 classes_from: ClassProbabilities = product_classes, missing_extra: float | None = 0.0,
                 ) -> list[dict[str, Any]]:
    """Rows for `rbr fit` from `rbr eval reward --cv` output: every feature out of fold.

    Gold rows are labelled with their human class and grouped per (response type, fold), so the fitter pairs
    rows of different classes within a fold and `rbr fit`'s held-out prompts are whole folds. Extra rows whose
    kind is in `CERTAIN_PAIRS` for their response type are grouped per prompt; the others are left out. An extra
    row has no probability for a proposition that had no head in its fold (the gold rows had the prompted grader
    there); it takes `missing_extra` (None: an error). A record's `rm_score` (a reward model's score of its
    completion, for weights fitted on top of that RM) is carried over; without one the row's is 0."""
    builder = FeatureBuilder(policy)
    out: list[dict[str, Any]] = []

    def add(prompt_id: str, rt: str, label: str, probs: Mapping[str, float], fill: float | None = None,
            rm_score: float = 0.0) -> None:
        spec = builder[rt]
        if fill is not None:
            probs = {n: fill for n in spec.propositions} | dict(probs)
        if any(n not in probs for n in spec.propositions):
            raise RewardEvalError(f"{prompt_id}: no probability for "
                                  f"{[n for n in spec.propositions if n not in probs]}")
        x = features_for(spec, spec.matrix([probs]), classes_from)[0]
        out.append({"prompt_id": prompt_id, "response_type": rt, "completion_label": label,
                    "rm_score": float(rm_score),
                    "features": dict(zip(spec.feature_names, map(float, x), strict=True))})

    for rec in gold_records:
        if "fold" not in rec:
            raise RewardEvalError("gold records without a fold: use the output of `rbr eval reward --cv`")
        add(f"gold-{rec['response_type']}-fold{rec['fold']}", rec["response_type"], rec["human_class"],
            rec["probabilities"], rm_score=rec.get("rm_score", 0.0))
    for rec in extra_records:
        rt = policy.find_response_type(rec.get("response_type"))
        kinds = CERTAIN_PAIRS.get(rt or "", {})
        known = set(kinds) | {w for worse in kinds.values() for w in worse}
        if rt is None or rec.get("kind") not in known:
            continue
        add(f"synth-{rec['prompt_id']}-fold{rec['fold']}", rt, rec["kind"], rec["probabilities"], missing_extra,
            rm_score=rec.get("rm_score", 0.0))
    return out
