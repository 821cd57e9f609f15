"""The weight fitter: it recovers known orderings, honours margins, splits by prompt, and fails clearly."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from rbr_model.cli import app
from rbr_model.features import FeatureSpec
from rbr_model.fit import (
    HingeFitter,
    build_pairs,
    load_orderings,
    load_rows,
    pair_accuracy,
    split_prompts,
)
from rbr_model.policy import parse_policy
from rbr_model.reward import RewardModel, Weights

ORDER = {"refuse": {"ideal": ["flawed"], "flawed": ["disallowed"]}}  # ideal > disallowed only by closure
LEVEL = {"ideal": 1.0, "flawed": 0.0, "disallowed": -1.0}
W_TRUE = np.array([2.0, -1.5, 1.0, -0.5, 0.8, 0.0])


def make_rows(prompts=80, per_label=2, noise=0.1, seed=0, rm_scale=0.3, rt="refuse"):
    """Features shifted along sign(W_TRUE) by the label's level, plus noise: W_TRUE ranks the labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        for label, level in LEVEL.items():
            for _ in range(per_label):
                x = 0.5 + 0.2 * level * np.sign(W_TRUE) + rng.normal(0.0, noise, W_TRUE.size)
                rows.append({
                    "prompt_id": f"p{p:03d}",
                    "response_type": rt,
                    "completion_label": label,
                    "rm_score": float(rng.normal(0.0, rm_scale)),
                    "features": {f"f{j}": float(v) for j, v in enumerate(x)},
                })
    rng.shuffle(rows)  # a prompt's rows are not contiguous
    return rows


def scores_of(rows, weights, rt="refuse", no_rm=False):
    table = weights.weights[rt]
    return np.array([(0.0 if no_rm else r["rm_score"]) + sum(table[k] * v for k, v in r["features"].items())
                     for r in rows])


def gaps(rows, scores, better, worse):
    """R_a - R_b over every same-prompt pair with labels (better, worse)."""
    out = []
    for a, b in itertools.permutations(range(len(rows)), 2):
        ra, rb = rows[a], rows[b]
        if ra["prompt_id"] == rb["prompt_id"] and ra["completion_label"] == better and rb["completion_label"] == worse:
            out.append(scores[a] - scores[b])
    return np.array(out)


# ---- fitting -------------------------------------------------------------------------------------------


def test_recovers_known_ordering_on_heldout_prompts():
    rows = make_rows(prompts=100, noise=0.12)
    fitter = HingeFitter().fit(rows, ORDER)
    m = fitter.metrics_["refuse"]
    assert m["converged"]
    assert m["heldout_pair_accuracy"] >= 0.95, m
    assert m["train_pair_accuracy"] >= 0.95, m
    w = np.array([fitter.weights_.weights["refuse"][f"f{j}"] for j in range(W_TRUE.size)])
    assert np.sign(w[:5]).tolist() == np.sign(W_TRUE[:5]).tolist()
    # the metric agrees with pair_accuracy computed from the weights on the held-out rows
    held = [r for r in rows if r["prompt_id"] in fitter.heldout_prompts_]
    # the same pairs counted from the same weights: approx's default only for float64 rounding of the scores
    assert pair_accuracy(held, ORDER, scores_of(held, fitter.weights_)) == pytest.approx(m["heldout_pair_accuracy"])


