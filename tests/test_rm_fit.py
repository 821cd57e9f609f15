"""Fitting a reward model's score head (rbr_model/rm_fit.py), building its checkpoint (models.prepare_rm), and the
trainer's choice of reward (examples/grpo_trl.py `chosen`).

The fit tests use planted data (exact properties of the Bradley-Terry fit); the build test runs the real embedded
model through transformers and checks that the built checkpoint scores what the fit's features say it should.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rbr_model import models
from rbr_model.rm_fit import FinalStates, RMFitError, fit_head, load_pairs, pair_accuracy, rm_token_ids, unique_items

ROOT = Path(__file__).resolve().parents[1]


def planted(seed: int, n_items: int = 120, n_pairs: int = 300, dim: int = 12):
    """Items with a planted score w* . x; pairs ordered by it (each pair's better item first)."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=dim)
    X = rng.normal(size=(n_items, dim)) * rng.uniform(0.1, 10.0, size=dim)  # units on very different scales
    score = X @ w_star
    refs = []
    while len(refs) < n_pairs:
        a, b = rng.choice(n_items, size=2, replace=False)
        refs.append((a, b) if score[a] > score[b] else (b, a))
    groups = [f"p{i % 20}" for i in range(n_pairs)]
    return X, refs, groups, w_star


def test_pair_accuracy_counts_ties_half():
    assert pair_accuracy([2.0, 1.0, 0.0, 5.0], [1.0, 2.0, 0.0, 5.0]) == 0.5  # right, wrong, tie, tie
    assert math.isnan(pair_accuracy([], []))


def test_fit_learns_the_planted_order_on_fresh_items():
    X, refs, groups, w_star = planted(0)
    fit = fit_head(X, refs, groups, seed=0)
    X2 = np.random.default_rng(1).normal(size=(200, X.shape[1])) * X.std(axis=0)  # fresh items, same scales
    s_true, s_fit = X2 @ w_star, X2 @ fit.weight
    pairs = [(a, b) for a, b in zip(range(0, 200, 2), range(1, 200, 2), strict=True)]
    agree = [float((s_true[a] > s_true[b]) == (s_fit[a] > s_fit[b])) for a, b in pairs]
    # A head with no information agrees on half the 100 pairs, +-0.05 (one sd): 0.9 is 8 sd above chance.
    assert np.mean(agree) > 0.9, np.mean(agree)
    assert fit.train_accuracy > 0.9 and 0.5 < fit.cv_accuracy <= 1.0 and fit.cv_log_loss < math.log(2)


def test_fit_is_symmetric_and_seeded():
    """Swapping every pair's order negates the head (no intercept, both orientations fitted); a rerun repeats."""
    X, refs, groups, _ = planted(2)
    fit = fit_head(X, refs, groups, seed=0)
    swapped = fit_head(X, [(b, a) for a, b in refs], groups, seed=0)
    again = fit_head(X, refs, groups, seed=0)
    assert fit.C == swapped.C
    np.testing.assert_allclose(swapped.weight, -fit.weight, rtol=1e-4, atol=1e-8 * np.abs(fit.weight).max())
    np.testing.assert_array_equal(again.weight, fit.weight)


def test_fit_needs_pairs_from_two_prompts():
    X, refs, _, _ = planted(3)
    with pytest.raises(RMFitError, match="two prompts"):
        fit_head(X, refs, ["one"] * len(refs))
    with pytest.raises(RMFitError, match="too few"):
        fit_head(X, refs[:3], ["a", "b", "c"])


def test_load_pairs_forms_and_errors(tmp_path: Path):
    good = tmp_path / "pairs.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "hi", "chosen": "hello", "rejected": "no"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": "go away", "prompt_id": "p1", "kind": "k"},
    ]) + "\n")
    pairs = load_pairs(good)
    assert pairs[0].messages == pairs[1].messages == ({"role": "user", "content": "hi"},)
    assert pairs[1].chosen == "hello" and pairs[1].prompt_id == "p1" and pairs[1].kind == "k"
    items, refs = unique_items(pairs)
    assert len(items) == 3 and refs == [(0, 1), (0, 2)]  # "hello" on the same prompt is one item
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "hi", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(RMFitError, match=r"bad.jsonl:2.*chosen"):
        load_pairs(bad)


