#!/usr/bin/env bash
# The GPU image, checked as far as a machine without a GPU can: it builds (from a stand-in of the official
# vllm/vllm-openai base where no registry answers: Debian's Python 3.11 with PyPI's vllm wheel and its CUDA torch,
# as the official image has them), its entrypoint starts, the service's settings validate in its environment,
# it runs as uid 10001 with a health check, and `rbr serve` without a GPU fails with a message, not a hang.
# Needs root and a Docker engine (started if none runs); downloads about 4 GB (vllm, CUDA torch) the first time.
#
#   bash scripts/gpu_image_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK_NAME=gpu-image-check
# shellcheck source=scripts/docker_lib.sh
source scripts/docker_lib.sh

VLLM_VERSION=${VLLM_VERSION:-0.32.0}
BASE=vllm/vllm-openai:v$VLLM_VERSION
RESULTS=()
record() { RESULTS+=("$(printf '%-4s %-26s %s' "$2" "$1" "$3")"); say "$2 $1: $3"; }

ensure_docker_engine
build_args=()
while IFS= read -r kv; do
  case "$kv" in
    PIP_CERT=*) build_args+=(--build-arg "PIP_CA_PEM=$(pip_ca_pem)") ;;
    PIP_FIND_LINKS=*) ;;  # local folders cannot reach a build; the GPU image takes everything from the index
    *) build_args+=(--build-arg "$kv") ;;
  esac
done < <(pip_settings)

if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! docker pull -q "$BASE" >/dev/null 2>&1; then
  BASE=$STAND_IN_PREFIX/vllm-openai:v$VLLM_VERSION
  if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    build_stand_in python:3.11-slim-bookworm python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]'
    say "building stand-in $BASE (PyPI's vllm==$VLLM_VERSION and its CUDA torch on Debian's Python)"
    t=$SECONDS
    docker build --network host -t "$BASE" "${build_args[@]}" -f - docker <<DOCKERFILE
FROM $STAND_IN_PREFIX/python:3.11-slim-bookworm
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CA_PEM
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1
COPY with-build-ca.sh /usr/local/bin/with-build-ca
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/* \
 && with-build-ca python3 -m pip install "vllm==$VLLM_VERSION"
ENTRYPOINT ["vllm", "serve"]
DOCKERFILE
    record "stand-in base" ok "$BASE built in $((SECONDS - t)) s"
  fi
fi

t=$SECONDS
if docker build --network host -f docker/Dockerfile.gpu -t rbr-serve:gpu-check --build-arg "VLLM_IMAGE=$BASE" \
    "${build_args[@]}" . >/tmp/rbr-gpu-image-build.log 2>&1; then
  record "build" ok "Dockerfile.gpu on $BASE in $((SECONDS - t)) s"
else
  tail -30 /tmp/rbr-gpu-image-build.log >&2
  record "build" FAIL "see /tmp/rbr-gpu-image-build.log"
fi

if [ "${#RESULTS[@]}" -gt 0 ] && ! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'; then
  out=$(docker run --rm --network host rbr-serve:gpu-check --help 2>&1 || true)
  if grep -q "serve" <<<"$out"; then record "entrypoint" ok "rbr --help answers"; else record "entrypoint" FAIL "${out:0:300}"; fi
  out=$(docker run --rm --network host rbr-serve:gpu-check python3 -c \
    'from service.settings import Settings; s = Settings(); print(s.engine, s.host, s.port)' 2>&1 || true)
  out=${out##*$'\n'}
  if [ "$out" = "vllm 0.0.0.0 8000" ]; then record "settings" ok "$out"; else record "settings" FAIL "$out"; fi
  user=$(docker inspect -f '{{.Config.User}} {{if .Config.Healthcheck}}healthcheck{{end}}' rbr-serve:gpu-check)
  if [ "$user" = "10001 healthcheck" ]; then record "user, health" ok "$user"; else record "user, health" FAIL "$user"; fi
  # No GPU here: the service must say so through its probes (liveness 503 with the reason), not hang or serve.
  port=$(free_port)
  t=$SECONDS
  docker run -d --name rbr-gpu-image-check --network host --shm-size 2g --read-only --tmpfs /tmp --cap-drop ALL \
    -e RBR_HOST=127.0.0.1 -e "RBR_PORT=$port" rbr-serve:gpu-check >/dev/null
  health=""
  for _ in $(seq 1 60); do
    health=$(curl -s -w ' %{http_code}' "http://127.0.0.1:$port/healthz" || true)
    case "$health" in *' 503') break ;; esac
    [ "$(docker inspect -f '{{.State.Running}}' rbr-gpu-image-check)" = true ] || break
    sleep 5
  done
  running=$(docker inspect -f '{{.State.Running}} exit {{.State.ExitCode}}' rbr-gpu-image-check)
  docker logs rbr-gpu-image-check >/tmp/rbr-gpu-image-serve.log 2>&1 || true
  docker rm -f rbr-gpu-image-check >/dev/null
  case "$health" in
    *' 503') record "serve without a GPU" ok "/healthz 503 after $((SECONDS - t)) s: ${health:0:240}" ;;
    *) record "serve without a GPU" FAIL "no 503 from /healthz (last '${health:0:200}', container $running; log /tmp/rbr-gpu-image-serve.log)" ;;
  esac
fi

echo
echo "GPU image check ($(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%MZ)):"
printf '  %s\n' "${RESULTS[@]}"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
