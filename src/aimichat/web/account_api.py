"""The JSON account API for the signed-in browser: keys and usage.

Session-authenticated, with the pages' CSRF rule (``X-CSRF-Token`` on every POST). An API key is
refused here with 403 ``mode_not_allowed``: a leaked key must not be able to mint more keys.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.api.errors import APIError
from aimichat.api.usage import usage_body
from aimichat.keys import service as keys
from aimichat.quota import ledger, periods
from aimichat.store.clock import iso_utc
from aimichat.store.models import ApiKey

from . import usage_data
from .deps import ApiUser, ApiWrite, RequestSession
from .render import WebRoute

router = APIRouter(prefix="/api/account", route_class=WebRoute, tags=["account"])
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def key_json(key: ApiKey, secret: str | None = None) -> dict[str, Any]:
    """A key as the account API shows it; ``secret`` only in the answer that creates the key."""
    body: dict[str, Any] = {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "created": iso_utc(key.created_at),
        "last_used": iso_utc(key.last_used_at) if key.last_used_at else None,
        "revoked": iso_utc(key.revoked_at) if key.revoked_at else None,
        "status": keys.key_status(key),
    }
    if secret:
        body["key"] = secret
    return body


def _unknown(key_id: int) -> APIError:
    return APIError(404, f"No API key with id {key_id} in your account.", code="key_not_found", param="id")


@router.get("/keys")
def list_keys(session: RequestSession, visitor: ApiUser) -> dict[str, Any]:
    return {"object": "list", "data": [key_json(k) for k in keys.list_keys(session, visitor.user.id)]}


@router.post("/keys", status_code=201)
async def create_key(request: Request, session: RequestSession, visitor: ApiWrite) -> JSONResponse:
    try:
        name = (await request.json()).get("name")
    except (ValueError, AttributeError):
        name = None
    if not isinstance(name, str):
        raise APIError(400, 'Send JSON with a key name: {"name": "laptop"}.', param="name")

    def work() -> dict[str, Any]:
        created = keys.create_key(session, visitor.user, name)
        return key_json(created.key, created.secret)

    try:
        return JSONResponse(await run_in_threadpool(work), status_code=201)
    except ValueError as exc:
        raise APIError(400, f"Invalid key name: {exc}.", param="name") from None


@router.post("/keys/{key_id}/revoke")
def revoke_key(session: RequestSession, key_id: KeyId, visitor: ApiWrite) -> dict[str, Any]:
    try:
        key = keys.revoke_key(session, key_id, visitor.user.id)
    except keys.UnknownKey:
        raise _unknown(key_id) from None
    return key_json(key)


@router.post("/keys/{key_id}/regenerate", status_code=201)
def regenerate_key(session: RequestSession, key_id: KeyId, visitor: ApiWrite) -> JSONResponse:
    try:
        created = keys.regenerate_key(session, key_id, visitor.user.id)
    except keys.UnknownKey:
        raise _unknown(key_id) from None
    return JSONResponse({**key_json(created.key, created.secret), "replaces": key_id}, status_code=201)


@router.get("/usage")
def usage(request: Request, session: RequestSession, visitor: ApiUser, days: int = 30) -> dict[str, Any]:
    if not 1 <= days <= usage_data.MAX_RANGE_DAYS:
        raise APIError(400, f"'days' must be between 1 and {usage_data.MAX_RANGE_DAYS}.", param="days")
    now = request.app.state.clock()
    principal = keys.principal_for(visitor.user)
    body = usage_body(principal, ledger.summary(session, principal, now))
    series = usage_data.daily_credits(session, visitor.user.id, periods.day_start(now), days)
    body["days"] = [{"date": day.isoformat(), "credits": credits} for day, credits in series]
    # The same days by model (models_today, from usage_body, is today's alone), as on the usage page.
    body["models"] = usage_data.models_over(session, visitor.user.id, periods.day_start(now), days)
    return body
