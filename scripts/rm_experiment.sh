#!/usr/bin/env bash
# Issue #23 item 3, the paper's experiment in miniature: the same policy, seed and budget trained four ways, each
# evaluated on the held-out prompts through one service (the service's grader as judge).
#   (a) untrained   (b) --reward rm (helpful-only)   (c) --reward total (RBR + RM)   (d) --reward rbr (RBR only)
# One `rbr serve` (heads grader + the embedded helpful-only RM in process) scores every arm, so all three rewards are
# logged for every arm whichever it trains on. PARALLEL=3 (the default) trains the three arms at once while (a) is
# evaluated, so every arm meets the same load on a shared machine; PARALLEL=1 trains two at a time (b with c, then d
# while (a) is evaluated); PARALLEL=0 one at a time.
#
#   scripts/rm_experiment.sh                                  # the run: 60 min of training, then the evals
#   PARALLEL=0 MINUTES=0 STEPS=1 LIMIT=1 SAMPLES=1 BOOTSTRAP=10 OUT=/tmp/rm-smoke scripts/rm_experiment.sh  # smoke
#
# Settings (environment): OUT, PORT, MINUTES (training budget per arm), STEPS (max steps per arm), SEED, BETA (KL),
# PARALLEL (3: three arms at once; 1: two at a time; 0: one, for a machine short of memory), SAMPLES / MAX_TOKENS /
# LIMIT / BOOTSTRAP (rbr eval policy), SERVICE_URL (use a running service instead).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
PY=${PY:-.venv/bin/python}
RBR=${RBR:-.venv/bin/rbr}
OUT=${OUT:-out/rm-exp}
PORT=${PORT:-8040}
MINUTES=${MINUTES:-60}
STEPS=${STEPS:-100000}
SEED=${SEED:-0}
BETA=${BETA:-0.04}
SAMPLES=${SAMPLES:-4}
MAX_TOKENS=${MAX_TOKENS:-64}
BOOTSTRAP=${BOOTSTRAP:-1000}
LIMIT=${LIMIT:-}
PARALLEL=${PARALLEL:-3}
mkdir -p "$OUT"

service_pid=""
cleanup() {  # the service goes down with the script; the script's own exit status stays
  local rc=$?
  [[ -n $service_pid ]] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
if [[ -z ${SERVICE_URL:-} ]]; then
  SERVICE_URL=http://127.0.0.1:$PORT
  echo "starting rbr serve on $SERVICE_URL (log: $OUT/service.log)"
  RBR_HEADS=auto RBR_RM_ENGINE=vllm RBR_HOST=127.0.0.1 RBR_PORT=$PORT "$RBR" serve >"$OUT/service.log" 2>&1 &
  service_pid=$!
  for _ in $(seq 450); do
    ready=$(curl -sS "$SERVICE_URL/readyz" 2>/dev/null || true)
    curl -fsS "$SERVICE_URL/readyz" >/dev/null 2>&1 && break
    [[ $ready == *"failed to start"* ]] && { echo "rbr serve: engines failed to start; see $OUT/service.log" >&2; exit 1; }
    kill -0 "$service_pid" 2>/dev/null || { echo "rbr serve exited; see $OUT/service.log" >&2; exit 1; }
    sleep 2
  done
  curl -fsS "$SERVICE_URL/readyz" >/dev/null || { echo "rbr serve not ready; see $OUT/service.log" >&2; exit 1; }
fi

train() {  # arm reward
  "$PY" examples/grpo_trl.py --out "$OUT/$1" --reward "$2" --service-url "$SERVICE_URL" --seed "$SEED" \
    --beta "$BETA" --time-budget-min "$MINUTES" --max-steps "$STEPS" --threads 1 >"$OUT/$1.log" 2>&1
}
evaluate() {  # arm model
  "$RBR" eval policy "$2" --name "$1" --service-url "$SERVICE_URL" --samples "$SAMPLES" \
    --max-tokens "$MAX_TOKENS" --bootstrap "$BOOTSTRAP" --seed "$SEED" ${LIMIT:+--limit "$LIMIT"} --no-progress \
    --with-rm \
    -o "$OUT/eval-$1" >"$OUT/eval-$1.log" 2>&1
}

pids=()
bg() { if [[ $PARALLEL != 0 ]]; then "$@" & pids+=($!); else "$@"; fi; }  # in the background unless PARALLEL=0
join() { for p in "${pids[@]}"; do wait "$p"; done; pids=(); }  # a failed arm fails the script
if [[ $PARALLEL == 3 ]]; then
  echo "training (b) rm, (c) total and (d) rbr at once, $MINUTES min each at most; evaluating (a) untrained"
  bg train b-rm rm
  bg train c-total total
  bg train d-rbr rbr
  evaluate a-untrained embedded
  join
  echo "evaluating (b), (c), (d) at once"
  for arm in b-rm c-total d-rbr; do bg evaluate "$arm" "$OUT/$arm/policy"; done
  join
else
  echo "training (b) rm and (c) total, $MINUTES min each at most"
  bg train b-rm rm
  train c-total total
  join
  echo "training (d) rbr; evaluating (a) untrained"
  bg train d-rbr rbr
  evaluate a-untrained embedded
  join
  for arm in b-rm c-total d-rbr; do
    echo "evaluating ($arm)"
    evaluate "$arm" "$OUT/$arm/policy"
  done
fi
"$RBR" eval compare "$OUT/eval-a-untrained" "$OUT/eval-b-rm" "$OUT/eval-c-total" "$OUT/eval-d-rbr" -o "$OUT/compare"
echo "done: $OUT/compare"
