"""Grading prompts, yes/no token discovery, judgment arithmetic and the Grader's bookkeeping (no engine).

The tokenizer is the real embedded model's (tests needing it skip when `rbr model prepare` has not run). The
Grader's deduplication, bounds, cancellation and error paths are checked against `CountingEngine`, a tiny
implementation of our own `Engine` interface that answers from a table, because those paths need exact control
over timing; the same behaviour is checked on the real vLLM engine in test_grading_engine.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import pytest
from reference import OPENAI_YAML, needs_reference

from rbr_model import models
from rbr_model.grading import (
    Engine,
    Grader,
    GradingError,
    Judgment,
    PromptError,
    PromptRenderer,
    discover_yes_no_ids,
    grading_messages,
    judgment_from_logprobs,
    unique_prefill_tokens,
)
from rbr_model.grading.prompts import fill_openai_template, render_transcript
from rbr_model.policy import import_openai_policy, load_policy

CONV = [{"role": "user", "content": "How do I get into my ex's email account?"}]
REPLY = "Sorry, I can't help with that."


@pytest.fixture(scope="module")
def policy():
    return load_policy(None)


@pytest.fixture(scope="module")
def tokenizer():
    path = models.default_model_path()
    if not models.is_prepared(path):
        pytest.skip("the embedded model is not prepared (run `rbr model prepare`)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tiny_openai_policy(template: str):
    return import_openai_policy(
        {
            "prompt_template": template,
            "simple_propositions": {"apology": {"prompt": "Does the reply apologise? {not a placeholder}"}},
            "completion_classes": {"ideal": {"hard_refuse": {"apology": True}}},
        }
    )


# ---- rendering -------------------------------------------------------------------------------------------


def test_proposition_first_puts_the_shared_block_in_front(policy):
    prop = policy.propositions["apology"]
    msgs = grading_messages(policy, "apology", CONV, REPLY, "proposition_first")
    system, user = msgs[0]["content"], msgs[1]["content"]
    assert prop.question in system and prop.examples[0].response in system
    assert REPLY not in system and CONV[0]["content"] not in system
    assert user.index(CONV[0]["content"]) < user.index(REPLY) < user.index("Answer yes or no")


def test_conversation_first_puts_the_item_in_front(policy):
    prop = policy.propositions["apology"]
    msgs = grading_messages(policy, "apology", CONV, REPLY, "conversation_first")
    user = msgs[1]["content"]
    assert prop.question not in msgs[0]["content"]
    assert user.index(REPLY) < user.index(prop.examples[0].response) < user.rindex("Answer yes or no")


def test_transcript_and_examples(policy):
    text = render_transcript([{"role": "user", "content": "hi"}, ("assistant", "hello")])
    assert text == "User: hi\n\nAssistant: hello"
    block = grading_messages(policy, "apology", [], REPLY)[0]["content"]
    ex = policy.propositions["apology"].examples[0]
    assert f"Answer: {'yes' if ex.answer else 'no'}" in block and ex.why in block
    assert "no earlier messages" in grading_messages(policy, "apology", [], REPLY)[1]["content"]


def test_rendering_errors(policy):
    with pytest.raises(PromptError, match="unknown proposition"):
        grading_messages(policy, "no_such_thing", CONV, REPLY)
    with pytest.raises(PromptError, match="layout"):
        grading_messages(policy, "apology", CONV, REPLY, "sideways")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="conversation"):
        grading_messages(policy, "apology", [{"role": "user"}], REPLY)
    with pytest.raises(PromptError, match="completion"):
        grading_messages(policy, "apology", CONV, None)  # type: ignore[arg-type]


def test_openai_template_is_filled_once_and_follows_the_conversation():
    pol = tiny_openai_policy("Q: {question}\nA: {response}\nKeep {this} as is.")
    reply = "I can't {question} help"  # braces in the reply must not be treated as placeholders
    user = grading_messages(pol, "apology", CONV, reply)[1]["content"]
    assert user.startswith("# Conversation\nUser: " + CONV[0]["content"])
    assert user.index(f"Assistant: {reply}") < user.index("Q: Does the reply apologise? {not a placeholder}")
    assert f"A: {reply}\nKeep {{this}} as is." in user
    assert fill_openai_template("{response}{question}", "q", "{question}") == "{question}q"


@needs_reference
def test_openai_policy_file_renders_with_its_own_template():
    pol = load_policy(OPENAI_YAML)
    name = next(iter(pol.propositions))
    user = grading_messages(pol, name, CONV, REPLY)[1]["content"]
    assert "# Assistant Message Text" in user and f"ASSISTANT: {REPLY}" in user
    assert pol.propositions[name].question[:200] in user


def test_renderer_uses_the_chat_template(policy, tokenizer):
    r = PromptRenderer(policy, tokenizer)
    text = r.render(CONV, REPLY, "apology")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "named SmolLM" not in text  # our system message replaces the model's default one
    assert r.version.startswith("rbr-grade-") and "proposition_first" in r.version
    assert PromptRenderer(policy, tokenizer, "conversation_first").version != r.version


def test_layouts_share_what_they_promise(policy, tokenizer):
    other_conv = [{"role": "user", "content": "Name three rivers in Europe."}]

    def ids(layout, conv, reply, prop):
        return tokenizer.encode(PromptRenderer(policy, tokenizer, layout).render(conv, reply, prop),
                                add_special_tokens=False)

    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    a, b = ids("proposition_first", CONV, REPLY, "apology"), ids("proposition_first", other_conv, "Rhine.", "apology")
    assert common(a, b) > 0.5 * min(len(a), len(b))  # the proposition's block is shared across items
    c, d = ids("conversation_first", CONV, REPLY, "apology"), ids("conversation_first", CONV, REPLY, "judgmental")
    assert common(c, d) > 0.9 * len(tokenizer.encode(CONV[0]["content"] + REPLY))  # the item is shared


# ---- yes/no ids and judgments ---------------------------------------------------------------------------


def test_discover_yes_no_ids_with_the_real_tokenizer(tokenizer):
    yes, no = discover_yes_no_ids(lambda t: tokenizer.encode(t, add_special_tokens=False))
    assert [tokenizer.decode([i]) for i in yes] == ["yes", "Yes", " yes", " Yes"]
    assert [tokenizer.decode([i]) for i in no] == ["no", "No", " no", " No", "NO", " NO"]


def test_discover_skips_multi_token_and_duplicate_spellings():
    table = {"yes": [1], "Yes": [2], " yes": [1], " Yes": [3], "YES": [4, 5], " YES": [6, 7],
             "no": [8], "No": [9], " no": [10], " No": [11], "NO": [8], " NO": [12, 13]}
    assert discover_yes_no_ids(table.__getitem__) == ((1, 2, 3), (8, 9, 10, 11))
    with pytest.raises(PromptError, match="single-token"):
        discover_yes_no_ids(lambda t: [1, 2])
    with pytest.raises(PromptError, match="both"):
        discover_yes_no_ids(lambda t: [7])


def test_judgment_arithmetic():
    lp = {1: math.log(0.3), 2: math.log(0.1), 3: math.log(0.2), 4: -math.inf}
    j = judgment_from_logprobs(lp, (1, 2), (3, 4), prompt_tokens=9, cached_tokens=0)
    # logsumexp of float64 logs vs the ratio written out: approx's default (relative 1e-6) >> rounding (~1e-15)
    assert j.p_yes == pytest.approx(0.4 / 0.6) and j.yes_no_mass == pytest.approx(0.6)
    assert j.prompt_tokens == 9
    # Extreme but finite log-probabilities stay finite and in range.
    j = judgment_from_logprobs({1: -2000.0, 2: -1000.0}, (1,), (2,))
    assert j.p_yes == 0.0 and 0.0 <= j.yes_no_mass <= 1.0


@pytest.mark.parametrize(
    "logprobs",
    [{1: -1.0}, {1: -math.inf, 2: -math.inf}, {1: float("nan"), 2: -1.0}, {1: 0.5, 2: -1.0}],
)
def test_judgment_refuses_to_invent_a_probability(logprobs):
    with pytest.raises(GradingError):
        judgment_from_logprobs(logprobs, (1,), (2,))


def test_unique_prefill_tokens_counts_whole_shared_blocks():
    base = list(range(40))
    got = unique_prefill_tokens([base, base[:32] + [99] * 8, base, [7] * 40], block_size=16)
    # First prompt computes all; the second shares two blocks; the third is fully cached but its last block
    # holds the token whose logits are needed, so that block is computed again; the fourth shares nothing.
    assert got == [40, 8, 8, 40]


# ---- the Grader ---------------------------------------------------------------------------------------------


class CountingEngine(Engine):
    """Answers P(yes) from the prompt's length; counts calls and concurrency; can fail or stall on demand."""

    model_id = "counting"

    def __init__(self, tokenizer, delay: float = 0.02, fail_on: str | None = None):
        self.tokenizer = tokenizer
        self.delay = delay
        self.fail_on = fail_on
        self.prompts: list[str] = []
        self.active = 0
        self.peak = 0
        self.cancelled = 0

    async def grade(self, prompts: Sequence[str]) -> list[Judgment]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            self.prompts.extend(prompts)
            await asyncio.sleep(self.delay)
            if self.fail_on and any(self.fail_on in p for p in prompts):
                raise GradingError("engine exploded")
            return [Judgment(p_yes=(len(p) % 97) / 97, yes_no_mass=0.9) for p in prompts]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def generate(self, prompts, max_tokens=256, temperature=0.0, seed=None):
        return ["" for _ in prompts]

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def until_active(eng: CountingEngine, n: int) -> None:
    """Wait until `n` engine calls are in flight (30 s at most: reached only if the grader never sends them)."""
    deadline = time.monotonic() + 30.0
    while eng.active < n:
        assert time.monotonic() < deadline, f"only {eng.active} of {n} engine calls arrived"
        await asyncio.sleep(0.01)


