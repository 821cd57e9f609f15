"""`rbr serve`: start the reward service. Settings come from RBR_* variables.

The command plugs into the `rbr` CLI through the `rbr.commands` entry point (pyproject.toml), so `rbr_model`
never imports the service.
"""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from rbr_model.cli.common import fail
from service.settings import Settings


def settings_problems(exc: ValidationError) -> str:
    """One line per problem, named by the environment variable that sets it."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"RBR_{field.upper()}: {message}" if field else message)
    return "; ".join(lines)


# vLLM starts each engine core with multiprocessing's spawn; this launcher runs first in that child: it asks the
# kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG survives exec), then execs the real interpreter with
# the same arguments. SIGKILL, not SIGTERM: with its client gone an engine core has nothing to finish, and a
# graceful shutdown could hang; vLLM's workers follow their engine core through its death pipe. The resource
# tracker is left alone: it exits once the last process using it is gone, unlinking the shared memory they
# leaked. A child whose parent is already gone (rbr serve died before the prctl) exits instead.
_LAUNCHER = """#!{python} -S
import ctypes, os, signal, sys
if "resource_tracker" not in " ".join(sys.argv[1:]):
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        sys.exit("prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if str(os.getppid()) != os.environ.get("RBR_SERVE_PID"):
    sys.exit("rbr serve is gone: not starting")
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""


def engines_die_with_this_process() -> str | None:
    """Make the processes this one spawns (vLLM's engine cores; their workers already follow the engine core
    through vLLM's death pipe) get SIGKILL when this process dies, even by SIGKILL, so that a killed replica
    leaves no engine behind: outside a container nothing else reaps them. Linux only.

    The kernel ties the signal to the thread that started the child: the engines start in the event loop's
    default executor, whose threads live as long as the loop. Returns the launcher's path, or None (with a
    warning) where it cannot work: another OS, no writable temporary folder, or one mounted noexec. With
    `--workers` above 1 the engines are the uvicorn workers' children, which this does not reach.
    """
    import atexit
    import logging
    import multiprocessing
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    if not sys.platform.startswith("linux"):
        return None
    log = logging.getLogger("rbr.serve")
    os.environ["RBR_SERVE_PID"] = str(os.getpid())
    try:
        _remove_stale_launchers(tempfile.gettempdir())
        folder = tempfile.mkdtemp(prefix=f"rbr-serve-{os.getpid()}-")
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, "engine-launcher")
        with open(path, "w") as fh:
            fh.write(_LAUNCHER.format(python=sys.executable))
        os.chmod(path, 0o700)
        check = subprocess.run([path, "-c", "pass"], capture_output=True, timeout=60)
        if check.returncode != 0:
            raise OSError(check.stderr.decode(errors="replace").strip()[-300:])
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("no engine launcher (%s): outside a container, a killed rbr serve would leave its engine "
                    "processes running", exc)
        return None
    multiprocessing.set_executable(path)
    return path


def _remove_stale_launchers(tmp: str) -> None:
    """Remove the launcher folders of rbr serve processes that are gone (a SIGKILL skips their atexit)."""
    import os
    import re
    import shutil

    for entry in os.scandir(tmp):
        match = re.fullmatch(r"rbr-serve-(\d+)-\w+", entry.name)
        if not match or not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass  # alive under another user, or not ours to ask about


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (RBR_HOST; default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (RBR_PORT; default 8000).")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn workers; each loads its own engine, keep 1 per GPU.")] = 1,
) -> None:
    """Start rbr-serve with uvicorn. Every setting is an RBR_* environment variable: see `service/settings.py`."""
    import logging
    import os

    import uvicorn

    for name, value in (("RBR_HOST", host), ("RBR_PORT", port)):
        if value is not None:
            os.environ[name] = str(value)  # the app factory reads the same settings in every worker
    try:
        settings = Settings()
    except ValidationError as exc:
        raise fail(f"invalid settings: {settings_problems(exc)}") from None

    # Policy, weights, heads and their trunk are checked here too, so a bad file is one line naming it, not a
    # traceback or a 503 later.
    from rbr_model import models
    from rbr_model.heads import HeadsError
    from rbr_model.policy import PolicyError
    from rbr_model.reward import WeightsError
    from rbr_model.stack import check_heads
    from service.state import load_reward_model

    try:
        model = load_reward_model(settings.policy_path, settings.weights_file())
        check_heads(settings.stack(), model.policy)
    except (HeadsError, PolicyError, WeightsError, models.ModelError) as exc:
        raise fail(str(exc)) from None

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "vllm" in (settings.engine, settings.rm_engine):  # engines in child processes of this one
        engines_die_with_this_process()
    uvicorn.run("service.app:create_app", factory=True, host=settings.host, port=settings.port, workers=workers,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=30)
