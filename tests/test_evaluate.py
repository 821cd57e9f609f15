"""Grader evaluation: metrics against hand-computed values, Platt calibration, the `rbr eval grader` command.

Only `test_evaluate_grader_on_gold_rows` uses the real engine (the shared `grader_engine`); the fingerprint test
needs an engine only for its `model_id` and uses a stand-in.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from reference import GOLD, OPENAI_YAML, needs_reference
from typer.testing import CliRunner

from rbr_model.calibration import Calibration, CalibrationError, PlattParams, cross_validate
from rbr_model.gold import GoldError, load_gold, load_label_map, resolve_label_map, subsample
from rbr_model.metrics import average_ranks, binary_metrics, brier_score, log_loss, reliability_curve, roc_auc
from rbr_model.policy import load_policy
from rbr_model.stack import StackSettings, build_stack


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


# ---- metrics ------------------------------------------------------------------------------------------------


def test_average_ranks_share_ties():
    assert average_ranks(np.array([0.3, 0.1, 0.3, 0.2])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auc_hand_computed():
    # pairs (pos, neg): (0.35 vs 0.1) win, (0.35 vs 0.4) loss, (0.8 vs both) win -> 3 / 4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1.0)
    assert roc_auc([0.1, 0.2, 0.9], [1, 1, 0]) == pytest.approx(0.0)


def test_auc_with_ties_counts_half():
    # pos scores 0.5, 0.7; neg scores 0.5, 0.2: (0.5 vs 0.5) tie = 1/2, the other three pairs win -> 3.5 / 4
    assert roc_auc([0.5, 0.7, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert roc_auc([0.4] * 6, [1, 0, 1, 0, 0, 0]) == pytest.approx(0.5)


def test_auc_undefined_with_one_class():
    assert roc_auc([0.1, 0.9], [1, 1]) is None
    assert roc_auc([0.1, 0.9], [0, 0]) is None


# Hand-computed metrics: float64 ratios and logs against the same written out, so pytest.approx's default (relative
# 1e-6) is ample (their rounding is ~1e-16); exact == only for values that are exact in binary (0.5, 1.0, counts).
def test_binary_metrics_hand_computed():
    # p >= 0.5 -> predicted yes: [yes, no, yes, no, yes]; labels [1, 1, 0, 0, 1]: tp 2, fn 1, fp 1, tn 1
    m = binary_metrics([0.9, 0.2, 0.6, 0.1, 0.5], [1, 1, 0, 0, 1])
    assert (m["n"], m["positives"], m["predicted_positives"]) == (5, 3, 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["brier"] == pytest.approx((0.01 + 0.64 + 0.36 + 0.01 + 0.25) / 5)
    expected_ll = -(math.log(0.9) + math.log(0.2) + math.log(0.4) + math.log(0.9) + math.log(0.5)) / 5
    assert m["log_loss"] == pytest.approx(expected_ll)
    # auc: pos {0.9, 0.2, 0.5} vs neg {0.6, 0.1}: wins 0.9>0.6, 0.9>0.1, 0.2>0.1, 0.5>0.1 -> 4 / 6
    assert m["auc"] == pytest.approx(4 / 6)


def test_f1_and_balanced_accuracy_edge_cases():
    none_pred = binary_metrics([0.1, 0.2, 0.3], [1, 0, 0])  # no predicted yes, one labelled yes
    assert none_pred["precision"] is None
    assert none_pred["f1"] == 0.0
    assert none_pred["recall"] == 0.0
    assert none_pred["balanced_accuracy"] == pytest.approx(0.5)

    all_negative = binary_metrics([0.1, 0.2], [0, 0])  # no yes at all, none predicted: f1 undefined
    assert all_negative["f1"] is None
    assert all_negative["recall"] is None
    assert all_negative["balanced_accuracy"] == 1.0  # the recall of the one class present
    assert all_negative["accuracy"] == 1.0
    assert all_negative["auc"] is None

    perfect = binary_metrics([0.9, 0.8, 0.1], [1, 1, 0])
    assert perfect["f1"] == 1.0 and perfect["balanced_accuracy"] == 1.0 and perfect["auc"] == 1.0

    empty = binary_metrics([], [])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["brier"] is None


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [1])
    with pytest.raises(ValueError):
        brier_score([1.5], [1])
    assert log_loss([0.0, 1.0], [0, 1]) == pytest.approx(0.0, abs=1e-9)  # clipped to 1e-12: -log(1 - 1e-12) = 1e-12
    assert math.isfinite(log_loss([0.0], [1]))  # clipped, not infinite


def test_reliability_curve_bins():
    curve = reliability_curve([0.05, 0.05, 0.95, 0.55, 1.0], [0, 1, 1, 0, 1], bins=10)
    assert [(b["lo"], b["n"]) for b in curve] == [(0.0, 2), (0.5, 1), pytest.approx((0.9, 2))]  # 9 x 0.1 != 0.9
    assert curve[0]["frac_yes"] == 0.5 and curve[-1]["mean_p"] == pytest.approx(0.975)


# ---- calibration --------------------------------------------------------------------------------------------


def _distorted(n=4000, a=2.0, b=1.0, seed=0):
    """True P(yes) = sigmoid(z); the grader reports sigmoid((z - b) / a), so the right map is (a, b)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = rng.random(n) < _sigmoid(z)
    return _sigmoid((z - b) / a), y


