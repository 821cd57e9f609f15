"""A replica killed with SIGKILL leaves no vLLM engine behind (issue #22 item 6): a real `rbr serve` with its
in-process grader engine, killed alone (not its process group, as the OOM killer or `kill -9 <pid>` would)."""

from __future__ import annotations

import contextlib
import time

import psutil
from fleet_procs import ServeReplica

DEADLINE_S = 180  # generous: what is asserted is that they go, not how fast


def test_engine_processes_go_when_rbr_serve_is_killed(tmp_path):
    replica = ServeReplica({"RBR_ENGINE": "vllm", "RBR_HEADS": "none", "RBR_LOG_LEVEL": "warning"},
                           tmp_path / "rbr-serve.log")
    engines: list[psutil.Process] = []
    try:
        replica.wait_ready()
        engines = psutil.Process(replica.proc.pid).children(recursive=True)
        names = [p.name() for p in engines]
        assert any("EngineCore" in n for n in names), names  # the engine core runs in its own process
        replica.kill()
        deadline = time.monotonic() + DEADLINE_S
        alive = engines
        while alive and time.monotonic() < deadline:
            _, alive = psutil.wait_procs(alive, timeout=1)
        assert not alive, (f"still running {DEADLINE_S} s after rbr serve was killed: "
                           f"{[(p.pid, p.name()) for p in alive]}\n{replica.tail()}")
    finally:
        replica.stop()
        for p in engines:  # never leave a 3 GB engine behind, whatever the outcome
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_the_launcher_refuses_a_child_whose_parent_is_gone(monkeypatch):
    """A child spawned after rbr serve died would have no one to signal it: the launcher does not start it."""
    import subprocess

    from service.cli import engines_die_with_this_process

    monkeypatch.setattr("multiprocessing.set_executable", lambda path: None)  # leave this test process as it is
    monkeypatch.setenv("RBR_SERVE_PID", "")  # restored after the test (the function sets it)
    path = engines_die_with_this_process()
    assert path is not None
    ok = subprocess.run([path, "-c", "print('started')"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "started"
    monkeypatch.setenv("RBR_SERVE_PID", "1")  # not this process: as if the child's parent were another
    refused = subprocess.run([path, "-c", "print('started')"], capture_output=True, text=True)
    assert refused.returncode != 0 and "started" not in refused.stdout and "rbr serve is gone" in refused.stderr


def test_launcher_folders_of_dead_replicas_are_removed(tmp_path):
    """A SIGKILLed rbr serve skips its atexit; the next one removes the folder it left, and only such folders."""
    import os
    import subprocess
    import sys

    from service.cli import _remove_stale_launchers

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, live, other = tmp_path / f"rbr-serve-{gone.pid}-abc_1", tmp_path / f"rbr-serve-{os.getpid()}-x", \
        tmp_path / "rbr-serve-notapid-x"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "engine-launcher").write_text("#!/bin/sh\n")
    _remove_stale_launchers(str(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()
