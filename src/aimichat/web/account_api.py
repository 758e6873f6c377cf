"""The JSON account API for the signed-in browser: keys and usage.

Session-authenticated, with the pages' CSRF rule (``X-CSRF-Token`` on every POST). An API key is
refused here with 403 ``mode_not_allowed``: a leaked key must not be able to mint more keys.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.api.errors import APIError
from aimichat.api.usage import usage_body
from aimichat.keys import service as keys
from aimichat.quota import ledger, periods
from aimichat.store.models import ApiKey

from . import usage_data
from .deps import Visitor, api_user, api_write
from .render import WebRoute

router = APIRouter(prefix="/api/account", route_class=WebRoute, tags=["account"])
KeyId = Path(ge=1, le=2**31 - 1)


def key_json(key: ApiKey, secret: str | None = None) -> dict:
    body = {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "created": periods.iso_utc(key.created_at),
        "last_used": periods.iso_utc(key.last_used_at) if key.last_used_at else None,
        "revoked": periods.iso_utc(key.revoked_at) if key.revoked_at else None,
        "status": keys.key_status(key),
    }
    if secret:
        body["key"] = secret  # only in the answer that creates it
    return body


def _unknown(key_id: int) -> APIError:
    return APIError(404, f"No API key with id {key_id} in your account.", code="key_not_found", param="id")


@router.get("/keys")
def list_keys(request: Request, visitor: Visitor = Depends(api_user)):
    with request.app.state.db.session() as db:
        return {"object": "list", "data": [key_json(k) for k in keys.list_keys(db, visitor.account.id)]}


@router.post("/keys", status_code=201)
async def create_key(request: Request, visitor: Visitor = Depends(api_write)):
    try:
        name = (await request.json()).get("name")
    except (ValueError, AttributeError):
        name = None
    if not isinstance(name, str):
        raise APIError(400, "Send JSON with a key name: {\"name\": \"laptop\"}.", param="name")

    def work():
        with request.app.state.db.session() as db:
            created = keys.create_key(db, visitor.account, name)
            db.commit()
            return key_json(created.key, created.secret)

    try:
        return JSONResponse(await run_in_threadpool(work), status_code=201)
    except ValueError as exc:
        raise APIError(400, f"Invalid key name: {exc}.", param="name") from None


@router.post("/keys/{key_id}/revoke")
def revoke_key(request: Request, key_id: int = KeyId, visitor: Visitor = Depends(api_write)):
    with request.app.state.db.session() as db:
        try:
            key = keys.revoke_key(db, key_id, visitor.account.id)
        except keys.UnknownKey:
            raise _unknown(key_id) from None
        db.commit()
        return key_json(key)


@router.post("/keys/{key_id}/regenerate", status_code=201)
def regenerate_key(request: Request, key_id: int = KeyId, visitor: Visitor = Depends(api_write)):
    with request.app.state.db.session() as db:
        try:
            created = keys.regenerate_key(db, key_id, visitor.account.id)
        except keys.UnknownKey:
            raise _unknown(key_id) from None
        db.commit()
        return JSONResponse({**key_json(created.key, created.secret), "replaces": key_id}, status_code=201)


@router.get("/usage")
def usage(request: Request, visitor: Visitor = Depends(api_user), days: int = 30):
    if not 1 <= days <= usage_data.MAX_RANGE_DAYS:
        raise APIError(400, f"'days' must be between 1 and {usage_data.MAX_RANGE_DAYS}.", param="days")
    state = request.app.state
    now = state.clock()
    principal = keys.principal_for(visitor.account)
    with state.db.session() as db:
        body = usage_body(principal, ledger.summary(db, principal, now))
        series = usage_data.daily_credits(db, visitor.account.id, periods.day_start(now), days)
    body["days"] = [{"date": day.isoformat(), "credits": credits} for day, credits in series]
    return body

