"""Turning OpenRLHF's decoded strings back into a conversation and a completion.

OpenRLHF sends `query` = prompt + response as the trainer decoded them, usually with the chat template's
special tokens still in. We split off the prompt (or, when the trainer left-truncated the prompt, its tail),
strip template tokens, and parse ChatML or Llama-3 prompts into messages; anything else is one user turn.
"""

from __future__ import annotations

import re

SPECIAL_TOKENS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|end_of_text\|>|<\|begin_of_text\|>"
    r"|<\|start_header_id\|>|<\|end_header_id\|>|</s>|<s>|<\|end\|>|<\|assistant\|>|<\|user\|>|<\|system\|>"
    r"|<end_of_turn>|<start_of_turn>|<pad>|<\|pad\|>|\[/?INST\]"
)
CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)
LLAMA3_TURN = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S)
ASSISTANT_MARKERS = ("<|im_start|>assistant\n", "<|start_header_id|>assistant<|end_header_id|>\n\n", "[/INST]",
                     "Assistant:", "ASSISTANT:")
MIN_OVERLAP = 16


class SplitError(ValueError):
    pass


def clean(text: str) -> str:
    return SPECIAL_TOKENS.sub("", text).strip()


def split_query(query: str, prompt: str | None) -> tuple[str, str]:
    """(prompt part, raw completion) of a decoded prompt+response string."""
    if prompt:
        if query.startswith(prompt):
            return prompt, query[len(prompt):]
        # The trainer may have left-truncated the prompt: look for the prompt's tail inside the query.
        for size in (512, 256, 128, 64, 32, MIN_OVERLAP):
            tail = prompt[-size:]
            if len(tail) < MIN_OVERLAP:
                break
            pos = query.find(tail)
            if pos >= 0:
                return query[: pos + len(tail)], query[pos + len(tail):]
    for marker in ASSISTANT_MARKERS:
        pos = query.rfind(marker)
        if pos >= 0:
            return query[: pos + len(marker)], query[pos + len(marker):]
    raise SplitError("cannot find where the prompt ends: send `prompts` matching the start of each query")


def parse_conversation(prompt: str) -> list[dict[str, str]]:
    """Chat-template text to messages; unknown formats become a single user message."""
    for pattern in (CHATML_TURN, LLAMA3_TURN):
        turns = [(role, content.strip()) for role, content in pattern.findall(prompt)]
        turns = [(r, c) for r, c in turns if c or r != "assistant"]  # drop the empty generation header
        if turns:
            return [{"role": _role(r), "content": clean(c)} for r, c in turns]
    text = clean(prompt)
    return [{"role": "user", "content": text}]


def _role(role: str) -> str:
    return role if role in ("system", "user", "assistant", "tool") else "user"
