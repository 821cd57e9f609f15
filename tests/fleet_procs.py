"""Real processes of the scale-out topology for tests and benchmarks/fleet.py: `rbr serve` replicas on loopback,
each in its own session so that a test can signal it alone (SIGKILL, as a crash) or with everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from redis_server import free_port

RBR = Path(sys.executable).with_name("rbr")


class ServeReplica:
    """One `rbr serve` process with `env` on top of this process's environment; its log in `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None):
        self.env, self.log_path = dict(env), log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> ServeReplica:
        env = os.environ | self.env | {"RBR_HOST": "127.0.0.1", "RBR_PORT": str(self.port)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(RBR), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 600) -> None:
        """Until `/readyz` answers 200; RuntimeError (with the log's tail) if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"rbr serve on {self.url} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise RuntimeError(f"rbr serve on {self.url} not ready after {timeout:.0f} s (last /readyz: {last}):\n"
                           f"{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL to the replica's own process only (a crash, an OOM kill): what it started is left to itself."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM (a graceful stop), SIGKILL after `grace_s`; then SIGKILL to whatever of its session is left."""
        if self.proc is None:
            return
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def metric_value(base_url: str, name: str, **labels: str) -> float:
    """A sample of a replica's `/metrics` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