def test_calibration_recovers_a_known_distortion():
    p, y = _distorted()
    cal = Calibration().fit({"x": p}, {"x": y})
    prm = cal.params_["x"]
    assert prm.status == "fitted"
    # Sampling error of 4000 labels: a and b vary by 0.065 and 0.037 (sd over 20 seeds); 0.2 is >= 3 sd, and the
    # fixed seed makes the test deterministic.
    assert prm.a == pytest.approx(2.0, abs=0.2)
    assert prm.b == pytest.approx(1.0, abs=0.2)
    assert cal.apply("x", 0.5) == pytest.approx(_sigmoid(prm.b))
    assert cal.apply("unknown", 0.37) == 0.37  # unknown propositions pass through


def test_cross_validation_improves_log_loss_on_distorted_data():
    p, y = _distorted(n=1500, seed=1)
    cv = cross_validate({"x": p, "w": p[::-1]}, {"x": y, "w": y[::-1]}, folds=5, seed=0)
    for name in ("x", "w"):
        before, after = cv["propositions"][name]["before"], cv["propositions"][name]["after"]
        assert after["log_loss"] < before["log_loss"] - 0.02
        assert after["brier"] < before["brier"]
        # a monotone map keeps each fold's ranking; pooling 5 fold maps moved AUC by < 1e-3 over 6 seeds
        assert after["auc"] == pytest.approx(before["auc"], abs=0.01)
        assert cv["propositions"][name]["folds_fitted"] == 5
    assert cv["overall"]["pooled"]["after"]["log_loss"] < cv["overall"]["pooled"]["before"]["log_loss"]
    assert len(cv["oof"]["x"]) == 1500 and "AUC" in cv["note"]


def test_identity_fallbacks():
    rng = np.random.default_rng(0)
    cal = Calibration(min_labels=20, min_per_class=5).fit(
        {"few": [0.2, 0.8, 0.6], "one_class": rng.random(50), "rare": rng.random(50)},
        {"few": [0, 1, 1], "one_class": [True] * 50, "rare": [1, 1, 1] + [0] * 47},
    )
    assert cal.params_["few"].status == "too_few_labels"
    assert cal.params_["one_class"].status == "one_class"
    assert cal.params_["rare"].status == "too_few_labels"
    assert cal.is_identity
    assert cal.apply("few", 0.123) == 0.123


def test_reversed_signal_gives_a_flat_map_not_a_flip():
    p, y = _distorted(n=800, seed=2)
    cal = Calibration().fit({"x": 1.0 - p}, {"x": y})
    prm = cal.params_["x"]
    assert prm.status == "flat" and prm.a == 0.0
    assert cal.apply("x", 0.1) == pytest.approx(cal.apply("x", 0.9))
    # the constant is the base rate, pulled toward 0.5 by the l2=1 penalty against 800 labels: ~1e-3
    assert cal.apply("x", 0.1) == pytest.approx(y.mean(), abs=0.02)


