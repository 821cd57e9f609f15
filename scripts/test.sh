#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs the whole test suite: lint, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not engine"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra "$@"
