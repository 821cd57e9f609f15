#!/usr/bin/env bash
# The scale-out topology on this machine, as processes, under GRPO-shaped load; one command starts and stops it
# all (see benchmarks/fleet.py and the README's scaling section). Arguments go to benchmarks/fleet.py:
#   bash scripts/fleet.sh --replicas 2 --workers 8 --duration 60 [--no-heads]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec .venv/bin/python benchmarks/fleet.py "$@"
