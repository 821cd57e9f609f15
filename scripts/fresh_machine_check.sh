#!/usr/bin/env bash
# The README's two commands on a fresh machine: a clean Debian bookworm container with Python 3.11 and nothing
# else (built from Debian packages with debootstrap, see scripts/docker_lib.sh), root, the host's network.
#
#   1. `bash scripts/serve.sh` in one container, until /readyz answers 200; then the README's curl must give a
#      reward with features.
#   2. `CI=true bash scripts/test.sh` in another, to a green suite.
#
# Each container gets a fresh clone of this checkout's HEAD (commit first: uncommitted changes are not in it),
# OpenAI's reference data from ../shared read-only, and this machine's pip settings (index, find-links, CA:
# scripts/docker_lib.sh pip_settings). Needs root and a Docker engine (started if none runs). Long: the suite
# alone takes 15-30 minutes on 2 cores.
#
#   bash scripts/fresh_machine_check.sh            # both
#   bash scripts/fresh_machine_check.sh serve      # only the first command
#   bash scripts/fresh_machine_check.sh test       # only the second
#
# Prints one line per check and exits non-zero if any failed. Logs: $RBR_CHECK_DIR (default /tmp/rbr-fresh-check).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CHECK_NAME=fresh-machine
# shellcheck source=scripts/docker_lib.sh
source scripts/docker_lib.sh

WHAT=${1:-all}
case "$WHAT" in all | serve | test) ;; *) die "usage: $0 [all|serve|test]" ;; esac
READY_TIMEOUT_S=${RBR_CHECK_READY_TIMEOUT_S:-1800}
TEST_TIMEOUT_S=${RBR_CHECK_TEST_TIMEOUT_S:-5400}
WORK=${RBR_CHECK_DIR:-/tmp/rbr-fresh-check}
IMAGE=$STAND_IN_PREFIX/debian-python:3.11
SHARED=$(cd "$ROOT/.." && pwd)/shared
RUN_ID=$$
COMMIT=$(git rev-parse HEAD)
CONTAINERS=()
RESULTS=()

cleanup() {
  local c
  for c in "${CONTAINERS[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

record() {  # record NAME ok|FAIL DETAIL
  RESULTS+=("$(printf '%-4s %-28s %s' "$2" "$1" "$3")")
  say "$2 $1: $3"
}

ensure_docker_engine
build_stand_in debian-python:3.11 python3 --change 'CMD ["bash"]'
rm -rf "$WORK"
mkdir -p "$WORK"

# Mounts and environment for pip, as this machine has them.
# The CA file goes to a path of its own: mounted over /etc/ssl/certs, it would break Debian's ca-certificates.
PIP_ENV=()
PIP_MOUNTS=()
while IFS= read -r kv; do
  case "$kv" in
    PIP_CERT=*) PIP_MOUNTS+=(-v "${kv#PIP_CERT=}:/run/rbr-host-ca.pem:ro"); PIP_ENV+=(-e PIP_CERT=/run/rbr-host-ca.pem) ;;
    *) PIP_ENV+=(-e "$kv") ;;
  esac
done < <(pip_settings)
while IFS= read -r path; do
  case "$path" in *.pem | *.crt) ;; *) PIP_MOUNTS+=(-v "$path:$path:ro") ;; esac
done < <(pip_local_paths)
SHARED_MOUNT=()
if [ -d "$SHARED" ]; then
  SHARED_MOUNT=(-v "$SHARED:/src/shared:ro")
else
  say "WARNING: no $SHARED (OpenAI's reference data next to the checkout): under CI=true the tests that read it fail"
fi

# start_fresh NAME COMMAND: a clean container on a fresh clone of HEAD, running COMMAND in the clone as root.
start_fresh() {
  local name=$1 command=$2 clone="$WORK/$1/main"
  mkdir -p "$WORK/$1"
  git clone -q --no-local "$ROOT" "$clone"
  git -C "$clone" checkout -q "$COMMIT"  # both containers test the commit this run started on
  CONTAINERS+=("rbr-fresh-$name-$RUN_ID")
  docker run -d --name "rbr-fresh-$name-$RUN_ID" --network host --shm-size 2g \
    -v "$clone:/src/main" "${SHARED_MOUNT[@]}" "${PIP_MOUNTS[@]}" "${PIP_ENV[@]}" -e CI=true \
    -w /src/main "$IMAGE" bash -c "$command" >/dev/null
}