def test_built_checkpoint_scores_what_the_fit_reads(tmp_path: Path):
    """`prepare_rm`: transformers' sequence-classification forward of the built folder equals the head times the
    state `FinalStates` gives the fit; idempotent; another head rebuilds it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = models.prepare()
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    weight = np.random.default_rng(0).normal(size=hidden) * 0.05
    head = models.write_rm_head(tmp_path / "head.json", weight, {"note": "test"})
    out = models.prepare_rm(head, base, tmp_path / "rm")
    marker = json.loads((out / models.MARKER).read_text())
    assert marker["kind"] == "rm" and marker["hash"] == models.model_hash(out) and marker["fit"]["note"] == "test"
    items = [(({"role": "user", "content": "What is 2+2?"},), "4."),
             (({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}), "Blue")]
    states = FinalStates(base)(items)
    expected = states.astype(np.float64) @ weight
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = [float(model(torch.tensor([rm_token_ids(tok, m, c)])).logits[0, 0]) for m, c in items]
    # The same float32 forward; only the 576-term dot product differs (float32 vs float64): a few ulps of its terms.
    bound = [1e-5 * float(np.abs(s.astype(np.float64) * weight).sum()) for s in states]
    assert all(abs(g - e) <= b for g, e, b in zip(got, expected, bound, strict=True)), (got, expected)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert models.prepare_rm(head, base, out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    models.write_rm_head(head, -weight, {"note": "negated"})
    assert not models.is_rm_prepared(out, head)
    models.prepare_rm(head, base, out)
    assert json.loads((out / models.MARKER).read_text())["fit"]["note"] == "negated"


def test_trainer_trains_on_the_chosen_field_and_logs_the_total():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import grpo_trl
    finally:
        sys.path.remove(str(ROOT / "examples"))
    results = [SimpleNamespace(reward=1.5, rm_score=2.0, rbr_reward=-0.5),
               SimpleNamespace(reward=-1.0, rm_score=0.25, rbr_reward=-1.25)]

    async def served(prompts, completions, **kwargs):  # stands in for rbr_client's TRL function
        served.last_results = results
        return [r.reward for r in results]

    served.last_results = []
    logged: dict[str, float] = {}
    for which, want in (("total", [1.5, -1.0]), ("rm", [2.0, 0.25]), ("rbr", [-0.5, -1.25])):
        fn = grpo_trl.chosen(served, which)
        assert asyncio.run(fn(["p", "q"], ["a", "b"], log_metric=logged.__setitem__)) == want
        assert logged == {"served/reward": 0.25}
        assert fn.__name__ == "served"


@pytest.mark.engine
def test_vllm_states_are_the_transformers_states():
    """The fit reads states through vLLM's pooling runner; in float32 they are `FinalStates`' (transformers) states
    (same rendering, last token, final norm)."""
    from tolerances import ENGINE_FP32_TOL

    from rbr_model.rm_fit import vllm_final_states

    base = models.prepare()
    items = [(({"role": "user", "content": "What is 2+2?"},), "4."),
             (({"role": "user", "content": "Tell me a joke."},), "I'm sorry, but I can't help with that.")]
    served = vllm_final_states(base, items, max_len=1024, dtype="float32")
    reference = FinalStates(base)(items)
    # Two float32 forwards adding in another order: relative ~4e-6 per reduction over 30 layers (tests/tolerances.py).
    np.testing.assert_allclose(served, reference, rtol=0, atol=ENGINE_FP32_TOL * float(np.abs(reference).max()))
