"""Grading: prompts for yes/no propositions, the engine interface, and the `Grader` that ties them together.

Engines load lazily (`VLLMEngine` needs vLLM, `RemoteEngine` needs httpx), so importing this package is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rbr_model.errors import PromptError
from rbr_model.grading.engine import Engine, GradingError, Judgment, judgment_from_logprobs
from rbr_model.grading.grader import Calibration, GradeItem, Grader
from rbr_model.grading.prompts import (
    DEFAULT_LAYOUT,
    LAYOUTS,
    TEMPLATE_VERSION,
    PromptRenderer,
    discover_yes_no_ids,
    grading_messages,
    unique_prefill_tokens,
)

if TYPE_CHECKING:
    from rbr_model.grading.remote_engine import RemoteEngine
    from rbr_model.grading.vllm_engine import VLLMEngine

__all__ = [
    "DEFAULT_LAYOUT",
    "LAYOUTS",
    "TEMPLATE_VERSION",
    "Calibration",
    "Engine",
    "GradeItem",
    "Grader",
    "GradingError",
    "Judgment",
    "PromptError",
    "PromptRenderer",
    "RemoteEngine",
    "VLLMEngine",
    "discover_yes_no_ids",
    "grading_messages",
    "judgment_from_logprobs",
    "unique_prefill_tokens",
]

_LAZY = {
    "VLLMEngine": "rbr_model.grading.vllm_engine",
    "RemoteEngine": "rbr_model.grading.remote_engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