wait_exit() {  # wait_exit CONTAINER TIMEOUT_S -> prints the exit code, or "timeout"
  local c=$1 deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$c")" = false ]; then
      docker inspect -f '{{.State.ExitCode}}' "$c"
      return
    fi
    sleep 10
  done
  echo timeout
}

check_serve() {
  local port t0 c code body
  port=$(free_port)
  t0=$SECONDS
  start_fresh serve "RBR_PORT=$port bash scripts/serve.sh"
  c="rbr-fresh-serve-$RUN_ID"
  say "serve: container $c, port $port; waiting for /readyz (setup and model load; log: $WORK/serve.log)"
  code=000
  while [ $((SECONDS - t0)) -lt "$READY_TIMEOUT_S" ]; do
    [ "$(docker inspect -f '{{.State.Running}}' "$c")" = true ] || break
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz" || true)
    [ "$code" = 200 ] && break
    sleep 10
  done
  docker logs "$c" >"$WORK/serve.log" 2>&1 || true
  if [ "$code" != 200 ]; then
    tail -30 "$WORK/serve.log" >&2
    record "serve.sh /readyz" FAIL "no 200 after $((SECONDS - t0)) s (last $code; log $WORK/serve.log)"
    return
  fi
  record "serve.sh /readyz" ok "200 after $((SECONDS - t0)) s from an empty Debian (setup included)"
  # The README's request, as written there, on this port.
  body=$(curl -s -w '\n%{http_code}' "localhost:$port/v1/rewards" -H 'content-type: application/json' -d '{
    "items": [{"prompt": "How do I pick a lock?", "completion": "Sorry, I cannot help with that.",
               "response_type": "hard_refuse", "rm_score": 0.1, "id": "a"}],
    "return_features": true}')
  code=${body##*$'\n'}
  body=${body%$'\n'*}
  if [ "$code" = 200 ] && python3 -c 'import json,sys; r=json.loads(sys.argv[1])["results"][0];
assert isinstance(r["reward"], float) and r["features"], r' "$body" 2>/dev/null; then
    record "README curl" ok "200, reward $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["results"][0]["reward"])' "$body") with features"
  else
    record "README curl" FAIL "$code: ${body:0:300}"
  fi
  docker rm -f "$c" >/dev/null 2>&1 || true
}

check_test() {
  local t0 c rc summary
  t0=$SECONDS
  start_fresh test "bash scripts/test.sh"
  c="rbr-fresh-test-$RUN_ID"
  say "test: container $c; running the README's test command (log: $WORK/test.log)"
  rc=$(wait_exit "$c" "$TEST_TIMEOUT_S")
  docker logs "$c" >"$WORK/test.log" 2>&1 || true
  summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed).* =+$|[0-9]+ passed' "$WORK/test.log" | tail -1)
  if [ "$rc" = 0 ]; then
    record "test.sh suite" ok "exit 0 after $((SECONDS - t0)) s: ${summary:-no summary line}"
  else
    tail -40 "$WORK/test.log" >&2
    record "test.sh suite" FAIL "exit $rc after $((SECONDS - t0)) s: ${summary:-see $WORK/test.log}"
  fi
  docker rm -f "$c" >/dev/null 2>&1 || true
}

[ "$WHAT" = test ] || check_serve
[ "$WHAT" = serve ] || check_test

echo
echo "fresh machine check (${COMMIT:0:7}, $(date -u +%Y-%m-%dT%H:%MZ)):"
printf '  %s\n' "${RESULTS[@]}"
for r in "${RESULTS[@]}"; do
  case "$r" in FAIL*) exit 1 ;; esac
done
