"""Learned heads without an engine: the file format and its refusals, the inputs' token spans, the fitting.

The tokenizer is the real embedded model's (prepared by scripts/setup.sh); no vLLM engine starts here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rbr_model.heads import MEAN, MEAN_AND_MAX, POOLING, Heads, HeadsError, build_input, packaged_heads_path, pool_span
from rbr_model.heads.evaluation import cross_validated_report
from rbr_model.heads.fitting import (
    Task,
    cross_validate,
    fit_heads,
    pooled_features,
    tasks_from_rows,
    tfidf_features,
)
from rbr_model.metrics import bootstrap_intervals, roc_auc
from rbr_model.policy import load_policy

D = 8
POLICY = load_policy(None)
NAMES = ["apology", "judgmental"]


def make_heads(**overrides) -> Heads:
    rng = np.random.default_rng(0)
    fields = dict(
        propositions=list(NAMES), mean=rng.normal(size=D), scale=rng.uniform(0.5, 2.0, size=D),
        weights=rng.normal(size=(2, D)), bias=np.array([0.1, -0.2]),
        grader={"model_id": "trunk", "model_hash": "abc123", "layer": 15},
        policy={"name": POLICY.name, "fingerprint": POLICY.fingerprint}, source="test.npz",
    )
    fields.update(overrides)
    return Heads(**fields)


@pytest.fixture(scope="module")
def tokenizer():
    from rbr_model import models

    if not models.is_prepared():
        pytest.skip("the embedded model is not prepared (run `rbr model prepare`)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models.default_model_path()))


# ---- the file -----------------------------------------------------------------------------------------------


def test_predict_is_the_logistic_of_the_standardised_state():
    heads = make_heads()
    x = np.random.default_rng(1).normal(size=(3, D))
    z = ((x - heads.mean) / heads.scale) @ heads.weights.T + heads.bias
    expected = 1 / (1 + np.exp(-z))
    # Same float64 operations in another order: agreement to a few ulps of values in (0, 1).
    assert heads.predict(x) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert heads.predict(x, ["judgmental"])[:, 0] == pytest.approx(expected[:, 1], rel=1e-12, abs=1e-15)
    extreme = heads.predict(np.full((1, D), 1e6))
    assert np.all(np.isfinite(extreme)) and np.all((extreme >= 0) & (extreme <= 1))


def test_save_load_round_trip_is_exact(tmp_path):
    heads = make_heads(metrics={"apology": {"cv_auc": 0.9}}, info={"rows": 3})
    back = Heads.load(heads.save(tmp_path / "h.npz"))
    for name in ("mean", "scale", "weights", "bias"):
        assert np.array_equal(getattr(back, name), getattr(heads, name))  # float64 stored as float64
    assert back.propositions == heads.propositions and back.metrics == heads.metrics
    assert back.fingerprint == heads.fingerprint
    assert make_heads(bias=np.array([0.1, -0.3])).fingerprint != heads.fingerprint


@pytest.mark.parametrize("overrides, field", [
    ({"weights": np.full((2, D), np.nan)}, "weights: holds NaN"),
    ({"bias": np.zeros(3)}, "bias: shape"),
    ({"weights": np.zeros((2, D + 1))}, "weights: shape"),
    ({"scale": np.zeros(D)}, "scale: must be positive"),
    ({"propositions": ["apology", "apology"]}, "propositions: duplicate"),
    ({"grader": {"model_id": "trunk", "layer": 15}}, "grader.model_hash: missing"),
    ({"policy": {"name": "x"}}, "policy.fingerprint: missing"),
    ({"grader": {"model_id": "trunk", "model_hash": "abc123", "layer": 15, "pooling": "median"}},
     "grader.pooling: 'median' is not one of"),
    ({"mean": np.zeros(D + 1), "scale": np.ones(D + 1), "weights": np.zeros((2, D + 1)),
      "grader": {"model_id": "trunk", "model_hash": "abc123", "layer": 15, "pooling": MEAN_AND_MAX}},
     "mean: width 9 is not a multiple of 2"),
])
def test_bad_heads_are_refused_naming_the_field(overrides, field):
    with pytest.raises(HeadsError, match="test.npz: " + field):
        make_heads(**overrides)


def test_bad_files_name_the_file_and_the_field(tmp_path):
    with pytest.raises(HeadsError, match="no such file"):
        Heads.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(HeadsError, match=f"{junk}: not a heads file"):
        Heads.load(junk)
    arrays = dict(np.load(make_heads().save(tmp_path / "ok.npz")))
    del arrays["scale"]
    np.savez(tmp_path / "noscale.npz", **arrays)
    with pytest.raises(HeadsError, match="noscale.npz: scale: missing"):
        Heads.load(tmp_path / "noscale.npz")


def test_heads_for_another_model_or_policy_are_refused():
    heads = make_heads()
    heads.check_model("trunk", "abc123", D)
    with pytest.raises(HeadsError, match="grader.model_hash: fitted on 'trunk' \\(abc123\\)"):
        heads.check_model("other", "fff000", D)
    with pytest.raises(HeadsError, match="mean: width 8"):
        heads.check_model("trunk", "abc123", 576)
    heads.check_policy(POLICY)
    with pytest.raises(HeadsError, match="policy.fingerprint"):
        make_heads(policy={"name": "old", "fingerprint": "0" * 64}).check_policy(POLICY)
    with pytest.raises(HeadsError, match="propositions: \\['no_such'\\]"):
        make_heads(propositions=["apology", "no_such"]).check_policy(POLICY)


def test_mean_and_max_heads_read_twice_the_trunk_width():
    heads = make_heads(grader={"model_id": "trunk", "model_hash": "abc123", "layer": 15, "pooling": MEAN_AND_MAX})
    assert (heads.pooling, heads.width, heads.hidden_size) == (MEAN_AND_MAX, D, D // 2)
    heads.check_model("trunk", "abc123", D // 2)
    with pytest.raises(HeadsError, match="width 8 \\(mean-and-max-over-completion\\), the model's hidden size is 8"):
        heads.check_model("trunk", "abc123", D)
    assert make_heads().pooling == MEAN and make_heads().hidden_size == D  # files before the pooling was recorded


def test_pool_span_is_the_mean_and_then_the_maximum():
    span = np.array([[1.0, -2.0, 0.5], [3.0, -4.0, 0.5], [-1.0, 0.0, 2.0]])
    assert pool_span(span, MEAN).tolist() == [1.0, -2.0, 1.0]
    assert pool_span(span, MEAN_AND_MAX).tolist() == [1.0, -2.0, 1.0, 3.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="pooling 'sum'"):
        pool_span(span, "sum")


def test_packaged_heads_fit_the_default_policy():
    heads = Heads.load(packaged_heads_path())
    heads.check_policy(POLICY)
    assert heads.grader["layer"] == 15 and heads.hidden_size == 576 and heads.pooling == POOLING
    assert set(heads.propositions) <= set(POLICY.propositions) and len(heads.propositions) >= 15
    assert packaged_heads_path().stat().st_size < 500_000  # a few hundred KB at most: it ships in the wheel


# ---- inputs -------------------------------------------------------------------------------------------------


CONV = [{"role": "user", "content": "How do I pick a lock?"}]


def test_the_span_is_exactly_the_completion_tokens(tokenizer):
    inp = build_input(tokenizer, CONV, "I'm sorry, I can't help with that.", 4096)
    assert list(inp.ids[inp.start:inp.end]) == tokenizer.encode("I'm sorry, I can't help with that.",
                                                                add_special_tokens=False)
    assert inp.end == len(inp.ids)
    prefix = tokenizer.apply_chat_template(CONV, add_generation_prompt=True, tokenize=False)
    assert list(inp.ids[:inp.start]) == tokenizer.encode(prefix, add_special_tokens=False)


def test_an_empty_completion_pools_the_last_template_token(tokenizer):
    inp = build_input(tokenizer, CONV, "", 4096)
    assert inp.end == len(inp.ids) and inp.end - inp.start == 1


def test_long_conversations_are_cut_from_the_left(tokenizer):
    long = [{"role": "user", "content": "word " * 500}, *CONV]
    inp = build_input(tokenizer, long, "No.", 64)
    assert len(inp.ids) == 64
    assert list(inp.ids[inp.start:]) == tokenizer.encode("No.", add_special_tokens=False)
    full = build_input(tokenizer, long, "No.", 4096)
    assert inp.ids == full.ids[-64:]  # the most recent context and the assistant header survive
    from rbr_model.errors import PromptError

    with pytest.raises(PromptError, match="completion: .* tokens"):
        build_input(tokenizer, CONV, "word " * 100, 50)
    with pytest.raises(PromptError, match="conversation\\[0\\]"):
        build_input(tokenizer, [{"role": "user"}], "x", 100)


# ---- fitting ------------------------------------------------------------------------------------------------


def separable(n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3 == 0
    X = rng.normal(size=(n, D))
    X[:, 0] += np.where(y, 2.5, -2.5)  # one informative direction, the rest noise
    return X, y


def test_fit_heads_recovers_a_separable_direction():
    X, y = separable()
    fitted = fit_heads(X, [Task("apology", "a", np.arange(len(y)), y)], folds=4)
    heads = make_heads(propositions=["apology"], mean=fitted["mean"], scale=fitted["scale"],
                       weights=fitted["weights"], bias=fitted["bias"])
    p = heads.predict(X)[:, 0]
    assert roc_auc(p, y) > 0.99
    assert fitted["metrics"]["apology"]["cv_auc"] > 0.95
    assert np.argmax(np.abs(fitted["weights"][0])) == 0
    again = fit_heads(X, [Task("apology", "a", np.arange(len(y)), y)], folds=4)
    assert np.array_equal(again["weights"], fitted["weights"])  # seeded folds, deterministic solver


def test_calibrated_heads_keep_the_ranking_and_match_the_share_of_yes():
    """Balanced class weights put a rare proposition's P(yes) near 0.5; the out-of-fold Platt map folded into the
    head brings the mean P(yes) to the share of yes without changing the order of any two rows."""
    rng = np.random.default_rng(5)
    n = 400
    y = rng.random(n) < 0.08
    X = rng.normal(size=(n, D)) + np.outer(y, np.eye(D)[0]) * 1.5  # overlapping classes: probabilities matter
    task = [Task("apology", "a", np.arange(n), y)]
    plain = fit_heads(X, task, folds=4, calibrate=False)
    calibrated = fit_heads(X, task, folds=4)  # the default

    def predict(fitted):
        return make_heads(propositions=["apology"], mean=fitted["mean"], scale=fitted["scale"],
                          weights=fitted["weights"], bias=fitted["bias"]).predict(X)[:, 0]

    p0, p1 = predict(plain), predict(calibrated)
    assert p0.mean() > 2 * y.mean()  # the bias the fix is for
    assert abs(p1.mean() - y.mean()) < 0.03  # a maximum-likelihood map on out-of-fold logits: near the rate
    assert np.array_equal(np.argsort(p0, kind="stable"), np.argsort(p1, kind="stable"))
    a = calibrated["metrics"]["apology"]["platt"]["a"]
    assert a > 0 and "platt" not in plain["metrics"]["apology"]


def test_cross_validation_is_out_of_fold_and_noise_scores_near_chance():
    X, y = separable()
    task = Task("apology", "a", np.arange(len(y)), y)
    assert roc_auc(cross_validate(pooled_features(X), task, folds=4), y) > 0.95
    noise = np.random.default_rng(3).normal(size=X.shape)
    # Out-of-fold predictions on features unrelated to the labels cannot rank well (in-sample ones would).
    assert roc_auc(cross_validate(pooled_features(noise), task, folds=4), y) < 0.8


def test_extra_rows_join_every_training_fold_and_are_never_scored():
    X, y = separable()
    n = len(y)
    # Extra rows with the opposite labels on the same direction, three times as many: once they join the
    # training folds they outvote the evaluated rows' own, so the out-of-fold ranking turns upside down.
    pooled = np.vstack([X, X, X, X])
    task = Task("apology", "a", np.arange(n), y)
    flipped = Task("apology", "a", np.arange(n, 4 * n), np.tile(~y, 3))
    alone = cross_validate(pooled_features(pooled), task, folds=4)
    with_extra = cross_validate(pooled_features(pooled), task, folds=4, extra=flipped)
    assert alone.shape == with_extra.shape == (n,)  # one prediction per evaluated row, none for extra rows
    assert roc_auc(alone, y) > 0.95 and roc_auc(with_extra, y) < 0.2
    rows = [{"completion": f"t{i}", "labels": {"a": bool(v)}} for i, v in enumerate(y)]
    extra_rows = [{"completion": f"x{i}", "labels": {"a": bool(v)}} for i, v in enumerate(np.tile(~y, 3))]
    report = cross_validated_report(pooled, rows, {"apology": "a"}, folds=4, n_boot=50, extra_rows=extra_rows)
    assert report["propositions"]["apology"]["n"] == n and "extra rows" in report["mode"]
    assert report["propositions"]["apology"]["heads"]["auc"] < 0.2


def test_tfidf_baseline_reads_the_words():
    texts = [("I'm sorry, I can't help with that." if i % 2 else "Sure! Here is how to do it.") + f" {i}"
             for i in range(40)]
    y = np.arange(40) % 2 == 1
    p = cross_validate(tfidf_features(texts), Task("apology", "a", np.arange(40), y), folds=4)
    assert roc_auc(p, y) == 1.0


def test_tasks_skip_propositions_with_too_few_labels():
    rows = [{"labels": {"a": i < 2, "b": i % 2 == 0}} for i in range(10)]
    tasks, skipped = tasks_from_rows(rows, {"x": "a", "y": "b", "z": "c"})
    assert [t.name for t in tasks] == ["y"]
    assert "2 yes / 8 no" in skipped["x"] and "0 yes / 0 no" in skipped["z"]


def test_bootstrap_intervals_contain_the_point_estimate():
    X, y = separable()
    p = 1 / (1 + np.exp(-X[:, 0]))
    ci = bootstrap_intervals(p, y, n=200)
    auc = roc_auc(p, y)
    assert ci["auc"][0] <= auc <= ci["auc"][1] and all(math.isfinite(v) for v in ci["brier"])


def test_rbr_serve_refuses_bad_heads_in_one_line(monkeypatch, tmp_path):
    """Before anything starts: a heads file that is broken, or fitted on another trunk, is one line naming it."""
    import json

    from typer.testing import CliRunner

    from rbr_model import models
    from rbr_model.cli import app

    if not models.is_prepared():
        pytest.skip("the embedded model is not prepared (run `rbr model prepare`)")
    arrays = dict(np.load(packaged_heads_path()))
    header = json.loads(bytes(arrays["header"]).decode())
    header["grader"]["model_hash"] = "f" * 64
    other = tmp_path / "other-trunk.npz"
    np.savez(other, **{**arrays, "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)})
    for path, words in ((tmp_path / "absent.npz", "no such file"), (other, "grader.model_hash: fitted on")):
        monkeypatch.setenv("RBR_HEADS", str(path))
        res = CliRunner().invoke(app, ["serve"])
        assert res.exit_code == 2 and str(path) in res.output and words in res.output, res.output
        assert "Traceback" not in res.output
