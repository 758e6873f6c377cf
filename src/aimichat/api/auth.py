"""Who is calling: the API key from ``Authorization: Bearer``, ``X-API-Key`` or ``?api_key=``."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from aimichat.keys import service as keys
from aimichat.keys import tokens
from aimichat.keys.service import Principal
from aimichat.store.db import Database

from .errors import APIError, invalid_api_key


def presented_key(request: Request, allow_query: bool) -> str | None:
    """The first key present, in the spec's order: Bearer header, X-API-Key header, query string."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    header = request.headers.get("x-api-key")
    if header:
        return header.strip()
    if allow_query:
        return request.query_params.get("api_key") or None
    return None


async def require_key(request: Request) -> Principal:
    """FastAPI dependency: a live key of an enabled account, or a 401/403 in OpenAI's shape."""
    state = request.app.state
    key = presented_key(request, state.settings.allow_query_key)
    if not key or not tokens.is_well_formed(key):  # refused before any database work
        raise invalid_api_key()

    digest = tokens.hash_key(key)
    principal: Principal | None = state.principals.get(digest)
    if principal is None:
        generation = state.principals.generation  # a revocation committed during the lookup wins
        principal = await run_in_threadpool(_lookup, state.database, key)
        if principal is None:
            raise invalid_api_key()
        state.principals.put(digest, principal, generation)
    if principal.account_disabled:
        raise APIError(403, "This account is disabled. Contact the operator of this server.", code="account_disabled")
    request.state.principal = principal
    return principal


def _lookup(database: Database, key: str) -> Principal | None:
    with database.connect(single_statement=True) as conn:
        return keys.authenticate(conn, key)


async def optional_key(request: Request) -> Principal | None:
    """FastAPI dependency: the caller's principal when a key is presented (a bad one is still a 401),
    None when none is."""
    if presented_key(request, request.app.state.settings.allow_query_key) is None:
        return None
    return await require_key(request)