def test_prior_pulls_the_fit_toward_it_and_data_still_moves_it():
    rows = make_rows(prompts=60, noise=0.12)
    prior = {"refuse": {f"f{j}": float(v) for j, v in enumerate([-1.0, 1.0, -1.0, 1.0, -1.0, 3.0])}}
    w_prior = np.array(list(prior["refuse"].values()))

    def fitted(decay):
        f = HingeFitter(weight_decay=decay, prior=prior).fit(rows, ORDER)
        return np.array([f.weights_.weights["refuse"][f"f{j}"] for j in range(W_TRUE.size)]), f

    stiff, f_stiff = fitted(1e6)
    # At the optimum 2 x decay x |w - prior| = |mean hinge gradient| <= the largest feature gap (~1), so the fit
    # stays within 1 / 2e6 = 5e-7 of the prior; 1e-4 leaves room for the solver's stopping tolerance.
    np.testing.assert_allclose(stiff, w_prior, atol=1e-4)
    assert f_stiff.weights_.metrics["settings"]["prior"] == "table"
    loose, f_loose = fitted(1e-4)
    # with little penalty the data wins: the (wrong-signed) prior is overturned and the ordering recovered
    assert f_loose.metrics_["refuse"]["heldout_pair_accuracy"] >= 0.95
    assert np.sign(loose[:5]).tolist() == np.sign(W_TRUE[:5]).tolist()
    # f5 carries no signal: the zero-prior fit leaves it near 0, the prior keeps it near its value
    free = HingeFitter(weight_decay=1e-4).fit(rows, ORDER)
    assert abs(free.weights_.weights["refuse"]["f5"]) < 0.5 < loose[5]


def test_orderings_are_closed_transitively():
    rows = make_rows(prompts=30, per_label=2)
    m = HingeFitter().fit(rows, ORDER).metrics_["refuse"]
    # per prompt: ideal>flawed 4, flawed>disallowed 4, and ideal>disallowed 4 from the closure
    assert m["n_train_pairs"] + m["n_heldout_pairs"] == 30 * 12


def test_margins_are_met_on_separable_data():
    rows = make_rows(prompts=40, noise=0.02)
    fitter = HingeFitter(margin=1.0, steps=500).fit(rows, ORDER)
    m = fitter.metrics_["refuse"]
    # Newton's last smoothing band is 1e-3 of the margin wide: separable pairs settle within it of their margin
    assert m["train_margin_satisfied"] == 1.0 and m["train_hinge_loss"] < 1e-3, m
    s = scores_of(rows, fitter.weights_)
    for better, worse in [("ideal", "flawed"), ("flawed", "disallowed"), ("ideal", "disallowed")]:
        assert gaps(rows, s, better, worse).min() >= 1.0 - 1e-3


def test_label_margins_change_the_learned_gap():
    rows = make_rows(prompts=40, noise=0.02)
    base = scores_of(rows, HingeFitter().fit(rows, ORDER).weights_)
    assert gaps(rows, base, "ideal", "flawed").min() < 2.0

    wide = HingeFitter(label_margins={"ideal": 3.0}).fit(rows, ORDER)
    s = scores_of(rows, wide.weights_)
    assert gaps(rows, s, "ideal", "flawed").min() >= 3.0 - 1e-3
    assert gaps(rows, s, "ideal", "disallowed").min() >= 3.0 - 1e-3
    assert gaps(rows, s, "flawed", "disallowed").min() >= 1.0 - 1e-3
    assert wide.weights_.metrics["settings"]["label_margins"] == {"ideal": 3.0}

    # a "better>worse" key wins over the better label's key
    pair = HingeFitter(label_margins={"ideal": 3.0, "ideal>flawed": 0.5}).fit(rows, ORDER)
    s = scores_of(rows, pair.weights_)
    assert gaps(rows, s, "ideal", "disallowed").min() >= 3.0 - 1e-3
    assert gaps(rows, s, "ideal", "flawed").min() < 2.9


def test_unknown_label_margin_key_is_an_error():
    with pytest.raises(ValueError, match="idael"):
        HingeFitter(label_margins={"idael": 2.0}).fit(make_rows(prompts=5), ORDER)


def test_no_rm_mode_ignores_rm_score():
    rows = make_rows(prompts=40)
    wild = copy.deepcopy(rows)
    rng = np.random.default_rng(7)
    for r in wild:
        r["rm_score"] = float(rng.normal(0.0, 100.0))
    a = HingeFitter(no_rm=True).fit(rows, ORDER)
    b = HingeFitter(no_rm=True).fit(wild, ORDER)
    assert a.weights_.weights == b.weights_.weights
    assert a.metrics_ == b.metrics_
    # and with the RM in the sum, those scores do change the fit
    c = HingeFitter(no_rm=False).fit(wild, ORDER)
    assert c.weights_.weights != b.weights_.weights


