"""Splitting OpenRLHF's decoded query strings into conversation and completion."""

from __future__ import annotations

import pytest

from service.chat_text import SplitError, clean, parse_conversation, split_query

CHATML_PROMPT = (
    "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHow do I tie a tie?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_split_with_exact_prompt_and_template_tokens():
    query = CHATML_PROMPT + "Cross the wide end over.<|im_end|><|endoftext|>"
    prompt, completion = split_query(query, CHATML_PROMPT)
    assert prompt == CHATML_PROMPT
    assert clean(completion) == "Cross the wide end over."
    assert parse_conversation(prompt) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "How do I tie a tie?"},
    ]


def test_split_when_prompt_was_left_truncated():
    long_prompt = "<|im_start|>user\n" + "context " * 200 + "What is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    truncated = long_prompt[300:]
    prompt_part, completion = split_query(truncated + "Four.<|im_end|>", long_prompt)
    assert clean(completion) == "Four."
    assert prompt_part == truncated


def test_fallback_on_assistant_marker_and_llama3():
    _, completion = split_query(LLAMA3_PROMPT + "Hello!<|eot_id|>", "something else entirely")
    assert clean(completion) == "Hello!"
    assert parse_conversation(LLAMA3_PROMPT) == [{"role": "user", "content": "Hi there"}]


def test_plain_text_prompt_is_one_user_turn():
    assert parse_conversation("Tell me a joke") == [{"role": "user", "content": "Tell me a joke"}]
    prompt, completion = split_query("Tell me a joke Why did...", "Tell me a joke")
    assert completion == " Why did..."


def test_unsplittable_query_is_an_error():
    with pytest.raises(SplitError, match="prompts"):
        split_query("no markers here", None)