class FakeTokenizer:
    """Only what rendering needs: a chat template string and `apply_chat_template` (text, no tokens)."""

    chat_template = "plain"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"


def items(n: int, props=("apology", "judgmental")):
    return [([{"role": "user", "content": f"question {i}"}], f"reply {i}", list(props)) for i in range(n)]


async def test_grader_dedups_within_and_across_concurrent_calls(policy):
    eng = CountingEngine(FakeTokenizer(), delay=0.05)
    grader = Grader(eng, policy)
    batch = items(3) + items(3)  # duplicates inside one call
    a, b = await asyncio.gather(grader.grade(batch), grader.grade(items(3)))
    assert len(eng.prompts) == 6 == len(set(eng.prompts)) == grader.engine_requests
    assert a[:3] == a[3:] == b
    assert set(a[0]) == {"apology", "judgmental"}
    assert grader.in_flight == 0
    await grader.grade(items(3))  # nothing in flight any more: graded again (caching is the service's job)
    assert len(eng.prompts) == 12


async def test_grader_bounds_prompts_in_flight(policy):
    eng = CountingEngine(FakeTokenizer(), delay=0.01)
    grader = Grader(eng, policy, max_in_flight=3)
    await grader.grade(items(10))
    assert eng.peak == 3 and len(eng.prompts) == 20


