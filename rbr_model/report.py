"""`rbr report`: how well RM, RBR and RM + RBR rank labelled completions, with plots and a Markdown summary.

For every response type in the data this computes pair accuracy (the fraction of ordered pairs of completions
of one prompt that a score ranks the right way round, ties counting half, exactly as the fitter counts them)
for three scores:

* RM alone: ``rm_score`` (a missing or null score counts as 0);
* RBR alone: ``w[response_type] · features``;
* RM + RBR: their sum, the reward the service returns.

Pairs come from the orderings, closed transitively like the fitter closes them. Accuracies are reported on the
held-out prompts, on the training prompts and on all prompts. The held-out prompts are chosen by the fitter's
own function (`rbr_model.fit.split_prompts`) over every prompt id in the rows, so the same data file, fraction
and seed give the same split as `rbr fit`; by default the fraction and seed are read from the weights file's
fit settings. The split used is written to ``report.json``.

Plots: one PNG per response type, reward by completion label (best label at the top), each score shifted so
that the mean reward of the best ("ideal") label is 0. This is the view OpenAI's RBR release uses: a good
reward puts every other label to the left of zero, the worse the further.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.fit import build_pairs, split_prompts, validate_orderings
from rbr_model.policy import Policy
from rbr_model.reward import Weights

SCORERS = ("rm", "rbr", "rm_rbr")
SCORER_TITLES = {"rm": "RM alone", "rbr": "RBR alone", "rm_rbr": "RM + RBR"}
SPLITS = ("heldout", "train", "all")
DEFAULT_HELDOUT_FRACTION = 0.2
DEFAULT_SEED = 0
MAX_POINTS_PER_LABEL = 400  # points drawn in each strip; the boxes and means use every row


def packaged_data(name: str) -> Path:
    """A file shipped in ``rbr_model/data/`` (``orderings.yaml``, ``labels.yaml``, ``prompts.jsonl``)."""
    return Path(str(resources.files("rbr_model") / "data" / name))


# ---- results -------------------------------------------------------------------------------------------


@dataclass
class ResponseTypeReport:
    response_type: str
    n_rows: int
    n_prompts: int
    n_heldout_prompts: int
    labels: list[str]  # ranked labels, best first
    ideal_label: str
    unranked_labels: list[str]  # labels in the rows that the ordering does not mention: they make no pair
    has_weights: bool
    # split ("heldout" | "train" | "all") -> {"n_pairs": int, "rm": acc, "rbr": acc, "rm_rbr": acc}; acc is
    # None where there is no pair (or, for rbr and rm_rbr, no weights)
    accuracy: dict[str, dict[str, Any]]
    # label -> {"n": rows, "<scorer>": mean reward minus the mean ideal reward (None without rows or weights)}
    label_means: dict[str, dict[str, Any]]
    fit_heldout_pair_accuracy: float | None = None  # what the weights file says, for comparison
    fit_scored_with: str | None = None  # "rbr" when the fit ignored the RM (no_rm), else "rm_rbr"
    plot: str | None = None  # file name inside out_dir


@dataclass
class ReportSummary:
    out_dir: Path
    split: dict[str, Any]  # fraction, seed, source, function, heldout prompt ids
    weights_version: str
    policy: str | None
    response_types: dict[str, ResponseTypeReport]
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # role -> path

    def accuracy(self, response_type: str, scorer: str, split: str = "heldout") -> float | None:
        return self.response_types[response_type].accuracy[split][scorer]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        return _json_safe(out)


# ---- the report ----------------------------------------------------------------------------------------


def build_report(
    rows: Sequence[Mapping[str, Any]],
    weights: Weights,
    policy: Policy | None = None,
    orderings: Mapping[str, Any] | None = None,
    out_dir: str | Path = "report",
    *,
    heldout_fraction: float | None = None,
    seed: int | None = None,
    heldout_prompts: Collection[str] | None = None,
    sources: Mapping[str, str] | None = None,
    plots: bool = True,
) -> ReportSummary:
    """Compute the accuracies, draw the plots, write ``summary.md`` and ``report.json`` into ``out_dir``.

    ``orderings`` defaults to the packaged ``rbr_model/data/orderings.yaml``. The held-out prompts are
    ``heldout_prompts`` when given; otherwise ``split_prompts(all prompt ids, fraction, seed)`` where fraction
    and seed come from the arguments, else from the weights file's fit settings, else 0.2 and 0. With a
    policy, response type names in rows, weights and orderings are resolved through its aliases, and a weights
    file fitted for another policy is reported as a warning. ``sources`` ({"data": path, ...}) is only shown
    in the summary; ``plots=False`` skips the PNGs. Raises ValueError on malformed rows or orderings.
    """
    warnings: list[str] = []
    if orderings is None:
        from rbr_model.fit import load_orderings

        orderings = load_orderings(packaged_data("orderings.yaml"))
    table = validate_orderings(orderings)
    data = _normalise_rows(rows)
    if not data:
        raise ValueError("rows: no rows to report on")

    def resolve(name: str) -> str:
        return (policy.find_response_type(name) if policy is not None else None) or name

    table = {resolve(rt): t for rt, t in table.items()}
    wtable = {resolve(rt): t for rt, t in weights.weights.items()}
    if policy is not None and weights.policy_fingerprint and weights.policy_fingerprint != policy.fingerprint:
        warnings.append(
            f"the weights were fitted for policy fingerprint {weights.policy_fingerprint[:12]}, not for the loaded "
            f"policy {policy.short_version}; the RBR scores assume the rows' features mean the same thing"
        )

    split = _choose_split(data, weights, heldout_fraction, seed, heldout_prompts)
    held = set(split["heldout_prompts"])
    if split["unknown_ids"]:
        warnings.append(f"{len(split['unknown_ids'])} held-out prompt ids are not in the rows, e.g. "
                        f"{split['unknown_ids'][0]!r}")

    pids = np.array([r["prompt_id"] for r in data])
    rts = np.array([resolve(r["response_type"]) for r in data])
    rm = np.array([r["rm_score"] for r in data], dtype=float)
    if all(r["rm_score_missing"] for r in data):
        warnings.append("no row has an rm_score: RM alone scores every completion 0 (accuracy 0.5)")
    for rt in sorted(set(rts.tolist()) - set(table)):
        warnings.append(f"response type {rt!r} has no ordering: its {int((rts == rt).sum())} rows are not reported")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit_rt_metrics = (weights.metrics or {}).get("response_types") or {}
    fit_no_rm = bool(((weights.metrics or {}).get("settings") or {}).get("no_rm", False))

    reports: dict[str, ResponseTypeReport] = {}
    for rt in [name for name in table if name in set(rts.tolist())]:
        idx = np.flatnonzero(rts == rt)
        labels, beats = rank_labels(table[rt])
        row_labels = [data[i]["completion_label"] for i in idx]
        unranked = sorted(set(row_labels) - set(labels))
        codes = np.array([labels.index(lab) if lab in labels else len(labels) for lab in row_labels], dtype=np.int64)
        padded = np.zeros((len(labels) + 1, len(labels) + 1), dtype=bool)
        padded[:-1, :-1] = beats
        _, groups = np.unique(pids[idx], return_inverse=True)
        a, b = build_pairs(groups, codes, padded)
        is_held = np.array([p in held for p in pids[idx]], dtype=bool)

        scores: dict[str, np.ndarray | None] = {"rm": rm[idx], "rbr": None, "rm_rbr": None}
        if rt in wtable:
            scores["rbr"] = _rbr_scores(data, idx, rt, wtable[rt])
            scores["rm_rbr"] = rm[idx] + scores["rbr"]
        else:
            warnings.append(f"the weights have no entry for response type {rt!r}: RBR accuracy not reported")
        if unranked:
            warnings.append(f"{rt}: labels {unranked} are not in the ordering and make no pairs")

        pair_held = is_held[a]  # both ends share a prompt
        masks = {"heldout": pair_held, "train": ~pair_held, "all": np.ones(a.size, dtype=bool)}
        accuracy = {
            split_name: {
                "n_pairs": int(mask.sum()),
                **{s: _accuracy(scores[s], a[mask], b[mask]) for s in SCORERS},
            }
            for split_name, mask in masks.items()
        }

        ideal = labels[0]
        label_means = _label_means(scores, codes, labels, ideal)
        fit_m = fit_rt_metrics.get(rt) if isinstance(fit_rt_metrics, Mapping) else None
        fit_acc = fit_m.get("heldout_pair_accuracy") if isinstance(fit_m, Mapping) else None
        report = ResponseTypeReport(
            response_type=rt,
            n_rows=int(idx.size),
            n_prompts=int(np.unique(pids[idx]).size),
            n_heldout_prompts=int(np.unique(pids[idx][is_held]).size),
            labels=list(labels),
            ideal_label=ideal,
            unranked_labels=unranked,
            has_weights=rt in wtable,
            accuracy=accuracy,
            label_means=label_means,
            fit_heldout_pair_accuracy=float(fit_acc) if isinstance(fit_acc, int | float) else None,
            fit_scored_with=("rbr" if fit_no_rm else "rm_rbr") if isinstance(fit_acc, int | float) else None,
        )
        if not (codes == 0).any():
            warnings.append(f"{rt}: no row has the ideal label {ideal!r}; rewards are not centred")
        if plots:
            report.plot = _plot(out_dir / f"rewards_{_safe(rt)}.png", rt, scores, codes, labels, ideal, len(held))
        reports[rt] = report

    if not reports:
        raise ValueError(
            f"no response type of the rows ({sorted(set(rts.tolist()))}) has an ordering ({sorted(table)})"
        )
    summary = ReportSummary(
        out_dir=out_dir,
        split=split,
        weights_version=weights.version,
        policy=policy.short_version if policy is not None else None,
        response_types=reports,
        warnings=warnings,
    )
    summary.files = {
        "summary": str(out_dir / "summary.md"),
        "json": str(out_dir / "report.json"),
        **{f"plot:{rt}": str(out_dir / r.plot) for rt, r in reports.items() if r.plot},
    }
    (out_dir / "summary.md").write_text(_markdown(summary, weights, sources or {}), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return summary


# ---- pieces --------------------------------------------------------------------------------------------


def rank_labels(table: Mapping[str, Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Labels of one response type, best first, and the transitively closed ``beats[i, j]`` in that order.

    A label is ranked by how many labels beat it (fewer is better; if a beats b, everything that beats a also
    beats b, so b always comes later). Ties keep the order the labels first appear in the file.
    """
    labels: list[str] = []
    for label, beaten in table.items():
        for name in (label, *beaten):
            if name not in labels:
                labels.append(name)
    n = len(labels)
    beats = np.zeros((n, n), dtype=bool)
    for label, beaten in table.items():
        for other in beaten:
            beats[labels.index(label), labels.index(other)] = True
    for k in range(n):  # Warshall's transitive closure; there are only a handful of labels
        beats |= beats[:, [k]] & beats[[k], :]
    if np.diag(beats).any():
        raise ValueError(f"ordering has a cycle through {labels[int(np.flatnonzero(np.diag(beats))[0])]!r}")
    order = sorted(range(n), key=lambda i: (int(beats[:, i].sum()), i))
    return [labels[i] for i in order], beats[np.ix_(order, order)]


