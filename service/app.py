"""The app factory: one typed state (`service.state.AppState`), error handlers, the observing middleware, the
routes. What the service builds on start and shuts down on exit lives in `service.state`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from rbr_model.grading.engine import Engine
from service.errors import error_response, install_error_handlers
from service.metrics import Metrics
from service.routes import admin, health, openrlhf, rewards
from service.settings import Settings
from service.state import AppState, app_state, running

if TYPE_CHECKING:
    from rbr_model.grading.states import StateEngine
    from rbr_model.rm import RMEngine


class ObserveMiddleware:
    """Per-route request counts and latency, and the body-size bound before anything parses the body.

    Plain ASGI (not BaseHTTPMiddleware) so client disconnects still reach the route.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = app_state(scope["app"])
        metrics: Metrics = state.metrics
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        limit = state.settings.max_body_bytes
        too_large = length.isdigit() and int(length) > limit
        if not length and b"chunked" in headers.get(b"transfer-encoding", b""):
            # No declared length: read the body here, at most `limit` bytes, then replay it to the app.
            receive, too_large = await _bounded_body(receive, limit)
        if too_large:
            metrics.errors.labels("payload_too_large").inc()
            size = f"body of {int(length)} bytes" if length.isdigit() else "chunked body"
            response = error_response(413, "payload_too_large", f"{size} exceeds RBR_MAX_BODY_BYTES={limit}", "body")
            await response(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            if route != "/metrics":
                metrics.requests.labels(route, str(status)).inc()
                metrics.request_duration.labels(route).observe(time.perf_counter() - start)


async def _bounded_body(receive: Any, limit: int) -> tuple[Any, bool]:
    """Buffer a request body of unknown length up to `limit` bytes: (a receive that replays it, too large?)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if size > limit:
            return receive, True
        if not message.get("more_body", False):
            break

    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return replay, False


def create_app(settings: Settings | None = None, engine: Engine | None = None, rm_engine: RMEngine | None = None,
               state_engine: StateEngine | None = None) -> FastAPI:
    """Build the app. Pass `engine` (and `state_engine`, the heads' trunk; `rm_engine`) to share already-started
    engines (tests, embedding): the app then never closes them."""
    settings = settings or Settings()
    state = AppState.create(settings, Metrics())
    app = FastAPI(
        title="rbr-serve",
        version="0.1.0",
        description="Rule Based Rewards for RL fine-tuning: proposition grading through vLLM, cached features, "
        "combined RBR + RM rewards.",
        lifespan=lambda app: running(app, engine, rm_engine, state_engine),
    )
    app.state.rbr = state
    install_error_handlers(app, on_error=lambda t: state.metrics.errors.labels(t).inc())
    app.add_middleware(ObserveMiddleware)
    for module in (rewards, openrlhf, admin, health):
        app.include_router(module.router)
    return app