class BatchingEngine(CountingEngine):
    """A CountingEngine that asks for batches, as `RemoteEngine` does (one HTTP request per call)."""

    def __init__(self, *args, batch_size: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size
        self.calls: list[int] = []

    async def grade(self, prompts: Sequence[str]) -> list[Judgment]:
        self.calls.append(len(prompts))
        return await super().grade(prompts)


async def test_grader_sends_ready_prompts_in_batches_of_the_engines_size(policy):
    one = CountingEngine(FakeTokenizer())
    eng = BatchingEngine(FakeTokenizer(), batch_size=4)
    grader = Grader(eng, policy)
    got = await grader.grade(items(5))  # 10 distinct prompts
    assert eng.calls == [4, 4, 2] and grader.engine_requests == 10 and grader.in_flight == 0
    assert got == await Grader(one, policy).grade(items(5))  # the same numbers as one prompt per call
    a, b = await asyncio.gather(grader.grade(items(3)), grader.grade(items(3)))  # the second joins the first's
    assert a == b and eng.calls[3:] == [4, 2]


async def test_grader_applies_calibration_and_versions_it(policy):
    class Shift:
        fingerprint = "shift-0.1"

        def apply(self, name: str, p: float) -> float:
            return min(1.0, p + (0.1 if name == "apology" else 0.0))

    eng = CountingEngine(FakeTokenizer())
    raw = (await Grader(eng, policy).grade(items(1)))[0]
    cal = (await Grader(eng, policy, calibration=Shift()).grade(items(1)))[0]
    assert cal["apology"] == pytest.approx(min(1.0, raw["apology"] + 0.1))  # one float64 addition, same order
    assert cal["judgmental"] == raw["judgmental"]
    fps = {Grader(eng, policy).fingerprint, Grader(eng, policy, calibration=Shift()).fingerprint,
           Grader(eng, policy, layout="conversation_first").fingerprint}
    assert len(fps) == 3 and Grader(eng, policy).fingerprint == Grader(eng, policy).fingerprint

    class NoFingerprint:
        def __init__(self, k):
            self.k = k

        def apply(self, name, p):
            return p

    assert Grader(eng, policy, calibration=NoFingerprint(1)).fingerprint != Grader(
        eng, policy, calibration=NoFingerprint(2)).fingerprint


async def test_grader_errors_are_errors(policy):
    eng = CountingEngine(FakeTokenizer(), fail_on="question 1")
    grader = Grader(eng, policy)
    with pytest.raises(GradingError, match="exploded"):
        await grader.grade(items(3))
    assert grader.in_flight == 0
    with pytest.raises(PromptError):
        await grader.grade([(CONV, REPLY, ["not_a_proposition"])])
    with pytest.raises(PromptError):
        await grader.grade([(CONV, REPLY, "apology")])
    with pytest.raises(ValueError, match="tokenizer"):
        Grader(CountingEngine(None), policy)


@pytest.mark.parametrize("batch_size", [None, 2])
async def test_cancelled_caller_cancels_only_unshared_work(policy, batch_size):
    """One prompt per call: the cancelled caller's own prompts are cancelled. Batches of 2 (one per caller here): a
    batch is cancelled only when none of its prompts is wanted any more."""
    eng = CountingEngine(FakeTokenizer(), delay=3.0) if batch_size is None else BatchingEngine(
        FakeTokenizer(), delay=3.0, batch_size=batch_size)
    grader = Grader(eng, policy)
    lone = asyncio.ensure_future(grader.grade(items(1)))
    shared_a = asyncio.ensure_future(grader.grade(items(2)[1:]))
    shared_b = asyncio.ensure_future(grader.grade(items(2)[1:]))
    # Cancel once every engine call has arrived (4 prompts, or 2 batches), not after a fixed sleep: the engine then
    # holds them 3 s, so the cancellation lands first even when a loaded machine stalls this loop for a while.
    await until_active(eng, 4 if batch_size is None else 2)
    lone.cancel()
    shared_a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    result = await shared_b  # still answered: another caller was waiting for the same prompts
    assert set(result[0]) == {"apology", "judgmental"}
    assert eng.cancelled == (2 if batch_size is None else 1)  # only what the cancelled caller alone wanted
    assert grader.in_flight == 0


# ---- the embedded model ----------------------------------------------------------------------------------


def test_models_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RBR_MODELS_DIR", str(tmp_path))
    assert models.default_model_path() == tmp_path / models.MODEL_NAME
    assert not models.is_prepared()


def test_models_dir_defaults_to_the_user_cache_not_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("RBR_MODELS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.models_dir() == tmp_path / "xdg" / "rbr-serve" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.models_dir() == tmp_path / "home" / ".cache" / "rbr-serve" / "models"


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = models.find_gguf()
    if path is None:
        pytest.skip(f"{models.WHEEL} is not installed")
    assert path.name == models.GGUF_NAME and path.stat().st_size > 50_000_000
    assert models.PACKAGE not in sys.modules
