#!/usr/bin/env bash
# The scale-out topology on this machine, as processes, under GRPO-shaped load; one command starts and stops it
# all (see benchmarks/fleet.py and the README's scaling section). Arguments go to benchmarks/fleet.py:
#   bash scripts/fleet.sh --replicas 2 --workers 8 --duration 60 [--no-heads]
# or, with a first word, to the sweep over workers and replicas (issue #22 item 5) or the faults under load (item 6):
#   bash scripts/fleet.sh sweep [--quick | --replicas 1,2,3 --workers 1,2,4,8,16,32,64 --duration 30]
#   bash scripts/fleet.sh faults [--replicas 2 --workers 8 --duration 30 --json out/fleet_faults.json]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
case "${1:-}" in
  sweep) shift; exec .venv/bin/python benchmarks/fleet_sweep.py "$@" ;;
  faults) shift; exec .venv/bin/python benchmarks/fleet_faults.py "$@" ;;
  *) exec .venv/bin/python benchmarks/fleet.py "$@" ;;
esac