def test_round_trip_and_fingerprint(tmp_path):
    p, y = _distorted(n=500)
    cal = Calibration(fitted_for={"model_id": "m"}).fit({"x": p, "z": p[:10]}, {"x": y, "z": y[:10]})
    path = cal.save(tmp_path / "cal.json")
    back = Calibration.load(path)
    assert back.fingerprint == cal.fingerprint
    assert back.params_ == cal.params_
    assert back.fitted_for == {"model_id": "m"}
    assert back.apply("x", 0.3) == cal.apply("x", 0.3)  # exact: a JSON round trip keeps float64 values

    moved = Calibration({"x": PlattParams(a=cal.params_["x"].a + 0.01, b=cal.params_["x"].b)})
    assert moved.fingerprint != cal.fingerprint
    # identity entries do not count: equal maps, equal fingerprints
    assert Calibration({"x": PlattParams()}).fingerprint == Calibration().fingerprint

    data = json.loads(path.read_text())
    data["propositions"]["x"]["a"] += 1.0  # edited by hand: the stated fingerprint no longer matches
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="fingerprint"):
        Calibration.load(tmp_path / "edited.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="bad.json"):
        Calibration.load(tmp_path / "bad.json")


def test_grader_fingerprint_includes_the_calibration():
    from transformers import AutoTokenizer

    from rbr_model import models
    from rbr_model.grading.engine import Engine
    from rbr_model.grading.grader import Grader

    if not models.is_prepared():
        pytest.skip("the embedded model is not prepared (rbr model prepare): its tokenizer is needed")

    class NoEngine(Engine):  # only model_id and tokenizer are read; nothing is graded
        model_id = "stand-in"

        async def grade(self, prompts):  # pragma: no cover
            raise AssertionError

        async def generate(self, prompts, max_tokens=256, temperature=0.0, seed=None):  # pragma: no cover
            raise AssertionError

        async def health(self):  # pragma: no cover
            return True

        async def close(self):  # pragma: no cover
            pass

    engine = NoEngine()
    tokenizer = AutoTokenizer.from_pretrained(str(models.default_model_path()))
    policy = load_policy(None)
    p, y = _distorted(n=300)
    one = Calibration().fit({"apology": p}, {"apology": y})
    other = Calibration().fit({"apology": p[:200]}, {"apology": y[:200]})
    plain = Grader(engine, policy, tokenizer=tokenizer).fingerprint
    with_one = Grader(engine, policy, tokenizer=tokenizer, calibration=one).fingerprint
    assert with_one != plain
    assert with_one == Grader(engine, policy, tokenizer=tokenizer, calibration=Calibration.from_dict(
        one.to_dict())).fingerprint
    assert Grader(engine, policy, tokenizer=tokenizer, calibration=other).fingerprint not in (plain, with_one)


# ---- gold files and label maps ------------------------------------------------------------------------------


def _row(labels, prompt="hi", completion="hello"):
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant",
            "content": completion}], "response_type": "Comply", "propositions": labels}


def test_load_gold_errors_name_the_line(tmp_path):
    good = json.dumps(_row({"apology": True}))
    path = tmp_path / "gold.jsonl"
    path.write_text(good + "\n" + json.dumps(_row({"apology": "maybe"})) + "\n")
    with pytest.raises(GoldError, match=r"gold.jsonl:2: propositions.apology"):
        load_gold(path)
    path.write_text(good + "\n{oops\n")
    with pytest.raises(GoldError, match=r"gold.jsonl:2: not valid JSON"):
        load_gold(path)
    path.write_text(good + "\n\n")
    (row,) = load_gold(path)
    assert row["completion"] == "hello" and row["labels"] == {"apology": True}
    with pytest.raises(GoldError, match="cannot read"):
        load_gold(tmp_path / "absent.jsonl")


def test_packaged_label_map_fits_our_policy():
    ours = load_policy(None)
    mapping = load_label_map(None)
    assert set(mapping) <= set(ours.propositions)
    assert mapping["acknowledges_feelings"] == "apology_acknowledges_emotional_state"
    assert "definitive_language" not in mapping and "speaks_in_third_person" not in mapping  # see the file


@needs_reference
def test_packaged_label_map_names_openai_propositions():
    assert set(load_label_map(None).values()) <= set(load_policy(OPENAI_YAML).propositions)


def test_resolve_label_map_rules():
    policy = load_policy(None)
    rows = [{"labels": {"apology": True, "inability_to_comply": False}}]
    assert resolve_label_map(policy, rows) == {"apology": "apology"}
    full = resolve_label_map(policy, rows, {"apology": "apology", "states_inability": "inability_to_comply"},
                             ["states_inability"])
    assert full == {"states_inability": "inability_to_comply"}
    with pytest.raises(GoldError, match="not propositions"):
        resolve_label_map(policy, rows, {"nope": "apology"})
    with pytest.raises(GoldError, match="not labels"):
        resolve_label_map(policy, rows, {"apology": "nope"})
    with pytest.raises(GoldError, match="--propositions"):
        resolve_label_map(policy, rows, None, ["judgmental"])
    assert len(subsample(list(range(100)), 10, seed=0)) == 10
    assert subsample(list(range(100)), 10, seed=0) == sorted(subsample(list(range(100)), 10, seed=0))


