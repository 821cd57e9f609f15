#!/usr/bin/env bash
# The CPU image alone, hardened, with Docker's default shared memory: builds docker/Dockerfile.cpu and runs it as
#   docker run --network host --read-only --tmpfs /tmp --cap-drop ALL rbr-serve:cpu
# on a free loopback port, then checks /readyz (within 10 min), the README's request and the hardening
# (scripts/image_check.py). Removes its container; exit 0 only if every check passed.
#
#   bash scripts/image_check.sh                 # needs root; starts dockerd if none answers
#   bash scripts/image_check.sh --no-build      # the rbr-serve:cpu already built
#   bash scripts/image_check.sh --shm-size 2g   # as docker/README.md runs it, for comparison
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK_NAME=image-check
# shellcheck source=scripts/docker_lib.sh
source scripts/docker_lib.sh

ensure_docker_engine
args=()
if ! docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1 \
   && ! docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
  say "python:3.11-slim-bookworm unreachable: building on a Debian stand-in"
  build_stand_ins
  args+=(--stand-ins)
fi
settings=$(mktemp)
ca=$(mktemp)
trap 'rm -f "$settings" "$ca"' EXIT
pip_settings >"$settings"
pip_ca_pem >"$ca"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
# Debian's python3: the helpers shared with compose_check.py need PyYAML, which comes with docker-compose.
"$PY" scripts/image_check.py --pip-settings "$settings" --ca-pem "$ca" "${args[@]}" "$@"
