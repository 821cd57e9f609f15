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
        model = load_reward_model(settings.policy_path, settings.weights_path)
        check_heads(settings.stack(), model.policy)
    except (HeadsError, PolicyError, WeightsError, models.ModelError) as exc:
        raise fail(str(exc)) from None

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("service.app:create_app", factory=True, host=settings.host, port=settings.port, workers=workers,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=30)