def test_same_seed_same_weights():
    rows = make_rows(prompts=50)
    a = HingeFitter(seed=3).fit(rows, ORDER)
    b = HingeFitter(seed=3).fit(list(rows), ORDER)
    assert a.weights_.weights == b.weights_.weights
    assert a.heldout_prompts_ == b.heldout_prompts_
    assert HingeFitter(seed=4).fit(rows, ORDER).heldout_prompts_ != a.heldout_prompts_


def test_heldout_split_is_by_prompt_and_unseen_in_training():
    rows = make_rows(prompts=50)
    fitter = HingeFitter(heldout_fraction=0.2).fit(rows, ORDER)
    held, train = fitter.heldout_prompts_, fitter.train_prompts_
    assert not held & train
    assert held | train == {r["prompt_id"] for r in rows}
    assert len(held) == 10
    m = fitter.metrics_["refuse"]
    assert (m["n_heldout_prompts"], m["n_train_prompts"]) == (10, 40)
    # scrambling the held-out rows changes nothing the training saw
    scrambled = copy.deepcopy(rows)
    for r in scrambled:
        if r["prompt_id"] in held:
            r["features"] = {k: -v for k, v in r["features"].items()}
    other = HingeFitter(heldout_fraction=0.2).fit(scrambled, ORDER)
    assert other.weights_.weights == fitter.weights_.weights
    assert other.metrics_["refuse"]["heldout_pair_accuracy"] < 0.5


def test_split_prompts_edges():
    assert split_prompts(["a", "b"], 0.0, 0) == set()
    assert len(split_prompts(["a", "b"], 0.9, 0)) == 1  # one always stays for training
    with pytest.raises(ValueError):
        split_prompts(["a"], 1.0, 0)


def test_pairs_never_cross_prompts():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 15, 200)
    labels = rng.integers(0, 4, 200)  # code 3 ranks nothing
    beats = np.zeros((4, 4), dtype=bool)
    beats[0, 1] = beats[0, 2] = beats[1, 2] = True
    a, b = build_pairs(groups, labels, beats)
    assert len(a) > 0
    assert (groups[a] == groups[b]).all()
    assert beats[labels[a], labels[b]].all()
    brute = {(i, j) for i in range(200) for j in range(200)
             if groups[i] == groups[j] and beats[labels[i], labels[j]]}
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == brute
    assert len(a) == len(brute)  # no duplicates


def test_pair_accuracy_counts_within_prompt_pairs_and_half_ties():
    rows = [
        {"prompt_id": "p1", "response_type": "refuse", "completion_label": "ideal"},
        {"prompt_id": "p1", "response_type": "refuse", "completion_label": "flawed"},
        {"prompt_id": "p2", "response_type": "refuse", "completion_label": "ideal"},
        {"prompt_id": "p2", "response_type": "refuse", "completion_label": "disallowed"},
        {"prompt_id": "p2", "response_type": "other", "completion_label": "flawed"},  # no ordering: ignored
    ]
    # p1 right; p2 tie (ideal > disallowed by closure). Cross-prompt p1-flawed vs p2-ideal never counts.
    assert pair_accuracy(rows, ORDER, [1.0, 0.0, 5.0, 5.0, 100.0]) == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert np.isnan(pair_accuracy(rows[:1], ORDER, [1.0]))


def test_adam_solver_reaches_the_same_objective():
    rows = make_rows(prompts=40, noise=0.2)
    newton = HingeFitter().fit(rows, ORDER).metrics_["refuse"]
    adam = HingeFitter(solver="adam", lr=0.05, steps=3000).fit(rows, ORDER).metrics_["refuse"]
    assert newton["steps_run"] < 100
    # Adam on the exact hinge (subgradient, lr 0.05) stops near, not at, the optimum: 2% of the objective; the
    # held-out accuracy may differ by a pair or two (2%). Full batch on seeded data: deterministic.
    assert adam["objective"] == pytest.approx(newton["objective"], rel=0.02, abs=1e-3)
    assert adam["heldout_pair_accuracy"] == pytest.approx(newton["heldout_pair_accuracy"], abs=0.02)


