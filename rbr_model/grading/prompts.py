"""Grading prompts: one yes/no question about the assistant's last message, in the grader's chat template.

Layout matters for speed. vLLM's prefix cache reuses the KV of any leading block of tokens it has already
computed, so whatever is shared by many judgments must come first. Two layouts are available:

- `proposition_first` (default): instructions, the proposition's question, guidance and worked examples open
  the prompt; the conversation and the reply to grade follow. One proposition's prefix is computed once and
  reused for every conversation graded against it.
- `conversation_first`: the conversation and reply open the prompt; the proposition follows. One item's
  conversation is shared by its propositions, but every judgment pays for its proposition's examples.

`benchmarks/bench_grading.py` measures both; with the default policy the proposition's block is far longer than
a typical conversation, so `proposition_first` leaves much less to prefill per judgment.

Policies imported from OpenAI's format carry their own `prompt_template` with `{question}` and `{response}`;
their question text already holds the few-shot examples. That template refers to "the conversation" above it,
so the conversation transcript is placed first and their template follows, verbatim.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from rbr_model.errors import PromptError
from rbr_model.policy import Example, Policy, Proposition

# Bump whenever the wording or the layout logic changes: it is part of the grader fingerprint, so features
# cached under the old wording are never mixed with new ones.
TEMPLATE_VERSION = "rbr-grade-2"

Layout = Literal["proposition_first", "conversation_first"]
LAYOUTS: tuple[Layout, ...] = ("proposition_first", "conversation_first")
DEFAULT_LAYOUT: Layout = "proposition_first"

Message = Mapping[str, str]  # {"role": ..., "content": ...}

# Casings and leading-space forms a model may use to start its answer.
YES_VARIANTS = ("yes", "Yes", " yes", " Yes", "YES", " YES")
NO_VARIANTS = ("no", "No", " no", " No", "NO", " NO")

SYSTEM_INSTRUCTIONS = (
    "You are a careful grader. You read one reply written by an AI assistant and answer a single yes/no "
    "question about it. Judge only the assistant's final reply, using the earlier messages as context. "
    "Answer with one word: yes or no."
)

_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}


# ---- text blocks ----------------------------------------------------------------------------------------


def _role(role: str) -> str:
    return _ROLE_NAMES.get(role, role.capitalize() or "Unknown")


def render_transcript(conversation: Iterable[Message] | Iterable[tuple[str, str]]) -> str:
    """A plain-text transcript, one `Role: content` paragraph per message."""
    lines = []
    for i, msg in enumerate(conversation):
        if isinstance(msg, Mapping):
            role, content = msg.get("role"), msg.get("content")
        else:
            role, content = msg
        if not isinstance(role, str) or not isinstance(content, str):
            raise PromptError(f"conversation[{i}]: expected {{'role': str, 'content': str}}")
        lines.append(f"{_role(role)}: {content}")
    return "\n\n".join(lines)


def _case(conversation: Iterable[Any], reply: str) -> str:
    """The conversation so far and the reply being graded, in the same shape for examples and real items."""
    transcript = render_transcript(conversation)
    head = f"Conversation:\n{transcript}\n\n" if transcript else "Conversation: (no earlier messages)\n\n"
    return f"{head}Assistant's final reply (the one to grade):\n<<<\n{reply}\n>>>"


def _example(i: int, ex: Example) -> str:
    why = f"\nReason: {ex.why}" if ex.why else ""
    return f"Example {i}\n{_case(ex.conversation, ex.response)}\nAnswer: {'yes' if ex.answer else 'no'}{why}"


def proposition_block(prop: Proposition) -> str:
    """The question, guidance and worked examples for one proposition (our own YAML format)."""
    parts = [f"Question: {prop.question}"]
    if prop.guidance:
        parts.append(f"How to decide: {prop.guidance}")
    if prop.examples:
        parts.append("Worked examples:\n\n" + "\n\n".join(_example(i, e) for i, e in enumerate(prop.examples, 1)))
    return "\n\n".join(parts)


_PLACEHOLDER = re.compile(r"\{(question|response)\}")


def fill_openai_template(template: str, question: str, response: str) -> str:
    """Fill `{question}` and `{response}` in one pass: other braces, and braces inside the values, stay put."""
    values = {"question": question, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# ---- messages and chat template ---------------------------------------------------------------------------


def grading_messages(
    policy: Policy,
    proposition: str,
    conversation: Sequence[Message],
    completion: str,
    layout: Layout = DEFAULT_LAYOUT,
) -> list[dict[str, str]]:
    """Chat messages asking the grader one proposition about `completion`, the reply to `conversation`."""
    try:
        prop = policy.propositions[proposition]
    except KeyError:
        raise PromptError(f"unknown proposition {proposition!r} for policy {policy.name!r}") from None
    if not isinstance(completion, str):
        raise PromptError("completion must be a string")
    if layout not in LAYOUTS:
        raise PromptError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")

    if policy.prompt_template:  # an imported OpenAI policy: their template, the conversation before it
        transcript = render_transcript([*conversation, {"role": "assistant", "content": completion}])
        body = fill_openai_template(policy.prompt_template, prop.question, completion)
        return [
            {"role": "system", "content": SYSTEM_INSTRUCTIONS},
            {"role": "user", "content": f"# Conversation\n{transcript}\n\n{body}"},
        ]

    case = _case(conversation, completion)
    ask = f"Question: {prop.question}\nAnswer yes or no."
    block = proposition_block(prop)
    if layout == "proposition_first":
        return [
            {"role": "system", "content": f"{SYSTEM_INSTRUCTIONS}\n\n{block}"},
            {"role": "user", "content": f"{case}\n\n{ask}"},
        ]
    return [
        {"role": "system", "content": SYSTEM_INSTRUCTIONS},
        {"role": "user", "content": f"{case}\n\n{block}\n\n{ask}"},
    ]


class PromptRenderer:
    """Renders grading prompts as text in the grader model's chat template (generation prompt included).

    The rendered text already contains the template's special tokens, so engines must tokenize it without
    adding special tokens again.
    """

    def __init__(self, policy: Policy, tokenizer: Any, layout: Layout = DEFAULT_LAYOUT):
        if layout not in LAYOUTS:
            raise PromptError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("the grader tokenizer has no chat template")
        self.policy = policy
        self.tokenizer = tokenizer
        self.layout: Layout = layout

    @property
    def version(self) -> str:
        """Identifies the wording, the layout and the chat template: part of the grader fingerprint."""
        tmpl = hashlib.sha256(str(self.tokenizer.chat_template).encode()).hexdigest()[:12]
        kind = "openai" if self.policy.prompt_template else "rbr"
        return f"{TEMPLATE_VERSION}/{kind}/{self.layout}/chat-{tmpl}"

    def render(self, conversation: Sequence[Message], completion: str, proposition: str) -> str:
        messages = grading_messages(self.policy, proposition, conversation, completion, self.layout)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---- yes/no token ids --------------------------------------------------------------------------------------


def discover_yes_no_ids(encode: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Token ids that spell a yes or a no in one token, from an `encode(text) -> list[int]` function.

    Multi-token spellings are skipped: their first token ("Y" of "YES") is not an answer on its own. An id
    reached by two spellings is kept once. A tokenizer with no single-token yes or no cannot grade.
    """

    def single(variants: Sequence[str]) -> tuple[int, ...]:
        out: list[int] = []
        for text in variants:
            ids = list(encode(text))
            if len(ids) == 1 and ids[0] not in out:
                out.append(int(ids[0]))
        return tuple(out)

    yes, no = single(YES_VARIANTS), single(NO_VARIANTS)
    if not yes or not no:
        raise PromptError(f"tokenizer has no single-token yes/no (yes ids {yes}, no ids {no})")
    if set(yes) & set(no):
        raise PromptError(f"a token id spells both yes and no: {sorted(set(yes) & set(no))}")
    return yes, no


def tokenizer_encoder(tokenizer: Any):
    """`encode(text)` without special tokens, for `discover_yes_no_ids` with a Hugging Face tokenizer."""
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


# ---- prefix-cache accounting ------------------------------------------------------------------------------


def unique_prefill_tokens(prompts: Iterable[Sequence[int]], block_size: int = 16) -> list[int]:
    """Tokens each prompt must prefill with an unbounded prefix cache that has seen every earlier prompt.

    Mirrors vLLM's cache: hits are whole blocks, matched from the start, and the last prompt token is always
    computed (its logits are the answer). Used to compare layouts without running a model.
    """
    seen: set[int] = set()
    out = []
    for ids in prompts:
        ids = tuple(ids)
        usable = (max(len(ids) - 1, 0) // block_size) * block_size
        chain: list[int] = []  # chain[k]: key of the first k+1 blocks, each built on the one before (as vLLM)
        key = 0
        for end in range(block_size, len(ids) + 1, block_size):
            key = hash((key, ids[end - block_size : end]))
            chain.append(key)
        hit = 0
        while hit < usable and chain[hit // block_size] in seen:
            hit += block_size
        out.append(len(ids) - hit)
        seen.update(chain)
    return out
