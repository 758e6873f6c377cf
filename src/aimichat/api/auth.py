"""Who is calling: the API key from ``Authorization: Bearer``, ``X-API-Key`` or ``?api_key=``."""

from __future__ import annotations

import datetime as dt

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from aimichat.keys import admin_keys, tokens
from aimichat.keys import service as keys
from aimichat.keys.service import Principal
from aimichat.store.clock import iso_utc
from aimichat.store.db import Database

from .errors import APIError, invalid_api_key


def presented_key(request: Request, allow_query: bool) -> str | None:
    """The key presented, by the spec's means: Bearer header, X-API-Key header or query string.

    Several different keys (two means, or one means twice) are refused with a 400 rather than one
    picked by an order the caller may not expect: a proxy adding its own key must not silently win.
    """
    found: list[str] = []
    for auth in request.headers.getlist("authorization"):
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found.append(value.strip())
    found += [h.strip() for h in request.headers.getlist("x-api-key") if h.strip()]
    if allow_query:
        found += [q for q in request.query_params.getlist("api_key") if q]
    if len(set(found)) > 1:
        raise APIError(
            400,
            "More than one API key was sent (Authorization, X-API-Key or ?api_key=): send exactly one.",
            code="ambiguous_api_key",
        )
    return found[0] if found else None


async def require_key(request: Request) -> Principal:
    """FastAPI dependency: a live key of an enabled account, or a 401/403 in OpenAI's shape."""
    state = request.app.state
    key = presented_key(request, state.settings.allow_query_key)
    if key and admin_keys.is_well_formed(key):
        raise await _admin_key_refused(state.database, key)
    if not key or not tokens.is_well_formed(key):  # refused before any database work
        raise invalid_api_key()

    digest = tokens.hash_key(key)
    now = state.clock()
    principal: Principal | None = await state.principals.load(
        digest, lambda: run_in_threadpool(_lookup, state.database, key, now)
    )
    if principal is None:
        raise invalid_api_key()
    if principal.grace_until is not None and now >= principal.grace_until:
        raise invalid_api_key()  # a rotated-out secret whose grace ended while it was cached
    if principal.account_disabled:
        raise APIError(403, "This account is disabled. Contact the operator of this server.", code="account_disabled")
    if keys.expired(principal, now):
        expired_at = iso_utc(principal.limits.expires_at) if principal.limits.expires_at else ""
        raise APIError(401, f"This API key expired at {expired_at}. Create a new one.", code="invalid_api_key")
    address = request.client.host if request.client else None
    if not keys.address_allowed(principal, address):
        raise APIError(
            403,
            f"This API key may not be used from {address}: it is limited to some networks.",
            code="key_scope_denied",
        )
    request.state.principal = principal
    return principal


async def _admin_key_refused(database: Database, key: str) -> APIError:
    """A live admin key is told it belongs to the admin API (403); any other admin-looking string is a 401."""

    def live() -> bool:
        with database.connect(single_statement=True) as conn:
            return admin_keys.exists(conn, key)

    if not await run_in_threadpool(live):
        return invalid_api_key()
    return APIError(
        403,
        "Admin keys cannot call the chat API: they are for /admin/v1/... Use an API key (aimichat_...) here.",
        code="admin_key_not_allowed",
    )


def _lookup(database: Database, key: str, now: dt.datetime) -> Principal | None:
    with database.connect(single_statement=True) as conn:
        return keys.authenticate(conn, key, now)


async def optional_key(request: Request) -> Principal | None:
    """FastAPI dependency: the caller's principal when a key is presented (a bad one is still a 401),
    None when none is."""
    if presented_key(request, request.app.state.settings.allow_query_key) is None:
        return None
    return await require_key(request)
