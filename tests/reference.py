"""OpenAI's published RBR data (`../shared/reference/openai-rbr/`), for the tests that need it.

The data lives next to the checkout, not in it. Without it a test that needs it is skipped on a laptop, but under
`CI=true` it FAILS: a claim the README makes ("a test checks it") must never go unchecked in CI because a file was
missing. Use one of:

    from reference import GOLD, OPENAI_YAML, needs_reference, require_reference

    @needs_reference                         # a mark: on a test, a class, a module (pytestmark), a pytest.param
    def test_x(): ...

    def test_y():
        ref = require_reference()            # inside a test or fixture: skips (fails under CI=true) when absent

`needs_reference` is applied by the `pytest_runtest_setup` hook in tests/conftest.py, which calls
`require_reference()` before the test runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# tests/ -> the checkout -> its parent, where shared/ sits next to the checkout (main/ and shared/ side by side)
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-rbr"
OPENAI_YAML = REFERENCE / "proposition_prompts.yaml"
GOLD = REFERENCE / "gold_train.jsonl"
FILES = (OPENAI_YAML, GOLD)

needs_reference = pytest.mark.needs_reference
MARKER_HELP = "needs_reference: needs ../shared/reference/openai-rbr (skips when absent; fails under CI=true)"


def in_ci() -> bool:
    """True under CI=true (or CI=1, as most CI systems set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_files() -> list[Path]:
    return [f for f in FILES if not f.is_file()]


def require_reference() -> Path:
    """REFERENCE when its files are there; otherwise skip the test, or fail it when CI=true."""
    missing = missing_files()
    if not missing:
        return REFERENCE
    message = (f"OpenAI's RBR reference data is missing from {REFERENCE} (next to the checkout): "
               f"{', '.join(f.name for f in missing)}")
    if in_ci():
        pytest.fail(f"{message}; CI=true, so a test that needs it fails instead of skipping", pytrace=False)
    pytest.skip(message)
