"""Error types more than one layer raises, kept at the bottom so a lower layer never imports a higher one.

`PromptError`: the grader's prompts and the heads' inputs both read a conversation and a completion, and the
service turns either refusal into a 422 without caring which of them refused.
"""

from __future__ import annotations


class PromptError(ValueError):
    """An item cannot be turned into a grading prompt or a head's input (unknown proposition, malformed message)."""
