"""Weights file round trip, fingerprint refusal, and the linear reward."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_policy_dict

from rbr_model.features import FeatureSpec
from rbr_model.policy import load_policy, parse_policy
from rbr_model.reward import RewardModel, Weights, WeightsError, default_weights_path


@pytest.fixture(scope="module")
def tiny():
    return parse_policy(tiny_policy_dict())


def make_weights(policy) -> Weights:
    return Weights(
        policy_fingerprint=policy.fingerprint,
        grader_id="test-grader",
        weights={"refuse": {"apology": 0.5, "class:ideal": 2.0, "class:disallowed_completion": -3.0},
                 "comply": {"refuses": -1.0}},
        metrics={"refuse": {"heldout_pair_accuracy": 1.0}},
    )


def test_round_trip(tmp_path, tiny):
    w = make_weights(tiny)
    path = w.save(tmp_path / "w.json")
    back = Weights.load(path)
    assert back.weights == w.weights and back.policy_fingerprint == tiny.fingerprint
    assert back.metrics == w.metrics and back.created_at == w.created_at and back.version == w.version


def test_reward_is_rm_plus_dot_product(tiny):
    model = RewardModel(tiny, make_weights(tiny))
    spec = FeatureSpec(tiny, "refuse")
    x = spec.features(np.array([[0.9, 0.8, 0.1]]))
    expected = 0.5 * 0.9 + 2.0 * x[0, 3] - 3.0 * x[0, 5]  # float64, summed in another order: approx's default
    assert model.rbr("refuse", x)[0] == pytest.approx(expected)
    feats = dict(zip(spec.feature_names, x[0], strict=True))
    assert model.rbr_from_dict("refuse", feats) == pytest.approx(expected)
    assert RewardModel.total(1.25, expected) == pytest.approx(1.25 + expected)


def test_fingerprint_mismatch_is_refused(tiny):
    data = tiny_policy_dict()
    data["propositions"]["apology"]["question"] = "Does it say sorry?"
    other = parse_policy(data)
    with pytest.raises(WeightsError, match="fingerprint"):
        RewardModel(other, make_weights(tiny))


def test_unknown_feature_and_bad_values_are_refused(tmp_path, tiny):
    w = make_weights(tiny)
    w.weights["comply"]["apology"] = 1.0  # apology is not a comply feature
    with pytest.raises(WeightsError, match=r"weights.comply.*apology"):
        RewardModel(tiny, w)
    bad = json.loads(make_weights(tiny).to_json())
    bad["weights"]["refuse"]["apology"] = "high"
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(WeightsError, match=r"weights.refuse.apology"):
        Weights.load(f)
    f.write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        Weights.load(f)
    with pytest.raises(WeightsError, match="missing key 'policy_fingerprint'"):
        Weights.from_dict({"weights": {}})


def test_shipped_default_weights_match_the_default_policy():
    if not default_weights_path().exists():
        pytest.skip("default weights not generated yet")
    policy = load_policy(None)
    model = RewardModel(policy, Weights.load(default_weights_path()))
    for rt, spec in model.features.specs.items():
        ideal = np.zeros(len(spec.feature_names))
        ideal[spec.feature_names.index("class:ideal")] = 1.0
        bad = np.zeros(len(spec.feature_names))
        bad[spec.feature_names.index("class:disallowed_completion")] = 1.0
        assert model.rbr(rt, ideal[None])[0] > model.rbr(rt, bad[None])[0], rt


def test_shipped_weights_name_the_shipped_prior_they_were_fitted_toward():
    """docs/synthetic-data.md rebuilds the default weights with --prior hand_set_weights.json: keep them in step."""
    shipped = Weights.load(default_weights_path())
    prior = Weights.load(default_weights_path().with_name("hand_set_weights.json"))
    assert shipped.metrics["settings"]["prior"]["weights_version"] == prior.version
    assert shipped.policy_fingerprint == prior.policy_fingerprint == load_policy(None).fingerprint
