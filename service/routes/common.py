"""What the reward routes share: readiness, input limits, and running work under a deadline and disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from rbr_model.policy import Policy
from service.errors import ClientGone, DeadlineExceeded, InvalidRequest, PayloadTooLarge
from service.protocol import ErrorResponse
from service.scoring import ServingState
from service.state import app_state, not_serving

T = TypeVar("T")


def serving_state(request: Request) -> ServingState:
    """The state to score against, or the 503 that says why there is none yet."""
    state = app_state(request.app)
    problem = not_serving(state)
    if problem is not None:
        raise problem
    assert state.serving is not None  # not_serving checked it
    return state.serving


REWARD_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 413, 422, 429, 503, 504)}


def response_type(policy: Policy, value: str | None, field: str) -> str | None:
    """The policy key for a request's response type (None: RM only), or the 422 that names the field."""
    try:
        return policy.resolve_response_type(value)
    except KeyError:
        raise InvalidRequest(f"{field}: {quote(value)} is not a response type of policy {policy.name} "
                             f"({', '.join(policy.classes)}, or null)", field=field) from None


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
    state = app_state(request.app)
    metrics, timeout = state.metrics, state.settings.request_timeout_s
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
