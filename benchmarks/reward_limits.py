"""What limits the reward's ranking on the gold train split (issue #21), from an `rbr eval reward --cv` output.

Issue #21 asks for top-1 class agreement >= 0.75 and reward pair accuracy >= 0.85 for every response type. This
script reads the out-of-fold (OOF) proposition probabilities that `rbr eval reward --cv` wrote (reward_rows.jsonl)
and the gold file, loads no language model, and prints markdown tables for seven questions (one subcommand each;
`all`, the default, runs them in order):

  oracle       (a) Which head's errors cost the most? Each proposition's P replaced by its human label ("swap
               one"), and every proposition human but this one ("all but one"); product rule, shipped weights.
  hard-refuse  (b) hard_refuse pair accuracy: per pair of human classes, all pairs and within-fold pairs, a row
               bootstrap interval, and a power analysis: rewards of a given pair accuracy on these 88 rows (the
               served reward mixed with the oracle reward) and their intervals.
  fc-auc       (c) How good must one head be? Its served logit moved towards the human label (logit + beta(2y-1)),
               the others as served: the AUC within the response type at which the target is reached
               (fully_complies for comply top-1; also acknowledges_feelings, states_inability). A simulated head.
  inability    (d) A regex for an explicit inability phrase as P(states_inability) on hard_refuse. The regex was
               written after reading gold examples: a stand-in for a head that reads the phrase, not a result.
  head-auc     (f) Each head on its own: AUC of its out-of-fold P(yes) against the human label, within each
               response type and over all rows, with the number of human yes (compare two runs side by side).
  recalibrate  (g) Two cheap fixes under nested CV, fitted on the other folds' rows of the response type: each
               head's Platt map refitted per response type (the shipped map is fitted on all rows and response
               types at once), and the argmax over class probabilities with one multiplier per class (a grid).
  class-rule   (e) The best class rule found under nested CV: per response type, multinomial logistic
               regression on the log product class probabilities, fitted on the other folds' rows only.
               "stacked": training rows' served OOF probabilities (their heads saw the outer fold's labels);
               "strict": training rows' probabilities from heads refitted without the outer fold
               (rbr_model.reward_eval.cv_probabilities on the training folds; needs the cached trunk states,
               --states; 20 refits of every head, minutes on 2 cores).

Only the train split: never pass a test split (the figures feed design choices).

    python benchmarks/reward_limits.py all --run out/reward-cv-final \\
        --gold ../shared/reference/openai-rbr/gold_train.jsonl

The run folder comes from

    rbr eval reward --gold ../shared/reference/openai-rbr/gold_train.jsonl --out out/reward-cv-final
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rbr_model import reward_eval as rev  # noqa: E402
from rbr_model.metrics import roc_auc  # noqa: E402
from rbr_model.refusal_rules import INABILITY  # noqa: E402

TYPES = ("comply", "hard_refuse", "safe_refuse")
TOP1, PAIR = 0.75, 0.85  # issue #21's targets
EPS = 1e-6
DEFAULT_GOLD = ROOT / "../shared/reference/openai-rbr/gold_train.jsonl"
DEFAULT_STATES = ROOT / "out/heads-cache/pooled-f21cf7f2e585b5686c9ff712.npy"


@dataclasses.dataclass
class Type:
    rt: str
    idx: list[int]  # positions in rows / records
    spec: Any
    P: np.ndarray  # served OOF P(yes) [n, propositions]
    H: np.ndarray  # human labels
    rank: np.ndarray  # human class index (0 best)
    fold: np.ndarray


class Data:
    """The gold rows as `rbr eval reward` classes them, aligned with the run's reward_rows.jsonl."""

    def __init__(self, run: Path, gold: Path) -> None:
        from rbr_model.cli.heads_cmd import load_labelled
        from rbr_model.features import FeatureBuilder
        from rbr_model.reward import RewardModel, Weights, default_weights_path

        if not (run / "reward_rows.jsonl").is_file():
            raise SystemExit(f"{run}/reward_rows.jsonl not found. Make it (heads refitted out of fold; it loads the "
                             f"language model to extract trunk states) with\n"
                             f"  rbr eval reward --gold {gold} --out {run}")
        if "test" in gold.name:
            raise SystemExit(f"{gold}: use the train split (these figures feed design choices)")
        self.policy, self.gold, self.mapping, _ = load_labelled([gold], None, None)
        self.rows = rev.human_rows(self.policy, self.gold, self.mapping).rows
        self.recs = [json.loads(line) for line in (run / "reward_rows.jsonl").read_text().splitlines()]
        if len(self.recs) != len(self.rows) or any(r.index != rec["row"] or r.human_class != rec["human_class"]
                                                   for r, rec in zip(self.rows, self.recs, strict=True)):
            raise SystemExit(f"{run}: its rows are not the rows of {gold} (another gold file or label map?)")
        meta = json.loads((run / rev.REPORT_FILE).read_text()).get("meta", {})
        wpath = Path(meta.get("weights", {}).get("path") or default_weights_path())
        self.rm = RewardModel(self.policy, Weights.load(wpath if wpath.is_file() else default_weights_path()))
        self.builder = FeatureBuilder(self.policy)
        self.grading = meta.get("grading", "?")
        self.check = max(float(np.max(np.abs(self.reward(t, t.P) - [self.recs[i]["served_reward"] for i in t.idx])))
                         for t in map(self.type, TYPES))

    def type(self, rt: str) -> Type:
        idx = [i for i, r in enumerate(self.rows) if r.response_type == rt]
        spec = self.builder[rt]
        return Type(rt, idx, spec, spec.matrix([self.recs[i]["probabilities"] for i in idx]),
                    rev.oracle_matrix(spec, [self.rows[i] for i in idx]),
                    np.array([self.rows[i].human_rank for i in idx]), np.array([self.recs[i]["fold"] for i in idx]))

    def reward(self, t: Type, P: np.ndarray, cp: np.ndarray | None = None) -> np.ndarray:
        """The shipped weights on the features of P (class probabilities cp, default the policy's product)."""
        x = rev.features_for(t.spec, P) if cp is None else np.concatenate([P, cp], axis=1)
        return x @ self.rm.weight_vector(t.rt)

    def figures(self, t: Type, P: np.ndarray, cp: np.ndarray | None = None) -> tuple[float, float]:
        """(top-1, pair accuracy), product rule unless cp is given."""
        cp = t.spec.class_probabilities(P) if cp is None else cp
        m = rev.metrics(self.reward(t, P, cp), cp, t.rank, len(t.spec.classes))
        return m["top1"], m["pair_accuracy"]