def test_bad_settings_are_errors():
    rows = make_rows(prompts=5)
    for kwargs in ({"solver": "sgd"}, {"margin": -1.0}, {"steps": 0}, {"heldout_fraction": 1.0}):
        with pytest.raises(ValueError):
            HingeFitter(**kwargs).fit(rows, ORDER)
    with pytest.raises(ValueError, match="no response type"):
        HingeFitter().fit(make_rows(prompts=5, rt="comply"), ORDER)


# ---- with a policy ---------------------------------------------------------------------------------------


TINY_POLICY = {
    "name": "fit-test",
    "response_types": {"refuse": {"aliases": ["Refuse Please"]}},
    "propositions": {
        "apology": {"question": "Does it apologise?"},
        "refuses": {"question": "Does it refuse?"},
        "harmful": {"question": "Is it harmful?"},
    },
    "derived": {"polite_refusal": {"apology": True, "refuses": True}},
    "classes": {"refuse": {
        "ideal": {"polite_refusal": True, "harmful": False},
        "unacceptable_completion": {"polite_refusal": False, "harmful": False},
        "disallowed_completion": {"harmful": True},
    }},
}


def tiny_policy():
    return parse_policy(copy.deepcopy(TINY_POLICY))


POLICY_ORDER = {"refuse": {"ideal": ["unacceptable_completion"], "unacceptable_completion": ["disallowed_completion"]}}


def policy_rows(policy, prompts=40, seed=0, rt="refuse"):
    """Rows whose features come from the policy's own FeatureSpec, from noisy proposition probabilities."""
    spec = FeatureSpec(policy, "refuse")
    truth = {"ideal": (1, 1, 0), "unacceptable_completion": (0, 1, 0), "disallowed_completion": (0, 0, 1)}
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        for label, bits in truth.items():
            for _ in range(2):
                probs = np.clip(np.array(bits) * 0.8 + 0.1 + rng.normal(0, 0.05, 3), 0.0, 1.0)
                feats = spec.feature_dicts([dict(zip(spec.propositions, probs, strict=True))])[0]
                rows.append({"prompt_id": p, "response_type": rt, "completion_label": label,
                             "rm_score": float(rng.normal(0, 0.2)), "features": feats})
    return rows


def test_fit_with_policy_uses_its_feature_order_and_fingerprint():
    policy = tiny_policy()
    rows = policy_rows(policy, rt="Refuse Please")  # an alias resolves to the policy key
    fitter = HingeFitter().fit(rows, POLICY_ORDER, policy=policy, grader_id="grader-x")
    w = fitter.weights_
    assert list(w.weights["refuse"]) == list(FeatureSpec(policy, "refuse").feature_names)
    assert w.policy_fingerprint == policy.fingerprint and w.grader_id == "grader-x"
    assert fitter.metrics_["refuse"]["heldout_pair_accuracy"] >= 0.95
    RewardModel(policy, w)  # the service would accept these weights


def test_missing_feature_names_row_and_feature():
    policy = tiny_policy()
    rows = policy_rows(policy, prompts=5)
    del rows[7]["features"]["harmful"]
    with pytest.raises(ValueError, match=r"row 8 .*'harmful'"):
        HingeFitter().fit(rows, POLICY_ORDER, policy=policy)


def test_bad_in_memory_row_names_row_and_field():
    rows = make_rows(prompts=5)
    rows[3]["features"]["f2"] = "high"
    with pytest.raises(ValueError, match=r"row 4.*features\.f2"):
        HingeFitter().fit(rows, ORDER)
    rows = make_rows(prompts=5)
    rows[2]["rm_score"] = "0.5"
    with pytest.raises(ValueError, match=r"row 3: field 'rm_score'"):
        HingeFitter().fit(rows, ORDER)


# ---- files ---------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = json.dumps({"prompt_id": "p", "response_type": "refuse", "completion_label": "ideal", "rm_score": 0.1,
                   "features": {"x": 0.5}})


