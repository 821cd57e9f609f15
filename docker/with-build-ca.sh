#!/bin/sh
# Build-time only: runs a command (pip) trusting the extra CA certificates given in the build argument PIP_CA_PEM
# (a private mirror's or a TLS-inspecting proxy's), appended to the system bundle in a temporary file that is gone
# when the command ends. Without PIP_CA_PEM it just runs the command.
set -eu
if [ -z "${PIP_CA_PEM:-}" ]; then
  exec "$@"
fi
bundle=$(mktemp)
trap 'rm -f "$bundle"' EXIT
cat /etc/ssl/certs/ca-certificates.crt >"$bundle" 2>/dev/null || true
printf '%s\n' "$PIP_CA_PEM" >>"$bundle"
PIP_CERT=$bundle "$@"
