#!/usr/bin/env bash
# docker-compose up, for real, on a machine with no image registry and no bridge networks (like the dev VMs):
# the service, Redis and Prometheus of docker-compose.yml, every container on the host's network at free loopback
# ports, then the checks a user relies on (scripts/compose_check.py): the README's request through the container,
# Prometheus scraping it, `promtool check rules`, every Grafana panel query answered by the real Prometheus after
# a load burst, Redis killed and back, the service's main process killed and restarted by its policy, and the
# hardening Docker applied. Tears down what it made (containers, volumes; the engine stays) and prints one line
# per check; exit 0 only if every check passed.
#
#   bash scripts/compose_check.sh            # needs root; starts dockerd if none answers; 15-30 min the first time
#
# Public images (python, redis, prometheus) are replaced by stand-ins built from Debian packages when the registry
# cannot be reached (RBR_STAND_INS=1 forces them, 0 forbids them). This machine's pip settings (index, find-links,
# CA) reach the image build as build arguments, never its environment. Grafana itself has no Debian package, so
# its server does not run here: its dashboard's queries are checked against Prometheus instead.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK_NAME=compose-check
# shellcheck source=scripts/docker_lib.sh
source scripts/docker_lib.sh

ensure_docker_engine
STAND_INS=${RBR_STAND_INS:-auto}
if [ "$STAND_INS" = auto ]; then
  STAND_INS=0
  for image in python:3.11-slim-bookworm redis:7.4-alpine prom/prometheus:v2.55.1; do
    docker image inspect "$image" >/dev/null 2>&1 || docker pull -q "$image" >/dev/null 2>&1 || STAND_INS=1
  done
fi
args=()
if [ "$STAND_INS" = 1 ]; then
  say "public images unreachable: using Debian stand-ins"
  build_stand_ins
  args+=(--stand-ins)
fi
settings=$(mktemp)
pip_settings >"$settings"
ca=$(mktemp)
trap 'rm -f "$settings" "$ca"' EXIT
pip_ca_pem >"$ca"
# Debian's python3: PyYAML comes with docker-compose.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
"$PY" scripts/compose_check.py --pip-settings "$settings" --ca-pem "$ca" "${args[@]}" "$@"