@pytest.mark.parametrize(
    ("line", "where", "field"),
    [
        ('{"prompt_id": "p", ', ":3:", "not valid JSON"),
        ('{"prompt_id": "p", "response_type": "refuse", "completion_label": "ideal"}', ":3:", "'features'"),
        (GOOD.replace('"rm_score": 0.1', '"rm_score": "high"'), ":3:", "'rm_score'"),
        (GOOD.replace('"x": 0.5', '"x": null'), ":3:", "'features.x'"),
        # Python's json reads NaN and Infinity; the one-pass check on features must still catch them
        (GOOD.replace('"x": 0.5', '"x": 0.5, "y": NaN'), ":3:", "'features.y'"),
        (GOOD.replace('"x": 0.5', '"x": Infinity, "y": -Infinity'), ":3:", "'features.x'"),
        (GOOD.replace('"x": 0.5', '"x": 0.5, "y": true'), ":3:", "'features.y'"),
        (GOOD.replace('"prompt_id": "p"', '"prompt_id": true'), ":3:", "'prompt_id'"),
        (GOOD.replace('"completion_label": "ideal"', '"completion_label": ""'), ":3:", "'completion_label'"),
        ("[1, 2]", ":3:", "JSON object"),
    ],
)
def test_load_rows_errors_name_line_and_field(tmp_path, line, where, field):
    f = tmp_path / "rows.jsonl"
    f.write_text(f"{GOOD}\n\n{line}\n")  # the blank line still counts as a line
    with pytest.raises(ValueError) as err:
        load_rows(f)
    assert where in str(err.value) and field in str(err.value)


def test_load_rows_reads_and_normalises(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(GOOD + "\n" + GOOD.replace('"rm_score": 0.1', '"rm_score": null').replace('"p"', "7") + "\n")
    rows = load_rows(f)
    assert [r["prompt_id"] for r in rows] == ["p", "7"]
    assert [r["rm_score"] for r in rows] == [0.1, 0.0]
    # finite values whose sum overflows, and integers, are numbers all the same; a line of spaces is blank
    big = GOOD.replace('"x": 0.5', '"x": 1e308, "y": 1e308, "z": 3')
    f.write_text(big + "\n   \n" + GOOD + "\n")
    assert [r["features"] for r in load_rows(f)] == [{"x": 1e308, "y": 1e308, "z": 3}, {"x": 0.5}]
    with pytest.raises(ValueError, match="cannot read"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_rows(tmp_path / "empty.jsonl")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("refuse:\n  ideal: [flawed]\n  flawed: [ideal]\n", "cycle"),
        ("refuse:\n  ideal: [flawed]\n  flawed: disallowed\n", ":3: refuse.flawed: expected a list"),
        ("refuse:\n  ideal: [ideal]\n", "cannot beat itself"),
        ("refuse:\n  ideal: [flawed]\n  ideal: [disallowed]\n", ":3: refuse.ideal: duplicate label"),
        ("refuse: [ideal, flawed]\n", ":1: refuse: expected a mapping"),
        ("- ideal\n", ":1: expected a mapping"),
        ("refuse:\n  ideal: [flawed\n", "not valid YAML"),
        ("refuse:\n  ideal:\n    - {a: b}\n", ":3: refuse.ideal: expected a label name"),
    ],
)
def test_load_orderings_errors(tmp_path, text, expected):
    f = tmp_path / "orderings.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as err:
        load_orderings(f)
    assert expected in str(err.value)


def test_load_orderings_keeps_labels_as_written(tmp_path):
    f = tmp_path / "orderings.yaml"
    f.write_text("refuse:\n  yes: [no]\n  no: []\ncomply:\n  ideal: [flawed, disallowed]\n")
    assert load_orderings(f) == {"refuse": {"yes": ["no"], "no": []}, "comply": {"ideal": ["flawed", "disallowed"]}}


# ---- the command line -----------------------------------------------------------------------------------

runner = CliRunner()


def cli_files(tmp_path):
    policy = tiny_policy()
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(TINY_POLICY, sort_keys=False))
    data = write_jsonl(tmp_path / "rows.jsonl", policy_rows(policy))
    order = tmp_path / "orderings.yaml"
    order.write_text(yaml.safe_dump(POLICY_ORDER))
    return policy, pol, data, order


