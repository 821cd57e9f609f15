"""The CPU image alone, run the way issue #20 and docker/README.md say, checked; run by scripts/image_check.sh.

Builds docker/Dockerfile.cpu (pip's settings as build arguments, the local wheel folders served over loopback,
Debian stand-in base where the registry is out of reach), then starts it exactly as
`docker run --network host --read-only --tmpfs /tmp --cap-drop ALL` on a free port: no `--shm-size`, so the
container has Docker's 64 MiB /dev/shm (`--shm-size 2g` with `--shm-size`). Checks: /readyz 200 within the limit,
the README's request 200 with features, the hardening Docker applied (uid, read-only root, no capabilities), and
which shared-memory queues vLLM was given. Removes its container; prints one line per check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compose_check import (  # noqa: E402  (a sibling script, not a package)
    ROOT,
    Check,
    WheelServers,
    build_args,
    free_port,
    http,
    inspect,
    process_uids,
    readme_request,
    sh,
)

IMAGE = "rbr-serve:cpu"
SMALL_SHM_LOG = "less than vLLM's default queues need"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pip-settings", type=Path, required=True, help="KEY=value lines (docker_lib.sh pip_settings)")
    ap.add_argument("--ca-pem", type=Path, help="CA certificates (PEM) the build trusts (docker_lib.sh pip_ca_pem)")
    ap.add_argument("--stand-ins", action="store_true", help="build on the Debian stand-in of the Python base")
    ap.add_argument("--shm-size", help="pass --shm-size (e.g. 2g) instead of Docker's 64 MiB default")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds /readyz may take (the issue: 10 min)")
    ap.add_argument("--no-build", action="store_true", help=f"run the {IMAGE} image already built")
    ap.add_argument("--json", type=Path, help="write the check lines here as JSON")
    opts = ap.parse_args(argv)

    checks = Check("image-check")
    pip = dict(line.split("=", 1) for line in opts.pip_settings.read_text().splitlines() if "=" in line)
    if not opts.no_build:
        folders = [f for f in pip.get("PIP_FIND_LINKS", "").split() if f.startswith("/") and os.path.isdir(f)]
        wheels = WheelServers(folders)
        args = build_args(pip, wheels.urls, opts.ca_pem.read_text() if opts.ca_pem else "")
        if opts.stand_ins:
            args["PYTHON_IMAGE"] = "rbr-stand-in/python:3.11-slim-bookworm"
        t = time.monotonic()
        try:
            build = sh("docker", "build", "--network", "host", "-f", "docker/Dockerfile.cpu", "-t", IMAGE,
                       *[a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")], str(ROOT),
                       check=False, capture=False, timeout=3600)
        finally:
            wheels.stop()
        if not checks.record("build", build.returncode == 0, f"docker build exit {build.returncode}", t):
            return 1

    port = free_port()
    name = f"rbr-image-check-{os.getpid()}"
    run = ["docker", "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
           "--cap-drop", "ALL", *(["--shm-size", opts.shm_size] if opts.shm_size else []),
           "-e", "RBR_HOST=127.0.0.1", "-e", f"RBR_PORT={port}", IMAGE]
    print("[image-check] " + " ".join(run), flush=True)
    api = f"http://127.0.0.1:{port}"
    try:
        t = time.monotonic()
        started = sh(*run, check=False)
        if not checks.record("run", started.returncode == 0, started.stderr.strip()[-300:] or "started", t):
            return 1
        t = time.monotonic()
        code: int = 0
        while time.monotonic() - t < opts.ready_timeout:
            code, _ = http("GET", f"{api}/readyz", timeout=5)
            if code == 200 or inspect(name, "{{.State.Running}}") != "true":
                break
            time.sleep(3)
        if not checks.record("readyz", code == 200, f"/readyz {code} after {time.monotonic() - t:.0f} s", t):
            print(sh("docker", "logs", "--tail", "60", name, check=False).stderr[-6000:])
            return 1

        t = time.monotonic()
        checks.record("README request", *readme_request(api), t)

        t = time.monotonic()
        user, ro = inspect(name, "{{.Config.User}}"), inspect(name, "{{.HostConfig.ReadonlyRootfs}}")
        caps = inspect(name, "{{json .HostConfig.CapDrop}}")
        uids = process_uids(name)
        checks.record("hardening", user == "10001" and ro == "true" and "ALL" in caps and uids == {"10001"},
                      f"user {user}, process uids {sorted(uids)}, read-only root {ro}, cap_drop {caps}", t)

        t = time.monotonic()
        shm = sh("docker", "exec", name, "df", "-m", "/dev/shm", check=False).stdout.split()
        logs = sh("docker", "logs", name, check=False)
        shrunk = SMALL_SHM_LOG in logs.stdout + logs.stderr
        checks.record("shared memory", True, f"/dev/shm {shm[8] if len(shm) > 8 else '?'} MiB; vLLM queues "
                      + ("shrunk to fit (1 MiB chunks)" if shrunk else "at their defaults"), t)
    finally:
        sh("docker", "rm", "-f", name, check=False)
    print(f"\nimage check ({sh('git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD', check=False).stdout.strip()}"
          f", {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}):\n{checks.summary()}")
    if opts.json:
        opts.json.write_text(json.dumps([{"check": n, "ok": ok, "detail": d, "seconds": round(s, 1)}
                                         for n, ok, d, s in checks.lines], indent=2))
    return 0 if checks.lines and all(ok for _, ok, _, _ in checks.lines) else 1


if __name__ == "__main__":
    sys.exit(main())