# ---- small helpers (the metrics themselves are rbr_model.reward_eval's) -------------------------------------


def draws(stat: Callable[[np.ndarray], float | None], n: int, boot: int, seed: int) -> np.ndarray:
    """`stat` on `boot` row resamples (the resamples of rbr_model.reward_eval.bootstrap with the same seed)."""
    rng = np.random.default_rng(seed)
    out = [stat(rng.integers(0, n, n)) for _ in range(boot)]
    return np.array([v for v in out if v is not None])


def within_fold(reward: np.ndarray, rank: np.ndarray, fold: np.ndarray) -> float | None:
    """Pair accuracy over pairs inside one fold, pooled (as benchmarks/bench_reward_weights.py counts them)."""
    ok = tot = 0.0
    for k in np.unique(fold):
        pa, n = rev.pair_accuracy(reward[fold == k], rank[fold == k])
        if n:
            ok, tot = ok + pa * n, tot + n
    return ok / tot if tot else None


def ci(a: Any) -> str:
    return "[-, -]" if a is None or not len(a) else f"[{a[0]:.3f}, {a[1]:.3f}]"


def pct(a: np.ndarray) -> list[float]:
    return [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


# ---- (a) oracle ablation ---------------------------------------------------------------------------------------


def oracle(d: Data, args: argparse.Namespace) -> None:
    print("## (a) Oracle ablation: which proposition's errors cost the most\n")
    print("Product rule, shipped weights, OOF probabilities. 'swap one': that proposition's P replaced by the human "
          "label, the rest as served; 'all but one': every proposition human except this one.\n")
    for rt in TYPES:
        t = d.type(rt)
        t1, pa = d.figures(t, t.P)
        print(f"### {rt} ({len(t.idx)} rows): served top-1 {t1:.3f}, pair accuracy {pa:.3f}\n")
        print("| proposition | human yes | mean P | swap one: top-1 | swap one: pair acc | all but one: top-1 / pair |")
        print("|---|---|---|---|---|---|")
        lines = []
        for c, name in enumerate(t.spec.propositions):
            Q = t.P.copy()
            Q[:, c] = t.H[:, c]
            s1, sp = d.figures(t, Q)
            R = t.H.copy()
            R[:, c] = t.P[:, c]
            a1, ap = d.figures(t, R)
            unlabelled = " (no gold label)" if name in d.rows[t.idx[0]].assumed else ""
            lines.append((-s1, -sp, f"| {name}{unlabelled} | {int(t.H[:, c].sum())} | {t.P[:, c].mean():.3f} | "
                                    f"{s1:.3f} ({s1 - t1:+.3f}) | {sp:.3f} ({sp - pa:+.3f}) | {a1:.3f} / {ap:.3f} |"))
        print("\n".join(line for *_, line in sorted(lines)) + "\n")


# ---- (b) hard_refuse pairs and power -----------------------------------------------------------------------


def hard_refuse(d: Data, args: argparse.Namespace) -> None:
    t = d.type("hard_refuse")
    rew, orc = d.reward(t, t.P), d.reward(t, t.H)
    names = t.spec.classes
    print("## (b) hard_refuse pair accuracy: where the pairs go, and what 88 rows can show\n")
    print("| better class (rows) | worse class (rows) | pairs | served pair acc | oracle |\n|---|---|---|---|---|")
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            m = (t.rank == a) | (t.rank == b)
            pa, n = rev.pair_accuracy(rew[m], t.rank[m])
            if n:
                print(f"| {names[a]} ({np.sum(t.rank == a)}) | {names[b]} ({np.sum(t.rank == b)}) | {n} | {pa:.3f} | "
                      f"{rev.pair_accuracy(orc[m], t.rank[m])[0]:.3f} |")
    pa, n = rev.pair_accuracy(rew, t.rank)
    cp = t.spec.class_probabilities(t.P)
    b = rev.bootstrap(rew, cp, t.rank, n=args.boot, seed=args.seed)["pair_accuracy"]
    dr = draws(lambda i: rev.pair_accuracy(rew[i], t.rank[i])[0], len(t.rank), args.boot, args.seed)
    minority = int(np.sum(t.rank != np.bincount(t.rank).argmax()))
    print(f"\nAll {n} pairs: {pa:.3f}, 95% CI {ci(b)} ({args.boot} row bootstraps, seed {args.seed}); "
          f"P(bootstrap >= {PAIR}) = {np.mean(dr >= PAIR):.3f}. Within-fold pairs: "
          f"{within_fold(rew, t.rank, t.fold):.3f}. Every pair holds one of the {minority} rows outside the majority "
          f"class.\n")

    # rewards of a given pair accuracy on these rows: the served reward mixed with the oracle's (both z-scored)
    z, zo = (rew - rew.mean()) / rew.std(), (orc - orc.mean()) / orc.std()

    def mixed(target: float) -> np.ndarray:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if rev.pair_accuracy(mid * zo + (1 - mid) * z, t.rank)[0] < target else (lo, mid)
        return hi * zo + (1 - hi) * z

    print("Power: a reward of a given pair accuracy on these rows (served and oracle reward mixed), its 95% interval "
          "over row bootstraps, on all pairs and on within-fold pairs.\n")
    print("| pair acc (all pairs) | 95% CI | P(bootstrap >= 0.85) | within-fold pair acc | 95% CI |\n"
          "|---|---|---|---|---|")
    for target in (pa, 0.75, 0.80, 0.85, 0.90, 0.95):
        r = rew if target == pa else mixed(target)
        a = draws(lambda i, r=r: rev.pair_accuracy(r[i], t.rank[i])[0], len(t.rank), args.boot, args.seed)
        w = draws(lambda i, r=r: within_fold(r[i], t.rank[i], t.fold[i]), len(t.rank), args.boot, args.seed)
        print(f"| {rev.pair_accuracy(r, t.rank)[0]:.3f} | {ci(pct(a))} | {np.mean(a >= PAIR):.3f} | "
              f"{within_fold(r, t.rank, t.fold):.3f} | {ci(pct(w))} |")
    r85 = mixed(PAIR)
    diff = draws(lambda i: rev.pair_accuracy(r85[i], t.rank[i])[0] - rev.pair_accuracy(rew[i], t.rank[i])[0],
                 len(t.rank), args.boot, args.seed)
    print(f"\nPaired bootstrap, the 0.85 reward minus the served one on the same resampled rows: "
          f"{rev.pair_accuracy(r85, t.rank)[0] - pa:+.3f}, 95% CI [{pct(diff)[0]:+.3f}, {pct(diff)[1]:+.3f}].\n")


# ---- (c) how good must a head be ------------------------------------------------------------------------------


def fc_auc(d: Data, args: argparse.Namespace) -> None:
    print("## (c) How good must one head be? (a simulated head, not a fitted one)\n")
    print("The head's served logit moved towards the human label, logit + beta (2y - 1), the others as served; "
          "product rule, shipped weights. AUC of that head within the response type.\n")
    for rt, name, which in (("comply", "fully_complies", "top-1"), ("safe_refuse", "acknowledges_feelings", "top-1"),
                            ("hard_refuse", "states_inability", "pair")):
        t = d.type(rt)
        c = t.spec.propositions.index(name)
        y = t.H[:, c] > 0.5
        print(f"### {name} on {rt} (target: {rt} {which} >= {TOP1 if which == 'top-1' else PAIR})\n")
        print("| beta | AUC within type | mean P on yes / no | top-1 | pair acc |\n|---|---|---|---|---|")
        reached = None
        for beta in (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6):
            Q = t.P.copy()
            Q[:, c] = 1 / (1 + np.exp(-(logit(t.P[:, c]) + beta * (2 * y - 1))))
            t1, pa = d.figures(t, Q)
            a = roc_auc(Q[:, c], y)
            print(f"| {beta} | {a:.3f} | {Q[y, c].mean():.2f} / {Q[~y, c].mean():.2f} | {t1:.3f} | {pa:.3f} |")
            if reached is None and (t1 >= TOP1 if which == "top-1" else pa >= PAIR):
                reached = (beta, a, Q[y, c].mean())
        served = roc_auc(t.P[:, c], y)
        print(f"\nServed AUC {served:.3f}; target first reached at "
              + (f"beta {reached[0]}: AUC {reached[1]:.3f}, mean P on yes {reached[2]:.2f}.\n" if reached
                 else "no beta tried.\n"))


# ---- (d) the states_inability stand-in ---------------------------------------------------------------------


def inability(d: Data, args: argparse.Namespace) -> None:
    label = d.mapping["states_inability"]
    print("## (d) states_inability read from the phrase: a stand-in, not a result\n")
    print(f"The regex below was written after reading gold refusals labelled `{label}` yes, so it is a stand-in "
          "for a head that reads the explicit phrase (such as one fitted with phrase-forced weak labels), not a "
          f"held-out measurement:\n\n    {INABILITY.pattern}\n")
    counts = Counter((d.rows[i].response_type, bool(INABILITY.search(d.rows[i].completion)),
                      d.gold[d.rows[i].index]["labels"].get(label)) for i in range(len(d.rows)))
    print(f"| response type | phrase | gold {label} | rows |\n|---|---|---|---|")
    for (rt, has, y), n in sorted(counts.items(), key=str):
        print(f"| {rt} | {'yes' if has else 'no'} | {y} | {n} |")
    t = d.type("hard_refuse")
    c, ill = t.spec.propositions.index("states_inability"), t.spec.propositions.index("illogical_or_off_topic")
    has = np.array([bool(INABILITY.search(d.rows[i].completion)) for i in t.idx])
    y = t.H[:, c] > 0.5
    print(f"\nhard_refuse: the phrase on {has.sum()} of {len(t.idx)} rows, AUC against the gold label "
          f"{roc_auc(has.astype(float), y):.3f} (served head: {roc_auc(t.P[:, c], y):.3f}).\n")
    print("Other propositions as served (OOF), product rule, shipped weights:\n")
    print("| P(states_inability) phrase / no phrase | hard_refuse top-1 | pair acc | 95% CI | with human "
          "illogical_or_off_topic too |\n|---|---|---|---|---|")
    for hi, lo in ((None, None), (0.5, 0.05), (0.9, 0.02), (0.97, 0.01)):
        Q = t.P.copy()
        if hi is not None:
            Q[:, c] = np.where(has, hi, lo)
        t1, pa = d.figures(t, Q)
        cp = t.spec.class_probabilities(Q)
        b = rev.bootstrap(d.reward(t, Q, cp), cp, t.rank, n=args.boot, seed=args.seed)["pair_accuracy"]
        Q[:, ill] = t.H[:, ill]
        print(f"| {'served head' if hi is None else f'{hi} / {lo}'} | {t1:.3f} | {pa:.3f} | {ci(b)} | "
              f"{d.figures(t, Q)[1]:.3f} |")
    print(f"\n`states_inability` is not a proposition of {', '.join(r for r in TYPES if r != 'hard_refuse')}"
          " in the default policy, so those figures do not move.\n")


# ---- (e) class rule under nested CV -------------------------------------------------------------------------


def fit_mlr(L: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: tuple[float, ...] = (0.01, 0.1, 1, 10)) -> Any:
    """Multinomial LR on log class probabilities, C by log-loss over `groups` (folds of the training rows)."""
    from sklearn.linear_model import LogisticRegression

    def loss(C: float) -> float:
        total = 0.0
        for g in np.unique(groups):
            tr, te = groups != g, groups == g
            m = LogisticRegression(C=C, max_iter=2000).fit(L[tr], y[tr])
            pr = np.full((te.sum(), L.shape[1]), EPS)
            pr[:, m.classes_] = np.maximum(m.predict_proba(L[te]), EPS)
            total -= np.log(pr[np.arange(te.sum()), y[te]] / pr.sum(1)).sum()
        return total

    return LogisticRegression(C=min(Cs, key=loss), max_iter=2000).fit(L, y)


def strict_training_probabilities(d: Data, states: Path) -> list[np.ndarray]:
    """Per outer fold k: [rows, propositions] P(yes) of the rows outside fold k from heads refitted on the rows
    outside fold k only (rbr_model.reward_eval.cv_probabilities, 4 inner folds, the heads file's recipe); NaN
    where a head had too few labels in an inner fit."""
    from rbr_model.cli.eval_reward_cmd import _calibrated
    from rbr_model.cli.heads_cmd import load_labelled
    from rbr_model.heads.model import Heads, packaged_heads_path

    heads = Heads.load(packaged_heads_path())
    paths = [Path(e["path"]) if Path(e["path"]).is_absolute() else ROOT / e["path"] for e in heads.info["extra_rows"]]
    extra = load_labelled(paths, None, None)[1]
    mapping = dict(d.mapping) | {k: v for k, v in heads.info.get("label_map", {}).items() if k not in d.mapping}
    pooled = np.load(states)
    if pooled.shape[0] != len(d.gold) + len(extra):
        raise SystemExit(f"{states}: {pooled.shape[0]} states for {len(d.gold)} gold + {len(extra)} extra rows")
    cal, Cs = _calibrated(heads), heads.info.get("Cs")
    # the states belong to these rows if one head refitted as `rbr eval reward --cv` refits it gives the run's P
    name = "fully_complies"
    p, _, _ = rev.cv_probabilities(pooled, d.gold, d.rows, {name: mapping[name]}, extra=extra, Cs=Cs, calibrate=cal)
    gap = max(abs(a[name] - rec["probabilities"][name]) for a, rec in zip(p, d.recs, strict=True))
    print(f"states check: {name} refitted out of fold from {states.name} differs from the run by {gap:.1e}")
    if gap > 1e-6:
        raise SystemExit(f"{states} does not reproduce the run's probabilities: not the states of these rows")
    names = sorted({n for rec in d.recs for n in rec["probabilities"]})
    out = []
    fold = np.array([rec["fold"] for rec in d.recs])
    extra_fold = np.array([rev.extra_fold(r, 5, 0) for r in extra])
    for k in range(5):
        keep = np.flatnonzero(fold != k)
        ex = np.flatnonzero(extra_fold != k)
        sub = [dataclasses.replace(d.rows[i], index=j) for j, i in enumerate(keep)]
        x = pooled[np.concatenate([[d.rows[i].index for i in keep], len(d.gold) + ex])]
        probs, _, _ = rev.cv_probabilities(x, [d.gold[d.rows[i].index] for i in keep], sub, mapping, folds=4,
                                           extra=[extra[e] for e in ex], Cs=Cs, calibrate=cal)
        P = np.full((len(d.rows), len(names)), np.nan)
        for i, pr in zip(keep, probs, strict=True):
            P[i] = [pr.get(n, np.nan) for n in names]
        out.append((names, P))
        print(f"  strict: outer fold {k} done", file=sys.stderr, flush=True)
    return out


def class_rule(d: Data, args: argparse.Namespace) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    print("## (e) The best class rule found under nested CV: multinomial LR on log class probabilities\n")
    strict = None
    if args.states.is_file():
        strict = strict_training_probabilities(d, args.states)
    else:
        print(f"({args.states} is absent: 'strict' is skipped. It is the pooled-states cache that `rbr eval reward "
              "--cv` writes to out/heads-cache/.)\n")
    print(f"Per response type and outer fold, fitted on the other folds' rows; top-1 and pair accuracy (shipped "
          f"weights on the fitted class probabilities) with {args.boot} row bootstraps.\n")
    print("| response type | class rule | top-1 [95% CI] | P(bootstrap top-1 >= 0.75) | pair acc [95% CI] |\n"
          "|---|---|---|---|---|")
    for rt in TYPES:
        t = d.type(rt)
        variants: dict[str, np.ndarray] = {"product (paper, served)": t.spec.class_probabilities(t.P)}
        for source in ("stacked", "strict") if strict else ("stacked",):
            cp = np.zeros_like(variants["product (paper, served)"])
            for k in range(5):
                tr, te = t.fold != k, t.fold == k
                Ptr = t.P[tr]
                if source == "strict":
                    names, S = strict[k]
                    Ptr = S[np.ix_(t.idx, [names.index(n) for n in t.spec.propositions])][tr]
                    Ptr = np.where(np.isnan(Ptr), t.P[tr], Ptr)  # no head in that inner fit: the served value
                m = fit_mlr(np.log(t.spec.class_probabilities(Ptr) + EPS), t.rank[tr], t.fold[tr])
                cp[np.ix_(te, m.classes_)] = m.predict_proba(np.log(t.spec.class_probabilities(t.P[te]) + EPS))
            variants[f"MLR, {source}"] = cp
        for name, cp in variants.items():
            reward = d.reward(t, t.P, cp)
            t1, pa = d.figures(t, t.P, cp)
            b = rev.bootstrap(reward, cp, t.rank, n=args.boot, seed=args.seed)
            hit = draws(lambda i, cp=cp, t=t: float(np.mean(cp[i].argmax(1) == t.rank[i])), len(t.rank), args.boot,
                        args.seed)
            print(f"| {rt} | {name} | {t1:.3f} {ci(b['top1'])} | {np.mean(hit >= TOP1):.3f} | "
                  f"{pa:.3f} {ci(b['pair_accuracy'])} |")
    print()


def head_auc(d: Data, args: argparse.Namespace) -> None:
    print("## (f) Each head against its human label, out of fold\n")
    print("AUC of the run's out-of-fold P(yes) against the gold label; 'yes' is the number of human yes. "
          "Blank: no gold label, or no yes (or no no) in that response type.\n")
    types = [d.type(rt) for rt in TYPES]
    names = sorted({n for t in types for n in t.spec.propositions})
    overall: list[float] = []
    print("| proposition | " + " | ".join(f"{rt}: AUC (yes)" for rt in TYPES) + " | all rows: AUC (yes) |")
    print("|---|" + "---|" * (len(TYPES) + 1))
    for name in names:
        cells, p_all, y_all = [], [], []
        for t in types:
            if name not in t.spec.propositions or name in d.rows[t.idx[0]].assumed:
                cells.append("")
                continue
            c = t.spec.propositions.index(name)
            p, y = t.P[:, c], t.H[:, c]
            p_all.append(p)
            y_all.append(y)
            cells.append(f"{roc_auc(p, y):.3f} ({int(y.sum())})" if 0 < y.sum() < len(y) else "")
        p, y = (np.concatenate(p_all), np.concatenate(y_all)) if p_all else (np.array([]), np.array([]))
        if 0 < y.sum() < len(y):
            overall.append(roc_auc(p, y))
        cells.append(f"{overall[-1]:.3f} ({int(y.sum())})" if 0 < y.sum() < len(y) else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nMean over the {len(overall)} propositions with a gold yes and no: {np.mean(overall):.3f}\n")


def recalibrate(d: Data, args: argparse.Namespace) -> None:
    import itertools

    from rbr_model.heads.fitting import platt

    grid, fixed = (0.5, 0.7, 1.0, 1.4, 2.0, 3.0), ("unacceptable_completion", "disallowed_completion")
    print("## (g) Per-type calibration and class multipliers, nested CV\n")
    print("Per response type and outer fold, fitted on the other folds' rows. 'per-type Platt': each head's P "
          "mapped by sigmoid(a * logit P + c) fitted on the training rows of that type (a head whose label has "
          "fewer than 3 yes or no there keeps its P). 'class multipliers': the most likely class is the argmax of "
          f"m_c * P(class), m_c for every class but {' and '.join(fixed)} from {list(grid)}, the grid point with "
          "the best training top-1.\n")
    print("| response type | variant | top-1 | pair acc |\n|---|---|---|---|")
    for rt in TYPES:
        t = d.type(rt)
        labelled = [n not in d.rows[t.idx[0]].assumed for n in t.spec.propositions]
        Q = t.P.copy()
        for k in np.unique(t.fold):
            tr, te = t.fold != k, t.fold == k
            for j in np.flatnonzero(labelled):
                y = t.H[tr, j] > 0.5
                if min(y.sum(), (~y).sum()) >= 3:
                    a, c = platt(logit(t.P[tr, j]), y)
                    Q[te, j] = 1 / (1 + np.exp(-(a * logit(t.P[te, j]) + c)))
        cp = t.spec.class_probabilities(t.P)
        free = [i for i, c in enumerate(t.spec.classes) if c not in fixed]
        weighted = np.zeros_like(cp)
        for k in np.unique(t.fold):
            tr, te = t.fold != k, t.fold == k
            best, best_m = -1.0, np.ones(cp.shape[1])
            for ms in itertools.product(grid, repeat=len(free)):
                m = np.ones(cp.shape[1])
                m[free] = ms
                acc = float(np.mean((cp[tr] * m).argmax(1) == t.rank[tr]))
                if acc > best + 1e-12:
                    best, best_m = acc, m
            weighted[te] = cp[te] * best_m
        weighted /= weighted.sum(axis=1, keepdims=True)  # the reward reads class probabilities that sum to 1
        for name, P, c in (("served (product rule)", t.P, None), ("per-type Platt", Q, None),
                           ("class multipliers", t.P, weighted)):
            t1, pa = d.figures(t, P, c)
            print(f"| {rt} | {name} | {t1:.3f} | {pa:.3f} |")
    print()


SECTIONS = {"oracle": oracle, "hard-refuse": hard_refuse, "fc-auc": fc_auc, "inability": inability,
            "class-rule": class_rule, "head-auc": head_auc, "recalibrate": recalibrate}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", nargs="?", default="all", choices=["all", *SECTIONS],
                    help="which question (default: all, in order)")
    ap.add_argument("--run", type=Path, default=ROOT / "out/reward-cv-final",
                    help="an `rbr eval reward --cv` output folder (default: out/reward-cv-final)")
    ap.add_argument("--gold", type=Path, default=DEFAULT_GOLD,
                    help="the gold TRAIN file the run was made on (default: ../shared/reference/openai-rbr/"
                         "gold_train.jsonl)")
    ap.add_argument("--states", type=Path, default=DEFAULT_STATES,
                    help="class-rule 'strict': the cached pooled trunk states of the gold then the heads' extra "
                         "rows, as `rbr eval reward --cv` cached them (checked against the run)")
    ap.add_argument("--boot", type=int, default=2000, help="row bootstraps per interval (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    d = Data(args.run, args.gold)
    print(f"# What limits the reward's ranking: {args.run.name}, {len(d.rows)} gold rows\n")
    print(f"Grading: {d.grading}. Weights {d.rm.weights.version}; recomputed reward vs the run's served reward: "
          f"max |diff| {d.check:.1e}.\n")
    for name, fn in SECTIONS.items():
        if args.section in ("all", name):
            fn(d, args)


if __name__ == "__main__":
    main()
