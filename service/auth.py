"""Bearer-key checks: reward keys for reward routes, a separate admin key; constant-time comparison."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from service.errors import Forbidden, Unauthorized
from service.state import app_state


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _matches(token: str, keys: list[str]) -> bool:
    # Compare against every key, never stopping early, so timing says nothing about which one was close; compare
    # fixed-length digests, so it says nothing about a key's length either (compare_digest returns early on that).
    found = False
    digest = _digest(token)
    for key in keys:
        found |= hmac.compare_digest(digest, _digest(key))
    return found


def require_reward_key(request: Request) -> None:
    keys = app_state(request.app).reward_keys
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing Bearer API key", field="authorization", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, keys):
        raise Forbidden("API key not accepted", field="authorization")


def require_admin_key(request: Request) -> None:
    admin = app_state(request.app).admin_key
    if not admin:
        raise Forbidden("admin routes are disabled: set RBR_ADMIN_KEY", field="authorization")
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing Bearer admin key", field="authorization", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, [admin]):
        raise Forbidden("admin key required (reward keys are not accepted here)", field="authorization")
