"""What the reward routes share: readiness, input limits, and running work under a deadline and disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from service.errors import ApiError, DeadlineExceeded, EngineUnavailable, InvalidRequest, NotReady, PayloadTooLarge
from service.scoring import ServingState

T = TypeVar("T")


class ClientGone(ApiError):
    status, type = 499, "client_closed_request"


def serving_state(request: Request) -> ServingState:
    app = request.app
    if app.state.engine_error:
        raise EngineUnavailable(f"grader engine unavailable: {app.state.engine_error}")
    if not app.state.ready or app.state.serving is None:
        raise NotReady("the grader engine is still starting; retry shortly", headers={"Retry-After": "5"})
    return app.state.serving


def check_text(value: str, field: str, limit: int) -> None:
    if len(value) > limit:
        raise PayloadTooLarge(f"{field}: {len(value)} characters exceeds RBR_MAX_CHARS={limit}", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in the JSON): no tokenizer can take it
        raise InvalidRequest(f"{field}: not valid Unicode (lone surrogate at character {exc.start})",
                             field=field) from None


def quote(value: object, limit: int = 80) -> str:
    """An input value quoted in an error message, cut short: an error never echoes a whole payload back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def check_count(n: int, field: str, limit: int) -> None:
    if n > limit:
        raise PayloadTooLarge(f"{field}: {n} items exceeds RBR_MAX_ITEMS={limit}", field=field)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; cancel it when the client disconnects or the per-request deadline passes."""
    metrics = request.app.state.metrics
    timeout = request.app.state.settings.request_timeout_s
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    metrics.inflight_requests.inc()
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if watcher in done:
            raise ClientGone("client disconnected; its grading work was cancelled")
        raise DeadlineExceeded(f"request took longer than RBR_REQUEST_TIMEOUT_S={timeout}s; its work was cancelled")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        metrics.inflight_requests.dec()
