"""The JSON account API for the signed-in browser: keys and usage.

Session-authenticated, with the pages' CSRF rule (``X-CSRF-Token`` on every POST). An API key is
refused here with 403 ``mode_not_allowed``: a leaked key must not be able to mint more keys.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.api.errors import APIError
from aimichat.api.usage import usage_body
from aimichat.keys import limits_input
from aimichat.keys import service as keys
from aimichat.keys.json import key_json
from aimichat.quota import ledger, periods

from . import key_actions, usage_data
from .deps import ApiUser, ApiWrite, RequestSession
from .render import WebRoute

router = APIRouter(prefix="/api/account", route_class=WebRoute, tags=["account"])
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _unknown(key_id: int) -> APIError:
    return APIError(404, f"No API key with id {key_id} in your account.", code="key_not_found", param="id")


async def _json_body(
    request: Request, *, optional: bool = False, hint: str = "Send a JSON object as the request body."
) -> dict[str, Any]:
    """The request's JSON object (``{}`` for an empty body when ``optional``); 400 for anything else."""
    raw = await request.body()
    if optional and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise APIError(400, hint)
    return body


def _bad(exc: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError of the key service or of ``keys.limits_input`` as the API's 400 (``args[1]``: the field)."""
    message = str(exc.args[0] if exc.args else exc)
    param = exc.args[1] if len(exc.args) > 1 else default_param
    return APIError(400, f"{message[:1].upper()}{message[1:]}.", param=param)


def _offered(request: Request, tier: str) -> list[str]:
    return [spec.name for spec in request.app.state.models.catalog.visible(tier)]


def _limit_changes(request: Request, body: dict[str, Any], tier: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = limits_input.unknown_fields(body, allowed)
    if unknown:
        raise APIError(400, f"Unknown field {unknown[0]!r}: send {', '.join(allowed)}.", param=unknown[0])
    try:
        return limits_input.limits_from_json(body, _offered(request, tier), request.app.state.clock())
    except ValueError as exc:
        raise _bad(exc) from None


@router.get("/keys")
def list_keys(request: Request, session: RequestSession, visitor: ApiUser) -> dict[str, Any]:
    now = request.app.state.clock()
    return {"object": "list", "data": [key_json(k, now=now) for k in keys.list_keys(session, visitor.user.id)]}


@router.post("/keys", status_code=201)
async def create_key(request: Request, session: RequestSession, visitor: ApiWrite) -> JSONResponse:
    """A new key: ``{"name": "ci"}`` and, optionally, its limits (the fields of ``limits`` in a key)."""
    hint = 'Send JSON with a key name: {"name": "laptop"}.'
    body = await _json_body(request, hint=hint)
    name = body.get("name")
    if not isinstance(name, str):
        raise APIError(400, hint, param="name")
    try:
        keys.clean_name(name)
    except ValueError as exc:
        raise APIError(400, f"Invalid key name: {exc}.", param="name") from None
    changes = _limit_changes(request, body, visitor.user.tier.name, ("name", *limits_input.LIMIT_FIELDS))

    def work() -> dict[str, Any]:
        created = keys.create_key(session, visitor.user, name, keys.KeyLimits(**changes))
        return key_json(created.key, created.secret, request.app.state.clock())

    try:
        return JSONResponse(await run_in_threadpool(work), status_code=201)
    except ValueError as exc:
        raise _bad(exc) from None


@router.post("/keys/{key_id}/limits")
async def set_limits(request: Request, session: RequestSession, key_id: KeyId, visitor: ApiWrite) -> dict[str, Any]:
    """Change some limits of a key: the fields sent (``null`` removes a limit); those not sent stay."""
    body = await _json_body(request)
    changes = _limit_changes(request, body, visitor.user.tier.name, limits_input.LIMIT_FIELDS)

    def work() -> dict[str, Any]:
        key = keys.get_key(session, key_id, visitor.user.id)
        if key.revoked_at is not None:
            raise ValueError("this key is revoked: its limits no longer apply")
        return key_json(keys.set_limits(session, key_id, visitor.user.id, **changes), now=request.app.state.clock())

    try:
        return await run_in_threadpool(work)
    except keys.UnknownKey:
        raise _unknown(key_id) from None
    except ValueError as exc:
        raise _bad(exc) from None


@router.post("/keys/{key_id}/revoke")
def revoke_key(request: Request, session: RequestSession, key_id: KeyId, visitor: ApiWrite) -> dict[str, Any]:
    try:
        key = keys.revoke_key(session, key_id, visitor.user.id)
    except keys.UnknownKey:
        raise _unknown(key_id) from None
    return key_json(key, now=request.app.state.clock())


@router.post("/keys/{key_id}/regenerate", status_code=201)
async def regenerate_key(request: Request, session: RequestSession, key_id: KeyId, visitor: ApiWrite) -> JSONResponse:
    """A new secret for a live key (``{"grace": "24h"}``: the old one works that long; seconds also do),
    or a new key with the name and limits of a revoked one."""
    body = await _json_body(request, optional=True)
    unknown = limits_input.unknown_fields(body, ("grace",))
    if unknown:
        raise APIError(400, f"Unknown field {unknown[0]!r}: send grace.", param=unknown[0])
    try:
        grace = limits_input.parse_grace(body.get("grace"))
    except ValueError as exc:
        raise _bad(exc, "grace") from None
    now = request.app.state.clock()

    def work() -> dict[str, Any]:
        done = key_actions.regenerate(session, key_id, visitor.user.id, grace, now)
        return {**key_json(done.created.key, done.created.secret, now), "replaces": key_id}

    try:
        return JSONResponse(await run_in_threadpool(work), status_code=201)
    except keys.UnknownKey:
        raise _unknown(key_id) from None
    except ValueError as exc:
        raise _bad(exc) from None


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
