"""One error shape for every failure: `{"error": {"type", "message", "field"}}`, and one table to status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("rbr.errors")


class ApiError(Exception):
    """An error the caller should see. Subclasses fix the type and status; `field` names the culprit."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.field, self.headers = message, field, headers or {}


class InvalidRequest(ApiError):
    status, type = 422, "invalid_request"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"


class Forbidden(ApiError):
    status, type = 403, "forbidden"


class Overloaded(ApiError):
    status, type = 429, "overloaded"


class NotReady(ApiError):
    status, type = 503, "not_ready"


class EngineUnavailable(ApiError):
    status, type = 503, "engine_unavailable"


class ClientGone(ApiError):
    """The client disconnected; nginx's 499, seen only in logs and metrics (nobody reads the answer)."""

    status, type = 499, "client_closed_request"


class DeadlineExceeded(ApiError):
    status, type = 504, "deadline_exceeded"


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc_to_field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Map every exception type to the one JSON shape; `on_error(type)` counts them."""

    def count(type_: str) -> None:
        if on_error is not None:
            on_error(type_)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        count(exc.type)
        return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        count("invalid_request")
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _loc_to_field(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            field, msg = "body", f"body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        else:
            msg = f"{field}: {first['msg']}"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(422, "invalid_request", msg, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, (ValueError, RecursionError)):
            # FastAPI's generic "error parsing the body": invalid UTF-8, nesting too deep, an integer too long.
            count("invalid_request")
            return error_response(422, "invalid_request",
                                  f"body is not valid JSON: {type(cause).__name__}: {str(cause)[:200]}", "body")
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        count(type_)
        return error_response(exc.status_code, type_, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        count("internal_error")
        log.exception("unhandled error: %s", type(exc).__name__)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")
