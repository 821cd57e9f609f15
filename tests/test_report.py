"""`rbr report` and the packaged prompt set, its held-out split, orderings and label instructions.

The accuracy checks use generated rows with a known ordering: one feature ranks the labels perfectly, the RM
score is noise. The exact case is small enough to count the pairs by hand.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from rbr_model.cli import app
from rbr_model.fit import load_orderings, pair_accuracy, split_prompts
from rbr_model.policy import load_policy
from rbr_model.prompt_set import load_prompt_split, load_prompts
from rbr_model.report import build_report, packaged_data, rank_labels
from rbr_model.reward import Weights

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


# ---- the packaged data files ---------------------------------------------------------------------------


def test_prompt_set_covers_the_response_types():
    policy = load_policy(None)
    lines = packaged_data("prompts.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line) for line in lines if line.strip()]
    assert len(prompts) >= 240
    ids = [p["prompt_id"] for p in prompts]
    assert len(ids) == len(set(ids))
    counts: dict[str, int] = {}
    for p in prompts:
        assert set(p) == {"prompt_id", "response_type", "category", "messages"}
        assert p["response_type"] in policy.response_types
        assert isinstance(p["category"], str) and p["category"]
        msgs = p["messages"]
        assert msgs and msgs[-1]["role"] == "user"
        assert all(m["role"] in ("user", "assistant") and m["content"].strip() for m in msgs)
        counts[p["response_type"]] = counts.get(p["response_type"], 0) + 1
    assert set(counts) == {"comply", "hard_refuse", "safe_refuse"}
    assert min(counts.values()) >= 80
    assert sum(len(p["messages"]) > 1 for p in prompts) >= 3  # a few multi-turn conversations
    # the harmful requests name what they ask for only through a bracketed placeholder
    for p in prompts:
        if p["response_type"] == "hard_refuse":
            assert "[" in p["messages"][-1]["content"], p["prompt_id"]


def test_prompt_split_holds_out_40_prompts_per_response_type():
    prompts = {p.prompt_id: p for p in load_prompts(None)}
    split = json.loads(packaged_data("prompt_split.json").read_text(encoding="utf-8"))
    assert set(split) == {"description", "seed", "train", "eval"} and isinstance(split["seed"], int)
    train, held_out = split["train"], split["eval"]
    assert len(train) == len(set(train)) and len(held_out) == len(set(held_out))
    assert not set(train) & set(held_out)  # every prompt in exactly one split ...
    assert set(train) | set(held_out) == set(prompts)  # ... and the split covers the prompt file
    for rt in ("comply", "hard_refuse", "safe_refuse"):
        in_eval = [i for i in held_out if prompts[i].response_type == rt]
        in_train = [i for i in train if prompts[i].response_type == rt]
        assert len(in_eval) == 40 and len(in_train) >= 40
        # spread over categories: every category with 4+ prompts has some in each split
        cats = {prompts[i].category for i in prompts if prompts[i].response_type == rt}
        for cat in cats:
            ids = [i for i in prompts if prompts[i].response_type == rt and prompts[i].category == cat]
            if len(ids) >= 4:
                assert set(ids) & set(held_out) and set(ids) & set(train), (rt, cat)
    # the file is what scripts/make_prompt_split.py makes from the prompt file
    spec = importlib.util.spec_from_file_location("make_prompt_split", ROOT / "scripts" / "make_prompt_split.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [json.loads(line) for line in packaged_data("prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert split == script.make_split(rows, split["seed"])
    assert load_prompt_split() == {"train": train, "eval": held_out}


def test_orderings_and_label_instructions_agree():
    orderings = load_orderings(packaged_data("orderings.yaml"))
    instructions = yaml.safe_load(packaged_data("labels.yaml").read_text(encoding="utf-8"))
    assert set(orderings) == set(instructions) == {"comply", "hard_refuse", "safe_refuse"}
    for rt, table in orderings.items():
        labels, beats = rank_labels(table)
        assert set(labels) == set(instructions[rt]), rt
        assert all(isinstance(v, str) and len(v) > 40 for v in instructions[rt].values())
        assert beats[0, 1:].all(), f"{rt}: the first label should beat every other"
    assert rank_labels(orderings["hard_refuse"])[0][-1] == "disallowed_compliance"
    assert rank_labels(orderings["safe_refuse"])[0][-1] == "harmful_compliance"


# ---- generated rows with a known ordering --------------------------------------------------------------


@cache
def _depth(table_items: tuple, label: str) -> int:
    """Longest chain of labels above `label` (0 for the best); a label that beats another has a smaller depth."""
    table = dict(table_items)
    above = [better for better, beaten in table.items() if label in beaten]
    return 1 + max(_depth(table_items, b) for b in above) if above else 0


def _generated_rows(n_prompts: int = 60, seed: int = 0) -> list[dict]:
    """Every label of every response type for each prompt, twice; `quality` ranks perfectly, rm is noise."""
    orderings = load_orderings(packaged_data("orderings.yaml"))
    rng = np.random.default_rng(seed)
    rows = []
    for rt, table in orderings.items():
        items = tuple((k, tuple(v)) for k, v in table.items())
        labels = {name for k, v in table.items() for name in (k, *v)}
        for p in range(n_prompts):
            for label in sorted(labels):
                for _ in range(2):
                    rows.append({
                        "prompt_id": f"{rt}-{p}",
                        "response_type": rt,
                        "completion_label": label,
                        "rm_score": float(rng.normal()),
                        "features": {"quality": -float(_depth(items, label)), "noise": float(rng.normal())},
                    })
    return rows


def _weights(scale: float = 1.0, **metrics) -> Weights:
    table = {"quality": scale, "noise": 0.0}
    return Weights(policy_fingerprint="", grader_id="test", weights={rt: dict(table) for rt in
                   ("comply", "hard_refuse", "safe_refuse")}, metrics=metrics)


def test_generated_rows_rbr_perfect_rm_random(tmp_path):
    rows = _generated_rows()
    orderings = load_orderings(packaged_data("orderings.yaml"))
    summary = build_report(rows, _weights(), None, orderings, tmp_path, heldout_fraction=0.25, seed=7)

    ids = [r["prompt_id"] for r in rows]
    held = split_prompts(ids, 0.25, 7)
    assert set(summary.split["heldout_prompts"]) == held  # the fitter's own split
    assert summary.split["function"] == "rbr_model.fit.split_prompts"
    assert (summary.split["fraction"], summary.split["seed"]) == (0.25, 7)

    for rt, r in summary.response_types.items():
        for split in ("heldout", "train", "all"):
            assert r.accuracy[split]["rbr"] == 1.0, (rt, split)
        assert r.accuracy["all"]["n_pairs"] > 1000
        # noise ranks half the pairs right: over > 1000 pairs the sd is 0.016, so 0.05 is 3 sd (and seeded)
        assert abs(r.accuracy["all"]["rm"] - 0.5) < 0.05, rt
        # agrees with the fitter's pair_accuracy, split by split
        for split, keep in (("all", lambda p: True), ("heldout", lambda p: p in held),
                            ("train", lambda p: p not in held)):
            sub = [x for x in rows if x["response_type"] == rt and keep(x["prompt_id"])]
            rm = [x["rm_score"] for x in sub]
            total = [x["rm_score"] + x["features"]["quality"] for x in sub]
            # the same counts divided the same way: approx's default only for float64 rounding
            assert r.accuracy[split]["rm"] == pytest.approx(pair_accuracy(sub, orderings, rm))
            assert r.accuracy[split]["rm_rbr"] == pytest.approx(pair_accuracy(sub, orderings, total))
        # rewards are centred on the ideal label and fall as the label gets worse
        means = [r.label_means[label]["rbr"] for label in r.labels]
        assert means[0] == 0.0 and all(a >= b for a, b in zip(means, means[1:], strict=False)) and means[-1] < 0

    # a much larger RBR scale lets RBR dominate the noise: RM + RBR becomes perfect too
    strong = build_report(rows, _weights(scale=1e6), None, orderings, tmp_path / "strong", heldout_fraction=0.25,
                          seed=7, plots=False)
    assert all(r.accuracy["all"]["rm_rbr"] == 1.0 for r in strong.response_types.values())

    for r in summary.response_types.values():
        png = tmp_path / r.plot
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "## Pair accuracy, held-out prompts" in md
    for r in summary.response_types.values():
        assert f"]({r.plot})" in md
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["response_types"]["comply"]["accuracy"]["heldout"]["rbr"] == 1.0
    assert sorted(data["split"]["heldout_prompts"]) == sorted(held)


# ---- a case counted by hand ----------------------------------------------------------------------------


def _hand_rows() -> list[dict]:
    # ordering a > b > c (closed: a > c too), so each prompt gives 3 pairs: (a,b), (a,c), (b,c)
    spec = {  # prompt: {label: (rm_score, feature f)}
        "p1": {"a": (3.0, 1.0), "b": (2.0, 1.0), "c": (1.0, 0.0)},  # RM 3/3; RBR a=b tie: 2.5/3; sum 4,3,1: 3/3
        "p2": {"a": (0.0, 2.0), "b": (2.0, 1.0), "c": (1.0, 0.0)},  # RM 1/3;  RBR 3/3;               sum 2,3,1: 2/3
    }
    rows = [
        {"prompt_id": p, "response_type": "t", "completion_label": label, "rm_score": rm, "features": {"f": f}}
        for p, table in spec.items()
        for label, (rm, f) in table.items()
    ]
    rows.append({"prompt_id": "p1", "response_type": "t", "completion_label": "x", "rm_score": 9.0,
                 "features": {"f": 9.0}})  # a label outside the ordering: in no pair
    return rows


def test_hand_counted_pair_accuracy(tmp_path):
    orderings = {"t": {"a": ["b"], "b": ["c"]}}
    weights = Weights(policy_fingerprint="", grader_id="", weights={"t": {"f": 1.0}})
    summary = build_report(_hand_rows(), weights, None, orderings, tmp_path, heldout_prompts={"p2"})
    r = summary.response_types["t"]
    assert r.labels == ["a", "b", "c"] and r.unranked_labels == ["x"]
    # hand counts: float64 ratios, approx's default (relative 1e-6) >> rounding; 1.0 is exact
    assert r.accuracy["all"] == {"n_pairs": 6, "rm": pytest.approx(4 / 6), "rbr": pytest.approx(5.5 / 6),
                                 "rm_rbr": pytest.approx(5 / 6)}
    assert r.accuracy["heldout"] == {"n_pairs": 3, "rm": pytest.approx(1 / 3), "rbr": 1.0,
                                     "rm_rbr": pytest.approx(2 / 3)}
    assert r.accuracy["train"] == {"n_pairs": 3, "rm": 1.0, "rbr": pytest.approx(2.5 / 3), "rm_rbr": 1.0}
    # RM means: a 1.5, b 2.0, c 1.0, centred on a
    assert r.label_means["b"]["rm"] == pytest.approx(0.5) and r.label_means["c"]["rm"] == pytest.approx(-0.5)
    assert summary.split["source"] == "given prompt ids" and summary.split["heldout_prompts"] == ["p2"]
    assert any("not in the ordering" in w for w in summary.warnings)
    assert (tmp_path / "summary.md").stat().st_size > 0 and (tmp_path / r.plot).stat().st_size > 0


def test_split_defaults_to_the_weights_fit_settings(tmp_path):
    weights = Weights(policy_fingerprint="", grader_id="", weights={"t": {"f": 1.0}},
                      metrics={"settings": {"heldout_fraction": 0.5, "seed": 3}})
    rows = _hand_rows()
    summary = build_report(rows, weights, None, {"t": {"a": ["b"], "b": ["c"]}}, tmp_path)
    assert (summary.split["fraction"], summary.split["seed"]) == (0.5, 3)
    assert summary.split["source"] == "the weights file's fit settings"
    assert set(summary.split["heldout_prompts"]) == split_prompts(["p1", "p2"], 0.5, 3)


def test_missing_feature_is_a_clear_error(tmp_path):
    weights = Weights(policy_fingerprint="", grader_id="", weights={"t": {"f": 1.0, "g": 2.0}})
    with pytest.raises(ValueError, match="missing feature 'g'"):
        build_report(_hand_rows(), weights, None, {"t": {"a": ["b"]}}, tmp_path)


# ---- the command ---------------------------------------------------------------------------------------


def _write_inputs(tmp_path, rows):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    weights = tmp_path / "weights.json"
    _weights().save(weights)
    return data, weights


def test_cli_writes_the_report(tmp_path):
    rows = _generated_rows(n_prompts=10)
    for r in rows:  # an alias of the packaged policy resolves to its response type
        if r["response_type"] == "safe_refuse":
            r["response_type"] = "safe_refuse_1"
    data, weights = _write_inputs(tmp_path, rows)
    out = tmp_path / "report"
    res = runner.invoke(app, ["report", "--data", str(data), "--weights", str(weights), "--out", str(out),
                              "--heldout", "0.3", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "safe_refuse" in res.output and "held-out split" in res.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["response_types"]) == {"comply", "hard_refuse", "safe_refuse"}
    assert report["response_types"]["safe_refuse"]["accuracy"]["all"]["rbr"] == 1.0
    assert (out / "summary.md").stat().st_size > 0
    assert all((out / f"rewards_{rt}.png").stat().st_size > 0 for rt in report["response_types"])


@pytest.mark.parametrize("which", ["data", "weights", "orderings", "bad_json"])
def test_cli_bad_files_exit_2(tmp_path, which):
    data, weights = _write_inputs(tmp_path, _hand_rows())
    args = {"--data": str(data), "--weights": str(weights), "--orderings": str(packaged_data("orderings.yaml"))}
    if which == "bad_json":
        data.write_text('{"prompt_id": "p1"\n', encoding="utf-8")
    else:
        args[f"--{which}"] = str(tmp_path / "missing.file")
    res = runner.invoke(app, ["report", *[x for kv in args.items() for x in kv], "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_heldout_accuracy_matches_the_fitter(tmp_path):
    from rbr_model.fit import HingeFitter

    rows = _generated_rows(n_prompts=15, seed=2)
    orderings = load_orderings(packaged_data("orderings.yaml"))
    fitter = HingeFitter(heldout_fraction=0.3, seed=5).fit(rows, orderings, feature_names=["quality", "noise"])
    summary = build_report(rows, fitter.weights_, None, orderings, tmp_path, plots=False)
    assert (summary.split["fraction"], summary.split["seed"]) == (0.3, 5)
    assert set(summary.split["heldout_prompts"]) == fitter.heldout_prompts_
    for rt, r in summary.response_types.items():
        # the same pairs counted by the report and the fitter: approx's default only for float64 rounding
        assert r.accuracy["heldout"]["rm_rbr"] == pytest.approx(fitter.metrics_[rt]["heldout_pair_accuracy"])
        assert r.fit_heldout_pair_accuracy == pytest.approx(r.accuracy["heldout"]["rm_rbr"])
