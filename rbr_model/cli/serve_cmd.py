"""`rbr serve`: start the reward service (needs the `service` extra). Settings come from RBR_* variables."""

from __future__ import annotations

from typing import Annotated

import typer

from rbr_model.cli.common import fail


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (RBR_HOST; default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (RBR_PORT; default 8000).")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn workers; each loads its own engine, keep 1 per GPU.")] = 1,
) -> None:
    """Start rbr-serve with uvicorn. Every setting is an RBR_* environment variable: see `service/settings.py`."""
    try:
        import uvicorn

        from service.settings import Settings
    except ModuleNotFoundError as exc:
        raise fail(f"the service is not installed ({exc.name} missing): pip install 'rbr-serve[service]'") from None
    import logging
    import os

    for name, value in (("RBR_HOST", host), ("RBR_PORT", port)):
        if value is not None:
            os.environ[name] = str(value)  # the app factory reads the same settings in every worker
    settings = Settings()

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("service.app:create_app", factory=True, host=settings.host, port=settings.port, workers=workers,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=30)
