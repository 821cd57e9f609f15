#!/usr/bin/env bash
# Runs the whole suite (scripts/test.sh: setup, ruff, pytest) while CPU hogs keep every core busy, as on a
# developer's machine that is doing something else. A test that passes only on an idle machine fails here.
# Extra arguments go to pytest, e.g. `CI=true bash scripts/stress_test.sh -x`.
# RBR_STRESS_HOGS sets the number of busy loops (default: one per core). The hogs stop when the run ends,
# fails or is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
hogs=${RBR_STRESS_HOGS:-$(nproc)}
pids=()
run_pid=""
# shellcheck disable=SC2317  # called by the traps
stop() {
    local pid
    if [[ -n "$run_pid" ]]; then  # interrupted: stop the test run too (its children first)
        pkill -TERM -P "$run_pid" 2>/dev/null || true
        kill -TERM "$run_pid" 2>/dev/null || true
    fi
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT TERM
for _ in $(seq "$hogs"); do
    python3 -c 'while True: pass' &  # a pure busy loop: no I/O, no memory, it only competes for CPU
    pids+=("$!")
done
echo "[stress] ${hogs} CPU hog(s) running (pids ${pids[*]}); running scripts/test.sh $*"
start=$(date +%s)
status=0
bash scripts/test.sh "$@" &  # in the background, so that a signal reaches the traps at once
run_pid=$!
wait "$run_pid" || status=$?
run_pid=""
echo "[stress] scripts/test.sh exited ${status} after $(( $(date +%s) - start )) s under ${hogs} CPU hog(s)"
exit "$status"
