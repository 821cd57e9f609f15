"""Learned proposition heads: logistic regressions on the grader trunk's hidden states (docs/grader-accuracy.md)."""

from rbr_model.heads.inputs import INPUT_VERSION, MEAN, MEAN_AND_MAX, POOLINGS, HeadInput, build_input, pool_span
from rbr_model.heads.model import FORMAT, POOLING, Heads, HeadsError, packaged_heads_path

__all__ = ["FORMAT", "INPUT_VERSION", "MEAN", "MEAN_AND_MAX", "POOLING", "POOLINGS", "HeadInput", "Heads",
           "HeadsError", "build_input", "packaged_heads_path", "pool_span"]