def _normalise_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n, row in enumerate(rows, start=1):
        where = f"row {n}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        for key in ("prompt_id", "response_type", "completion_label", "features"):
            if key not in row:
                raise ValueError(f"{where}: field {key!r}: missing")
        if not isinstance(row["features"], Mapping):
            raise ValueError(f"{where}: field 'features': expected an object of {{name: number}}")
        rm = row.get("rm_score")
        if rm is not None and (isinstance(rm, bool) or not isinstance(rm, int | float) or not math.isfinite(rm)):
            raise ValueError(f"{where}: field 'rm_score': expected a finite number or null, got {rm!r}")
        out.append({
            "prompt_id": str(row["prompt_id"]),
            "response_type": str(row["response_type"]),
            "completion_label": str(row["completion_label"]),
            "rm_score": 0.0 if rm is None else float(rm),
            "rm_score_missing": rm is None,
            "features": row["features"],
        })
    return out


def _choose_split(
    data: list[dict[str, Any]],
    weights: Weights,
    fraction: float | None,
    seed: int | None,
    explicit: Collection[str] | None,
) -> dict[str, Any]:
    all_ids = sorted({r["prompt_id"] for r in data})
    if explicit is not None:
        held = {str(p) for p in explicit}
        unknown = held - set(all_ids)
        return {
            "source": "given prompt ids",
            "fraction": None,
            "seed": None,
            "function": None,
            "n_prompts": len(all_ids),
            "n_heldout": len(held & set(all_ids)),
            "unknown_ids": sorted(unknown),
            "heldout_prompts": sorted(held & set(all_ids)),
        }
    settings = (weights.metrics or {}).get("settings") or {}
    sources = []
    fit_fraction, fit_seed = settings.get("heldout_fraction"), settings.get("seed")
    if fraction is None and isinstance(fit_fraction, int | float) and not isinstance(fit_fraction, bool):
        fraction = float(fit_fraction)
        sources.append("fraction")
    if seed is None and isinstance(fit_seed, int) and not isinstance(fit_seed, bool):
        seed = fit_seed
        sources.append("seed")
    if fraction is None:
        fraction = DEFAULT_HELDOUT_FRACTION
    if seed is None:
        seed = DEFAULT_SEED
    held = split_prompts(all_ids, float(fraction), int(seed))
    if len(sources) == 2:
        source = "the weights file's fit settings"
    elif sources:
        source = f"{sources[0]} from the weights file's fit settings, the rest given or default"
    else:
        source = "given or default"
    return {
        "source": source,
        "fraction": float(fraction),
        "seed": int(seed),
        "function": "rbr_model.fit.split_prompts",
        "n_prompts": len(all_ids),
        "n_heldout": len(held),
        "unknown_ids": [],
        "heldout_prompts": sorted(held),
    }


