#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and starts rbr-serve on the embedded default:
# the CPU vLLM engine with the embedded SmolLM2-135M grader, the default policy and weights.
# Settings are RBR_* environment variables (see README); Redis is used when RBR_REDIS_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/rbr serve "$@"
