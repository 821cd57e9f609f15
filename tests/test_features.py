"""Class probabilities and features: exact logic on 0/1 labels, normalised probabilities otherwise."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from helpers import tiny_policy_dict
from reference import GOLD, OPENAI_YAML, needs_reference

from rbr_model.features import CLASS_PREFIX, FeatureBuilder, FeatureSpec, derive_class
from rbr_model.policy import load_policy, parse_policy


@pytest.fixture(scope="module")
def tiny():
    return parse_policy(tiny_policy_dict())


def test_feature_order_is_propositions_then_classes(tiny):
    spec = FeatureSpec(tiny, "refuse")
    assert spec.feature_names == (
        "apology", "refuses", "harmful",
        CLASS_PREFIX + "ideal", CLASS_PREFIX + "unacceptable_completion", CLASS_PREFIX + "disallowed_completion",
    )


def test_class_probabilities_match_hand_computation(tiny):
    spec = FeatureSpec(tiny, "refuse")
    a, r, h = 0.9, 0.8, 0.1
    raw = spec.class_probabilities(np.array([[a, r, h]]), normalise=False)[0]
    ideal = a * r * (1 - h)
    # float64 products/sums vs the hand-written ones: pytest.approx's default (relative 1e-6) >> rounding (~1e-16)
    assert raw == pytest.approx([ideal, (1 - h) * (1 - a * r), h])
    # Here the classes partition the space exactly, so normalising changes nothing.
    assert spec.class_probabilities(np.array([[a, r, h]]))[0] == pytest.approx(raw)


def test_negated_derived_counts_shared_literal_once(tiny):
    # unacceptable = NOT good_refusal AND NOT harmful; good_refusal contains NOT harmful again.
    # Given harmful is false, P(NOT good_refusal) must be 1 - a*r, not 1 - a*r*(1-h).
    spec = FeatureSpec(tiny, "refuse")
    raw = spec.class_probabilities(np.array([[0.5, 0.5, 0.5]]), normalise=False)[0]
    assert raw[1] == pytest.approx(0.5 * (1 - 0.25))  # float64 products: approx's default >> rounding


def test_one_hot_on_every_binary_assignment(tiny):
    for rt in tiny.classes:
        spec = FeatureSpec(tiny, rt)
        grid = np.array(list(itertools.product([0.0, 1.0], repeat=len(spec.propositions))))
        probs = spec.class_probabilities(grid)
        assert set(np.unique(probs)) <= {0.0, 1.0}
        assert np.all(probs.sum(axis=1) == 1.0)


@pytest.mark.parametrize("source", ["default", pytest.param("openai", marks=needs_reference)])
def test_probabilities_sum_to_one_and_stay_in_range(source):
    policy = load_policy(None if source == "default" else OPENAI_YAML)
    rng = np.random.default_rng(7)
    for rt, spec in FeatureBuilder(policy).specs.items():
        p = rng.random((500, len(spec.propositions)))
        x = spec.features(p)
        assert x.shape == (500, len(spec.feature_names)), rt
        cls = x[:, len(spec.propositions):]
        assert np.allclose(cls.sum(axis=1), 1.0)  # float64 sums of a few terms: rtol 1e-5 >> rounding (~1e-16)
        assert cls.min() >= 0.0 and cls.max() <= 1.0
        # 0/1 inputs give a one-hot class for every assignment drawn
        b = (rng.random((2000, len(spec.propositions))) > 0.5).astype(float)
        raw = spec.class_probabilities(b, normalise=False)
        assert np.all((raw > 0.5).sum(axis=1) == 1), rt


def test_missing_proposition_is_a_key_error(tiny):
    spec = FeatureSpec(tiny, "comply")
    with pytest.raises(KeyError):
        spec.feature_dicts([{"refuses": 0.2}])
    row = spec.feature_dicts([{"refuses": 0.2, "harmful": 0.1, "unused": 0.9}])[0]
    assert list(row) == list(spec.feature_names)
    assert row["class:ideal"] == pytest.approx(0.8 * 0.9)  # float64 products: approx's default >> rounding


@needs_reference
def test_every_gold_row_lands_in_exactly_one_class():
    policy = load_policy(OPENAI_YAML)
    builder = FeatureBuilder(policy)
    rows = [json.loads(line) for line in GOLD.read_text().splitlines() if line.strip()]
    assert len(rows) == 351
    counts: dict[str, int] = {}
    for row in rows:
        rt = policy.resolve_response_type(row["response_type"])
        cls, hits = derive_class(builder[rt], row["propositions"])
        assert hits == 1 and cls is not None, row["response_type"]
        counts[cls] = counts.get(cls, 0) + 1
    assert sum(counts.values()) == 351
    assert len(counts) == 5  # the gold set covers every class somewhere
