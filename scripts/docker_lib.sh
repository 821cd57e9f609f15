# shellcheck shell=bash
# What scripts/compose_check.sh and scripts/fresh_machine_check.sh share: a Docker engine that uses the host's
# network only, stand-in base images built from Debian packages where no image registry can be reached, and this
# machine's pip settings handed to containers and builds. Sourced, not run.
#
# Stand-ins (debootstrap minbase + Debian packages, then `docker import`), each tagged rbr-stand-in/<name>:
#   debian-python:3.11        a clean Debian bookworm with Python 3.11 and nothing else (the "fresh machine")
#   python:3.11-slim-bookworm the Dockerfile's base: Python 3.11 with venv and pip, `python` on PATH
#   redis:7.4                 Debian's redis-server and redis-cli
#   prometheus:v2             Debian's prometheus, entrypoint /usr/bin/prometheus like the official image
#   vllm-openai               Python 3.11 with pip: the GPU Dockerfile's base, to check that it builds and starts
# Set RBR_STAND_IN_REBUILD=1 to rebuild them; DEBIAN_MIRROR picks the mirror (default deb.debian.org).

DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAND_IN_PREFIX=rbr-stand-in

say() { printf '\033[1m[%s]\033[0m %s\n' "${CHECK_NAME:-docker}" "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

# Installs docker.io, docker-compose and debootstrap when missing (root, apt), and starts dockerd when no engine
# answers: no bridge, no iptables, so every container must use the host's network.
ensure_docker_engine() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "needs root to install ${missing[*]}"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if docker info >/dev/null 2>&1; then return 0; fi
  [ "$(id -u)" = 0 ] || die "no Docker engine answers, and starting one needs root"
  say "starting dockerd (no bridge, no iptables; log in /tmp/rbr-dockerd.log)"
  nohup dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false >/tmp/rbr-dockerd.log 2>&1 &
  local _
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  die "dockerd did not answer within 60 s (see /tmp/rbr-dockerd.log)"
}

# build_stand_in NAME PACKAGES [docker import --change ...]: a Debian minbase with PACKAGES, once.
build_stand_in() {
  local name=$1 packages=$2
  shift 2
  local tag="$STAND_IN_PREFIX/$name"
  if [ "${RBR_STAND_IN_REBUILD:-0}" != 1 ] && docker image inspect "$tag" >/dev/null 2>&1; then
    return 0
  fi
  local root
  root=$(mktemp -d /tmp/rbr-stand-in.XXXXXX)
  say "building stand-in $tag from Debian $DEBIAN_SUITE ($packages)"
  debootstrap --variant=minbase --include="$packages" "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; die "debootstrap for $tag failed"; }
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import "$@" - "$tag" >/dev/null || die "docker import $tag failed"
  rm -rf "$root" "$root.log"
}

build_stand_ins() {
  build_stand_in debian-python:3.11 python3 \
    --change 'CMD ["bash"]'
  build_stand_in python:3.11-slim-bookworm python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]'
  build_stand_in redis:7.4 redis-server \
    --change 'CMD ["redis-server"]'
  build_stand_in prometheus:v2 prometheus,ca-certificates \
    --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
    --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    --change 'WORKDIR /prometheus'
}

# A TCP port nobody listens on now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# This machine's pip settings (index, extra index, find-links, CA), as `KEY=value` lines: what a build or a
# container needs to install the same packages (users behind a private mirror, or this machine's wheel folder).
# Local folder indexes (file://) are left out.
pip_settings() {
  local py=${PYTHON:-python3}
  "$py" - <<'PY'
import os, subprocess
keys = {"index-url": "PIP_INDEX_URL", "extra-index-url": "PIP_EXTRA_INDEX_URL", "find-links": "PIP_FIND_LINKS",
        "cert": "PIP_CERT", "trusted-host": "PIP_TRUSTED_HOST", "default-timeout": "PIP_DEFAULT_TIMEOUT"}
found = {}
try:
    out = subprocess.run(["pip", "config", "list"], capture_output=True, text=True).stdout
except OSError:
    out = ""
for line in out.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in keys:
        found[keys[name]] = value.strip().strip("'\"")
for env in keys.values():
    if os.environ.get(env):
        found[env] = os.environ[env]
# Indexes that are folders of this machine (file://) point at files elsewhere on its disk: a container does not
# get them, and reaches the same packages through the network indexes.
for env in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
    if env in found:
        kept = [u for u in found[env].split() if not u.startswith("file:")]
        found[env] = " ".join(kept)
for env, value in found.items():
    if value:
        print(f"{env}={value}")
PY
}

# Local paths that pip_settings names (find-links folders, file:// indexes, the CA file): to bind-mount read-only.
pip_local_paths() {
  pip_settings | while IFS='=' read -r _ value; do
    for item in $value; do
      item=${item#file://}
      case "$item" in /*) [ -e "$item" ] && echo "$item" ;; esac
    done
  done | sort -u
}

# The CA certificates a build must trust, as PEM text for the PIP_CA_PEM build argument: pip's CA file when small,
# else Debian's local additions (/usr/local/share/ca-certificates, which update-ca-certificates appends to the
# system bundle): a build argument must stay under the kernel's 128 KiB limit for one argument.
pip_ca_pem() {
  local cert
  cert=$(pip_settings | sed -n 's/^PIP_CERT=//p')
  [ -n "$cert" ] && [ -f "$cert" ] || return 0
  if [ "$(stat -c %s "$cert")" -lt 64000 ]; then
    cat "$cert"
  else
    find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | sort | xargs -r cat
  fi
}
