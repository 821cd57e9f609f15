"""Learned proposition heads: logistic regressions on the grader trunk's hidden states (docs/grader-accuracy.md)."""

from rbr_model.heads.inputs import INPUT_VERSION, HeadInput, build_input
from rbr_model.heads.model import FORMAT, POOLING, Heads, HeadsError, packaged_heads_path

__all__ = ["FORMAT", "INPUT_VERSION", "POOLING", "HeadInput", "Heads", "HeadsError", "build_input",
           "packaged_heads_path"]