def _rbr_scores(data: list[dict[str, Any]], idx: np.ndarray, rt: str, w: Mapping[str, float]) -> np.ndarray:
    names = list(w)
    vec = np.array([w[n] for n in names], dtype=float)
    x = np.empty((idx.size, len(names)))
    for k, i in enumerate(idx):
        feats = data[i]["features"]
        for j, name in enumerate(names):
            value = feats.get(name)
            if value is None:
                raise ValueError(
                    f"row {int(i) + 1} (prompt_id {data[i]['prompt_id']!r}, {rt}): missing feature {name!r} "
                    "that the weights use"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(
                    f"row {int(i) + 1} (prompt_id {data[i]['prompt_id']!r}): field 'features.{name}': expected a "
                    f"finite number, got {value!r}"
                )
            x[k, j] = value
    return x @ vec


def _accuracy(score: np.ndarray | None, a: np.ndarray, b: np.ndarray) -> float | None:
    """Pairs ranked the right way round, a tie counting half; None without pairs or without the score."""
    if score is None or a.size == 0:
        return None
    diff = score[a] - score[b]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _centre(score: np.ndarray, codes: np.ndarray) -> float:
    ideal = score[codes == 0]
    return float(ideal.mean()) if ideal.size else 0.0


def _label_means(
    scores: Mapping[str, np.ndarray | None], codes: np.ndarray, labels: Sequence[str], ideal: str
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for code, label in enumerate(labels):
        mask = codes == code
        entry: dict[str, Any] = {"n": int(mask.sum())}
        for s in SCORERS:
            score = scores[s]
            entry[s] = None if score is None or not mask.any() else float(score[mask].mean() - _centre(score, codes))
        out[label] = entry
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---- plots ---------------------------------------------------------------------------------------------


def _plot(
    path: Path,
    rt: str,
    scores: Mapping[str, np.ndarray | None],
    codes: np.ndarray,
    labels: Sequence[str],
    ideal: str,
    n_held: int,
) -> str:
    """One figure per response type: a panel per score, a box and a strip of points per label, best on top."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = [s for s in SCORERS if scores[s] is not None]
    shown = [i for i in range(len(labels)) if (codes == i).any()]  # labels with rows, best first
    if (codes == len(labels)).any():
        shown.append(len(labels))
    names = [*labels, "(not in ordering)"]
    cmap = colormaps["RdYlGn"]
    colours = {c: cmap(1.0 - c / max(len(labels) - 1, 1)) if c < len(labels) else (0.6, 0.6, 0.6, 1.0)
               for c in shown}
    rng = np.random.default_rng(0)

    fig = Figure(figsize=(4.6 * len(present) + 2.4, 0.55 * len(shown) + 1.9), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, attached directly: no pyplot, no global backend switch
    axes = fig.subplots(1, len(present), sharey=True, squeeze=False)[0]
    for ax, s in zip(axes, present, strict=True):
        score = scores[s]
        assert score is not None
        centred = score - _centre(score, codes)
        groups = [centred[codes == c] for c in shown]
        ys = np.arange(len(shown))
        box = _boxplot(ax, groups, ys)
        for patch, c in zip(box["boxes"], shown, strict=True):
            patch.set_facecolor(colours[c])
            patch.set_alpha(0.45)
        for y, values, c in zip(ys, groups, shown, strict=True):
            pick = values if values.size <= MAX_POINTS_PER_LABEL else rng.choice(values, MAX_POINTS_PER_LABEL, False)
            jitter = rng.uniform(-0.18, 0.18, pick.size)
            dark = tuple(0.7 * v for v in colours[c][:3])  # the pale middle of the colour map, made visible
            ax.scatter(pick, y + jitter, s=7, color=dark, edgecolors="none", alpha=0.55, zorder=2)
            ax.scatter([values.mean()], [y], marker="D", s=26, color="black", zorder=3)
        ax.axvline(0.0, color="0.3", linestyle="--", linewidth=1, zorder=1)
        ax.set_title(SCORER_TITLES[s])
        ax.set_xlabel(f"reward − mean {ideal} reward")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(np.arange(len(shown)), [f"{names[c]} (n={int((codes == c).sum())})" for c in shown])
    axes[0].invert_yaxis()
    axes[0].set_ylabel("completion label (best at top)")
    held_note = f", {n_held} prompts held out of the fit" if n_held else ""
    fig.suptitle(
        f"{rt}: reward by completion label, centred on the mean {ideal} reward "
        f"(all rows{held_note}; ◆ = label mean)",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    return path.name


def _boxplot(ax: Any, groups: list[np.ndarray], positions: np.ndarray) -> dict[str, Any]:
    """Horizontal boxes; matplotlib 3.10 replaced ``vert=False`` with ``orientation="horizontal"``."""
    kw: dict[str, Any] = {"positions": positions, "widths": 0.5, "patch_artist": True, "showfliers": False,
                          "medianprops": {"color": "black"}}
    try:
        return ax.boxplot(groups, orientation="horizontal", **kw)
    except TypeError:
        return ax.boxplot(groups, vert=False, **kw)


# ---- markdown ------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _markdown(summary: ReportSummary, weights: Weights, sources: Mapping[str, str]) -> str:
    sp = summary.split
    lines = ["# RBR report", ""]
    for key, value in sources.items():
        lines.append(f"- {key}: `{value}`")
    lines.append(f"- weights: version `{summary.weights_version}`"
                 + (f", created {weights.created_at}" if weights.created_at else "")
                 + (f", grader `{weights.grader_id}`" if weights.grader_id else ""))
    if summary.policy:
        lines.append(f"- policy: `{summary.policy}`")
    if sp["function"]:
        lines.append(f"- held-out split: {sp['n_heldout']} of {sp['n_prompts']} prompts, `{sp['function']}` with "
                     f"fraction {sp['fraction']} and seed {sp['seed']} ({sp['source']})")
    else:
        lines.append(f"- held-out split: {sp['n_heldout']} of {sp['n_prompts']} prompts, {sp['source']}")
    lines.append("- pair accuracy: ordered pairs of completions of one prompt ranked the right way round; a tie "
                 "counts half")
    for w in summary.warnings:
        lines.append(f"- **warning:** {w}")

    for split, title in (("heldout", "held-out prompts"), ("all", "all prompts"), ("train", "training prompts")):
        lines += ["", f"## Pair accuracy, {title}", ""]
        extra = split == "heldout"
        head = "| response type | pairs | RM | RBR | RM + RBR |" + (" fit (weights file) |" if extra else "")
        lines += [head, "|---|---:|---:|---:|---:|" + ("---:|" if extra else "")]
        for rt, r in summary.response_types.items():
            acc = r.accuracy[split]
            cells = [rt, str(acc["n_pairs"]), *(_fmt(acc[s]) for s in SCORERS)]
            if extra:
                fit = _fmt(r.fit_heldout_pair_accuracy)
                if r.fit_scored_with:
                    fit += f" ({SCORER_TITLES[r.fit_scored_with]})"
                cells.append(fit)
            lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Reward by completion label", "",
              "Mean reward per label minus the mean reward of the ideal label, labels best first; the plots show "
              "every row.", ""]
    for rt, r in summary.response_types.items():
        lines += [f"### {rt}", ""]
        if r.plot:
            lines += [f"![{rt}: reward by completion label]({r.plot})", ""]
        lines += ["| label | rows | RM | RBR | RM + RBR |", "|---|---:|---:|---:|---:|"]
        for label in r.labels:
            m = r.label_means[label]
            lines.append(f"| {label} | {m['n']} | " + " | ".join(_fmt(m[s]) for s in SCORERS) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
