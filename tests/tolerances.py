"""Tolerances for comparing numbers the real engines compute, each derived from the arithmetic behind it.

The shared grader engine runs in float32 (tests/conftest.py). vLLM does not promise batch invariance: the same
prompt batched with others, chunked differently, or read partly from the prefix cache adds the same float32 terms
in another order. Unit roundoff is 6e-8; a reduction over n = 576 (hidden size) to 4096 (context) terms is off by
~sqrt(n) x 6e-8 <= 4e-6 relative, and 30 layers carry that into the logits: the yes/no logit gap (|gap| <~ 10)
moves by <~ 1e-4, and P(yes) = sigmoid(gap) by at most a quarter of that. The yes/no mass moves by at most
mass x |change in logsumexp| <= 1e-4 too.
Measured on this project's CPU VM: up to 1.4e-6 (forced chunked prefill, reversed order) and 6.3e-6
(a loaded machine, 32 vs 512 tokens from the prefix cache). 1e-4 keeps a 15x margin over the worst seen and still
catches any real change (a wrong token id or prompt moves P(yes) by 1e-2 or more).
"""

from __future__ import annotations

# |delta P(yes)| and |delta yes/no mass| between two float32 runs of the same prompt in another batch or cache state
ENGINE_FP32_TOL = 1e-4
