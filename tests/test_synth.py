"""`rbr synth`: synthetic completions -> grader features -> rows for the fitter.

Most tests use a tiny scripted engine (no model) to pin down resuming, de-duplication and the contradiction
filter exactly. One test runs the whole pipeline (synth -> fit -> report) on the real CPU engine with the
embedded model, then runs synth again on the same folder and checks that nothing is generated or graded twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rbr_model.cli import app
from rbr_model.features import CLASS_PREFIX, FeatureSpec
from rbr_model.fit import HingeFitter, load_orderings, load_rows
from rbr_model.grading.engine import Engine, Judgment
from rbr_model.policy import load_policy
from rbr_model.report import build_report, packaged_data
from rbr_model.reward import RewardModel, Weights
from rbr_model.synth import (
    COMPLETIONS_FILE,
    EXPECTED_CLASSES,
    ROWS_FILE,
    SynthConfig,
    SynthError,
    Synthesizer,
    check_expectations,
    contradicts,
    engine_takes_seeds,
    generation_messages,
    load_labels,
    load_prompt_split,
    load_prompts,
    read_completions,
    sample_seed,
    top_class,
)

ROW_KEYS = {"prompt_id", "response_type", "completion_label", "rm_score", "features"}


@pytest.fixture(scope="module")
def policy():
    return load_policy(None)


@pytest.fixture(scope="module")
def all_prompts(policy):
    return load_prompts(None, policy)


def pick(prompts, *ids):
    by_id = {p.prompt_id: p for p in prompts}
    return [by_id[i] for i in ids]


# ---- a scripted engine -----------------------------------------------------------------------------------


class FakeTokenizer:
    chat_template = "fake-template"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeEngine(Engine):
    """Writes `text(prompt, seed)` and answers every judgment with `p_yes`."""

    def __init__(self, text=lambda prompt, seed: f"reply {seed}", p_yes=1.0, model_id="fake-grader"):
        self.tokenizer = FakeTokenizer()
        self.model_id = model_id
        self.text, self.p_yes = text, p_yes
        self.generated: list[tuple[str, int | None]] = []

    async def grade(self, prompts: Sequence[str]) -> list[Judgment]:
        return [Judgment(p_yes=self.p_yes, yes_no_mass=1.0) for _ in prompts]

    async def generate(self, prompts, max_tokens=256, temperature=0.0, seed=None):
        out = []
        for i, p in enumerate(prompts):
            s = None if seed is None else seed + i
            self.generated.append((p, s))
            out.append(self.text(p, s))
        return out

    async def health(self):
        return True

    async def close(self):
        return None


def records(out: Path) -> list[dict]:
    return read_completions(out / COMPLETIONS_FILE)


# ---- pure pieces -----------------------------------------------------------------------------------------


def test_contradiction_filter_on_hand_made_class_probabilities():
    hard = EXPECTED_CLASSES["hard_refuse"]
    ideal_like = {"ideal": 0.6, "minimum_acceptable_style": 0.2, "unacceptable_completion": 0.1,
                  "illogical_completion": 0.05, "disallowed_completion": 0.05}
    harmful_like = {"ideal": 0.05, "minimum_acceptable_style": 0.05, "unacceptable_completion": 0.2,
                    "illogical_completion": 0.05, "disallowed_completion": 0.65}
    assert top_class(ideal_like) == "ideal" and top_class(harmful_like) == "disallowed_completion"
    assert not contradicts(ideal_like, hard["ideal_refusal"])
    assert contradicts(harmful_like, hard["ideal_refusal"])
    assert contradicts(ideal_like, hard["disallowed_compliance"])
    assert not contradicts(harmful_like, hard["disallowed_compliance"])
    assert not contradicts(harmful_like, None)  # a label without an expectation is never rejected
    assert top_class({"ideal": 0.0, "disallowed_completion": 0.0}) is None
    assert contradicts({"ideal": 0.0}, {"ideal"})  # no class at all is not what any label asks for


def test_expectation_table_covers_every_label_and_uses_policy_classes(policy):
    labels = load_labels()
    table = check_expectations(EXPECTED_CLASSES, policy)
    orderings = load_orderings(packaged_data("orderings.yaml"))
    for rt in policy.classes:
        assert set(table[rt]) == set(labels[rt]) == set(orderings[rt])
    with pytest.raises(SynthError, match="unknown classes"):
        check_expectations({"comply": {"off_topic": ["nonsense"]}}, policy)


def test_one_hot_propositions_land_in_the_expected_classes(policy):
    """A textbook ideal refusal and a textbook harmful answer, as 0/1 proposition values, pass and fail the
    filter the right way round for their labels."""
    spec = FeatureSpec(policy, "hard_refuse")
    refusal = dict.fromkeys(spec.propositions, 0.0) | {"apology": 1.0, "states_inability": 1.0}
    harmful = dict.fromkeys(spec.propositions, 0.0) | {"fully_complies": 1.0, "disallowed_content": 1.0}
    for props, good, bad in ((refusal, "ideal_refusal", "disallowed_compliance"),
                             (harmful, "disallowed_compliance", "ideal_refusal")):
        feats = spec.feature_dicts([props])[0]
        classes = {c: feats[CLASS_PREFIX + c] for c in spec.classes}
        assert not contradicts(classes, EXPECTED_CLASSES["hard_refuse"][good])
        assert contradicts(classes, EXPECTED_CLASSES["hard_refuse"][bad])


def test_seeds_and_generation_messages():
    assert sample_seed(0, "p", "l", 0, 0) == sample_seed(0, "p", "l", 0, 0)
    assert len({sample_seed(0, "p", "l", s, a) for s in range(3) for a in range(3)}) == 9
    assert 0 <= sample_seed(7, "p", "l", 1, 2) < 2**31
    assert engine_takes_seeds(FakeEngine())
    msgs = generation_messages("Be brief.", [{"role": "system", "content": "Be nice."},
                                             {"role": "user", "content": "Hi"}])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Be brief." in msgs[0]["content"] and "Be nice." in msgs[0]["content"]


def test_load_prompts_checks_its_input(tmp_path, policy, all_prompts):
    assert len(all_prompts) >= 240 and {p.response_type for p in all_prompts} == set(policy.classes)
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt_id": "x", "response_type": "nope", "messages": [
        {"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SynthError, match="not in policy"):
        load_prompts(bad, policy)
    # A line separator inside a JSON string is text, not a line break; a broken line is named by number.
    good = {"prompt_id": "y", "response_type": "comply", "messages": [{"role": "user", "content": "a\u2028b"}]}
    bad.write_text("\n" + json.dumps(good, ensure_ascii=False) + "\n{broken\n")
    with pytest.raises(SynthError, match=r"p.jsonl:3: not valid JSON"):
        load_prompts(bad, policy)
    bad.write_text(json.dumps(good, ensure_ascii=False) + "\n")
    assert load_prompts(bad, policy)[0].messages[0]["content"] == "a\u2028b"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(SynthError, match="not UTF-8"):
        load_prompts(bad, policy)
    with pytest.raises(SynthError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl", policy)


def test_load_prompts_by_split(tmp_path, policy, all_prompts):
    splits = load_prompt_split()
    train, held_out = load_prompts(None, policy, split="train"), load_prompts(None, policy, split="eval")
    assert [p.prompt_id for p in train] == splits["train"] and [p.prompt_id for p in held_out] == splits["eval"]
    assert len(train) + len(held_out) == len(all_prompts)
    assert sorted(train + held_out, key=all_prompts.index) == all_prompts  # file order, nothing lost
    with pytest.raises(SynthError, match="unknown prompt split 'test'"):
        load_prompts(None, policy, split="test")
    # A split file must name exactly the prompts of the prompt file, each once.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": i, "response_type": "comply", "messages": [
        {"role": "user", "content": "hi"}]}) + "\n" for i in ("a", "b", "c")))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "c"], "eval": ["b"]}))
    assert [p.prompt_id for p in load_prompts(prompts, split="eval", split_path=split)] == ["b"]
    assert [p.prompt_id for p in load_prompts(prompts, split="train", split_path=split)] == ["a", "c"]
    for body, message in [
        ({"train": ["a", "c"], "eval": ["b", "zz-404"]}, r"split.json: 1 prompt id\(s\) not in .*p.jsonl: zz-404"),
        ({"train": ["a"], "eval": ["b"]}, r"split.json: 1 prompt\(s\) of .*p.jsonl in neither split: c"),
        ({"train": ["a", "b", "c"], "eval": ["b"]}, r"split.json: prompt_id 'b' is listed in both 'train' and"),
        ({"train": ["a", "c"]}, r"split.json: eval: expected a list of prompt ids"),
        (["a", "b"], r"split.json: expected a JSON object"),
    ]:
        split.write_text(json.dumps(body))
        with pytest.raises(SynthError, match=message):
            load_prompts(prompts, split="train", split_path=split)
    split.write_text("{broken")
    with pytest.raises(SynthError, match="split.json: not valid JSON"):
        load_prompt_split(split)
    with pytest.raises(SynthError, match="missing.json: cannot read"):
        load_prompt_split(tmp_path / "missing.json")


def test_synth_cli_rejects_an_unknown_split(tmp_path):
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "out"), "--no-rm", "--split", "dev"])
    assert result.exit_code == 2 and "unknown prompt split 'dev'" in result.output, result.output
    assert not (tmp_path / "out").exists()


# ---- the run, with the scripted engine ---------------------------------------------------------------------


async def test_rows_resume_and_new_samples(tmp_path, policy, all_prompts):
    prompts = pick(all_prompts, "c-001", "h-001")
    n_labels = len(load_labels()["comply"]) + len(load_labels()["hard_refuse"])
    engine = FakeEngine()
    synth = Synthesizer(engine, policy, config=SynthConfig(samples=1, max_tokens=8))
    first = await synth.run(prompts, tmp_path, progress=False)
    seeds = [seed for _, seed in engine.generated]
    assert None not in seeds and len(set(seeds)) == len(seeds)
    assert first.n_keys == first.n_generations == first.n_accepted == first.n_rows == n_labels
    assert first.n_judgments == 6 * 8 + 7 * 15  # every proposition of each response type, once per completion
    rows = [json.loads(line) for line in (tmp_path / ROWS_FILE).read_text().splitlines()]
    assert all(set(r) == ROW_KEYS and r["rm_score"] == 0.0 for r in rows)
    assert load_rows(tmp_path / ROWS_FILE)  # the fitter accepts the file

    again = Synthesizer(FakeEngine(), policy, config=SynthConfig(samples=1, max_tokens=8))
    second = await again.run(prompts, tmp_path, progress=False)
    assert (second.n_generations, second.n_judgments, second.n_done_before) == (0, 0, n_labels)
    assert second.n_rows == n_labels

    more = Synthesizer(FakeEngine(), policy, config=SynthConfig(samples=2, max_tokens=8))
    third = await more.run(prompts, tmp_path, progress=False)
    assert third.n_generations == n_labels and third.n_rows == 2 * n_labels  # only the sample-1 keys
    keys = [r["key"] for r in records(tmp_path)]
    assert len(keys) == len(set(keys)) == 2 * n_labels


async def test_duplicates_are_resampled_then_given_up(tmp_path, policy, all_prompts):
    prompts = pick(all_prompts, "c-001")
    engine = FakeEngine(text=lambda prompt, seed: "Same answer every time.")
    synth = Synthesizer(engine, policy, config=SynthConfig(samples=1, max_resamples=2))
    result = await synth.run(prompts, tmp_path, progress=False)
    n = len(load_labels()["comply"])
    assert result.n_accepted == result.n_rows == 1  # only the first copy of the text is kept
    assert result.n_duplicates == 3 * (n - 1) and result.n_exhausted == n - 1
    assert result.n_judgments == 8  # duplicates are never graded
    # the exhausted keys are done: resuming does nothing
    again = await Synthesizer(FakeEngine(), policy, config=SynthConfig(samples=1, max_resamples=2)).run(
        prompts, tmp_path, progress=False)
    assert again.n_generations == 0


async def test_reject_contradictions(tmp_path, policy, all_prompts):
    """Every proposition answered yes makes every completion disallowed: only the labels that allow the
    disallowed class keep theirs; the others are sampled 1 + max_resamples times and rejected each time."""
    prompts = pick(all_prompts, "h-001")
    labels = load_labels()["hard_refuse"]
    cfg = SynthConfig(samples=1, reject_contradictions=True, max_resamples=1)
    result = await Synthesizer(FakeEngine(p_yes=1.0), policy, config=cfg).run(prompts, tmp_path, progress=False)
    allow = {lb for lb, cls in EXPECTED_CLASSES["hard_refuse"].items() if "disallowed_completion" in cls}
    assert allow == {"partial_compliance", "disallowed_compliance"}
    assert {r["completion_label"] for r in load_rows(tmp_path / ROWS_FILE)} == allow
    assert result.n_rejected == 2 * (len(labels) - len(allow))
    assert result.n_generations == len(allow) + 2 * (len(labels) - len(allow))
    rejected = [r for r in records(tmp_path) if r["status"] == "rejected"]
    assert all(r["top_class"] == "disallowed_completion" and r["contradicts_label"] for r in rejected)


async def test_truncated_log_and_foreign_folder(tmp_path, policy, all_prompts):
    prompts = pick(all_prompts, "c-001")
    cfg = SynthConfig(samples=1)
    await Synthesizer(FakeEngine(), policy, config=cfg).run(prompts, tmp_path, progress=False)
    log = tmp_path / COMPLETIONS_FILE
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][:40])  # killed mid-write
    result = await Synthesizer(FakeEngine(), policy, config=cfg).run(prompts, tmp_path, progress=False)
    assert result.n_generations == 1 and result.n_rows == len(lines)
    assert len(records(tmp_path)) == len(lines)

    with pytest.raises(SynthError, match="another grader model"):
        await Synthesizer(FakeEngine(model_id="other"), policy, config=cfg).run(prompts, tmp_path, progress=False)


async def test_hash_only_keeps_no_text(tmp_path, policy, all_prompts):
    cfg = SynthConfig(samples=1, store_text=False)
    await Synthesizer(FakeEngine(), policy, config=cfg).run(pick(all_prompts, "h-001"), tmp_path, progress=False)
    assert all("completion" not in r and len(r["completion_sha256"]) == 64 for r in records(tmp_path))


# ---- the whole pipeline on the real engine ---------------------------------------------------------------


async def test_synth_fit_report_with_the_real_engine(tmp_path, policy, all_prompts, grader_engine):
    """Two comply prompts (all labels) and one hard_refuse prompt (two labels), one short sample each."""
    prompts = pick(all_prompts, "c-001", "c-003", "h-001")
    labels = load_labels()
    labels = {"comply": labels["comply"],
              "hard_refuse": {k: labels["hard_refuse"][k] for k in ("ideal_refusal", "disallowed_compliance")}}
    # seeded=False: vLLM's CPU worker cannot take per-request seeds (see `engine_takes_seeds`); the shared
    # engine is behind a proxy, so say it here rather than rely on the automatic check.
    cfg = SynthConfig(samples=1, max_tokens=32, seeded=False)
    out = tmp_path / "synth"
    synth = Synthesizer(grader_engine, policy, labels=labels, config=cfg)
    result = await synth.run(prompts, out, progress=False)
    n_keys = 2 * 6 + 2
    assert result.n_keys == n_keys and result.n_generations >= n_keys == synth.generations
    assert result.n_judgments == synth.grader.engine_requests > 0
    assert result.n_rows == result.n_accepted > 0

    rows = [json.loads(line) for line in (out / ROWS_FILE).read_text().splitlines()]
    assert len(rows) == result.n_rows
    for r in rows:
        assert set(r) == ROW_KEYS and r["rm_score"] == 0.0
        spec = FeatureSpec(policy, r["response_type"])
        assert tuple(r["features"]) == spec.feature_names
        assert all(0.0 <= v <= 1.0 for v in r["features"].values())
        assert r["completion_label"] in labels[r["response_type"]]
    assert all(r.get("completion") for r in records(out) if r["status"] == "accepted")

    # fit and report
    fitter = HingeFitter(no_rm=True, heldout_fraction=0.34).fit(
        load_rows(out / ROWS_FILE), load_orderings(packaged_data("orderings.yaml")), policy=policy,
        grader_id=grader_engine.model_id)
    weights_path = fitter.weights_.save(tmp_path / "weights.json")
    weights = Weights.load(weights_path)
    RewardModel(policy, weights)  # fingerprint and feature names match the policy
    assert weights.grader_id == grader_engine.model_id
    summary = build_report(load_rows(out / ROWS_FILE), weights, policy, out_dir=tmp_path / "report")
    assert (tmp_path / "report" / "summary.md").stat().st_size > 0
    pngs = list((tmp_path / "report").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
    assert set(summary.response_types) == {"comply", "hard_refuse"}

    # resuming repeats nothing
    again = Synthesizer(grader_engine, policy, labels=labels, config=cfg)
    second = await again.run(prompts, out, progress=False)
    assert (second.n_generations, second.n_judgments, again.generations, again.grader.engine_requests) == (0, 0, 0, 0)
    assert second.n_done_before == n_keys and second.n_rows == result.n_rows
    assert (out / ROWS_FILE).read_text() == "\n".join(json.dumps(r) for r in rows) + "\n"
