#!/bin/sh
# One entrypoint for the CPU and GPU images.
#   (no arguments)        -> rbr serve
#   an rbr subcommand     -> rbr <subcommand> ...       e.g. `docker run IMAGE model prepare`
#   healthcheck [path]    -> exit 0 when GET http://127.0.0.1:$RBR_PORT<path> answers 2xx (default /readyz)
#   anything else         -> run it as given              e.g. `docker run IMAGE bash`
set -eu

# Inside a container the service must listen on every interface, not loopback.
export RBR_HOST="${RBR_HOST:-0.0.0.0}"
export RBR_PORT="${RBR_PORT:-8000}"

if [ "$#" -eq 0 ]; then
  set -- serve
fi

case "$1" in
  healthcheck)
    path="${2:-/readyz}"
    exec python3 - "$path" <<'PY'
import os
import sys
import urllib.request

url = "http://127.0.0.1:%s%s" % (os.environ.get("RBR_PORT", "8000"), sys.argv[1])
try:
    with urllib.request.urlopen(url, timeout=5) as resp:
        sys.exit(0 if 200 <= resp.status < 300 else 1)
except Exception as exc:  # connection refused, 503 while warming up, timeout
    print(f"healthcheck {url}: {exc}", file=sys.stderr)
    sys.exit(1)
PY
    ;;
  serve | model | policy | fit | synth | eval | report | --help | -h)
    exec rbr "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