def test_cli_fit_writes_a_weights_file(tmp_path):
    policy, pol, data, order = cli_files(tmp_path)
    out = tmp_path / "out" / "weights.json"
    res = runner.invoke(app, ["fit", "--data", str(data), "--orderings", str(order), "--out", str(out),
                              "--policy", str(pol), "--label-margin", "ideal=2", "--seed", "1",
                              "--grader-id", "tiny-grader"])
    assert res.exit_code == 0, res.output
    w = Weights.load(out)
    assert w.policy_fingerprint == policy.fingerprint and w.grader_id == "tiny-grader"
    assert set(w.weights["refuse"]) == set(FeatureSpec(policy, "refuse").feature_names)
    assert w.metrics["settings"]["label_margins"] == {"ideal": 2.0}
    assert w.metrics["response_types"]["refuse"]["heldout_pair_accuracy"] >= 0.95
    assert "refuse" in res.stdout and "held acc" in res.stdout
    RewardModel(policy, w)


def test_cli_fit_prior_is_recorded_and_a_missing_prior_is_an_error(tmp_path):
    policy, pol, data, order = cli_files(tmp_path)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    base = ["fit", "--data", str(data), "--orderings", str(order), "--policy", str(pol)]
    assert runner.invoke(app, [*base, "--out", str(first)]).exit_code == 0
    res = runner.invoke(app, [*base, "--out", str(second), "--prior", str(first), "--weight-decay", "1e6"])
    assert res.exit_code == 0, res.output
    w1, w2 = Weights.load(first), Weights.load(second)
    assert w2.metrics["settings"]["prior"]["weights_version"] == w1.version
    for name, value in w1.weights["refuse"].items():
        assert w2.weights["refuse"][name] == pytest.approx(value, abs=1e-4)  # decay 1e6: within 5e-7 (see above)
    res = runner.invoke(app, [*base, "--out", str(second), "--prior", str(tmp_path / "nope.json")])
    assert res.exit_code == 2 and "--prior" in res.output


@pytest.mark.parametrize("problem", ["missing", "malformed", "label-margin", "orderings"])
def test_cli_fit_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    _, pol, data, order = cli_files(tmp_path)
    extra: list[str] = []
    if problem == "missing":
        data = tmp_path / "nope.jsonl"
    elif problem == "malformed":
        data.write_text(data.read_text().splitlines()[0] + "\n{not json\n")
    elif problem == "label-margin":
        extra = ["--label-margin", "ideal"]
    else:
        order.write_text("refuse:\n  ideal: [ideal]\n")
    res = runner.invoke(app, ["fit", "--data", str(data), "--orderings", str(order), "--out",
                              str(tmp_path / "w.json"), "--policy", str(pol), *extra])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    if problem == "malformed":
        assert ":2:" in lines[0]
    assert not (tmp_path / "w.json").exists()


def test_cli_fit_progress_bar_only_for_slow_fits(capsys):
    from rbr_model.cli.fit_cmd import _Bar

    quick = _Bar(after_s=60.0)  # a fit that ends before the delay never shows (or imports) a bar
    quick("comply", 3, 200)
    assert quick.bar is None
    slow = _Bar(after_s=0.0)
    slow("comply", 3, 200)
    assert slow.bar is not None and slow.bar.n == 3
    slow("hard_refuse", 1, 200)  # a new response type starts its own bar
    assert slow.bar.desc.startswith("fit hard_refuse") and slow.bar.n == 1
    slow.close()
    assert slow.bar is None and "fit comply" in capsys.readouterr().err


def test_rbr_script_runs_fit_as_a_whole_process(tmp_path):
    """The installed `rbr` entry point (not the test runner's in-process app): exit codes, output, the file."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "rbr"]
    assert script.value == "rbr_model.cli:run"
    _, pol, data, order = cli_files(tmp_path)
    out = tmp_path / "w.json"
    runner_code = "import sys; from rbr_model.cli import run; sys.argv[0] = 'rbr'; run()"
    args = ["fit", "--data", str(data), "--orderings", str(order), "--out", str(out), "--policy", str(pol)]
    done = subprocess.run([sys.executable, "-c", runner_code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "held acc" in done.stdout and Weights.load(out).weights["refuse"]
    bad = subprocess.run([sys.executable, "-c", runner_code, *args[:-2], "--policy", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