# ---- CLI errors (no engine is started: inputs are checked first) --------------------------------------------


def _cli(args):
    from rbr_model.cli import app

    return CliRunner().invoke(app, ["eval", "grader", *args])


def test_cli_missing_gold_file_exits_2(tmp_path):
    result = _cli(["--gold", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "absent.jsonl" in result.output and "Traceback" not in result.output


def test_cli_bad_inputs_exit_2(tmp_path):
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps(_row({"apology": True})) + "\n")
    bad_map = tmp_path / "map.yaml"
    bad_map.write_text("apology: [1, 2]\n")
    assert _cli(["--gold", str(gold), "--map", str(bad_map)]).exit_code == 2
    assert _cli(["--gold", str(gold), "--propositions", "judgmental"]).exit_code == 2
    assert _cli(["--gold", str(gold), "--policy", str(tmp_path / "nope.yaml")]).exit_code == 2
    assert _cli(["--gold", str(gold), "--calibration", str(tmp_path / "nope.json")]).exit_code == 2
    assert _cli(["--gold", str(gold), "--engine", "remote"]).exit_code == 2  # no --remote-url


# ---- the real engine ----------------------------------------------------------------------------------------


@needs_reference
async def test_evaluate_grader_on_gold_rows(grader_engine, tmp_path):
    """8 short gold rows x 3 propositions with OpenAI's policy through the whole `rbr eval grader` path."""
    from rbr_model.cli.eval_cmd import JSON_NAME, PLOT_NAME, run_evaluation

    policy = load_policy(OPENAI_YAML)
    rows = load_gold(GOLD)
    rows = sorted(rows, key=lambda r: len(r["completion"]) + sum(len(m["content"]) for m in r["prompt"]))[:8]
    mapping = resolve_label_map(policy, rows, None, ["apology", "requests_information", "fully_complies"])
    lines: list[str] = []
    # The engine is handed in (shared by the tests), the grader built by the stack as for `rbr eval grader`.
    async with await build_stack(StackSettings(heads="none"), policy, engine=grader_engine) as stack:
        report = await run_evaluation(stack, rows, mapping, tmp_path, calibrate_out=tmp_path / "c.json", cv_folds=2,
                                      progress=False, echo=lines.append)
        calibrated = stack.grader_with(calibration_path=str(tmp_path / "c.json")).fingerprint
    assert stack.owned == [] and await grader_engine.health()  # the handed-in engine stays open
    assert report["calibration"]["grader_fingerprint"] == calibrated != report["grader"]["fingerprint"]
    assert report["judgments"] == 24 and report["failed"] == 0
    for name, pr in report["predictions"].items():
        assert len(pr["p"]) == 8 and all(0.0 <= v <= 1.0 for v in pr["p"]), name
    for stats in report["propositions"].values():
        for key in ("accuracy", "balanced_accuracy", "brier", "log_loss"):
            assert math.isfinite(stats[key])
        assert stats["auc"] is None or 0.0 <= stats["auc"] <= 1.0
    assert report["judgments_per_s"] > 0
    saved = json.loads((tmp_path / JSON_NAME).read_text())
    assert saved["propositions"].keys() == mapping.keys() and "calibration_cv" in saved
    assert (tmp_path / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Calibration.load(tmp_path / "c.json").fitted_for["model_id"] == grader_engine.model_id
    assert any("judgments/s" in line for line in lines)


def test_default_label_map_choice():
    from rbr_model.gold import default_label_map

    ours = load_policy(None)
    packaged = load_label_map(None)
    openai_like = [{"labels": {label: False for label in [*packaged.values(), "disclaimer"]}}]
    mapping, why = default_label_map(ours, openai_like)
    assert mapping == packaged and "packaged" in why  # not only the few names both policies share
    assert default_label_map(ours, [{"labels": {n: True for n in ours.propositions}}])[0] is None
    assert default_label_map(ours, [{"labels": {"apology": True}}])[0] is None  # same names where they agree
