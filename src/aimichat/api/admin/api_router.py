"""Routes of the admin API (``/admin/v1/...``): thin, each one session of the admin key's, committed when
the route returns; ``serving`` decides. Only admin keys get in, sent as ``Authorization: Bearer`` (never
``X-API-Key`` or the query string, as docs/admin-api.md says): an API key is a 403 here (as an admin key is
on ``/v1/...``), anything else a 401. Each admin key may make ``AIMICHAT_ADMIN_RPM`` requests a minute (429
with ``Retry-After`` beyond that).

The create operations take ``Idempotency-Key`` (``api.idempotency``), scoped to the admin key; they commit
before they answer, so an answer kept for retries is never of a change rolled back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from aimichat.api.errors import APIError
from aimichat.api.idempotency import OPENAPI, idempotent
from aimichat.audit import service as audit
from aimichat.keys import admin_keys, tokens
from aimichat.keys import service as keys
from aimichat.quota import periods

from . import serving
from .protocol import (
    AccountBody,
    AccountCreate,
    AccountList,
    AccountUpdate,
    AlertsBody,
    AlertsSet,
    AliasAdd,
    KeyCreate,
    KeyLimitsBody,
    KeyRotate,
    ModelAdd,
    ModelList,
    PriceSet,
    SamplingSet,
    SourceAdd,
    SourceBody,
    TierBody,
    TierSave,
    UsageBody,
)

# Declares the scheme in the OpenAPI document (the "Authorize" button); the check itself is admin_session's.
_BEARER = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="An admin key: aimichat_admin_...")


def admin_session(request: Request) -> Iterator[Session]:
    """The request's session, acting as the admin key that authenticated it (so the audit log names it)."""
    state = request.app.state
    session: Session = state.database.session()
    try:
        caller = _authenticate(session, bearer_key(request), state.clock())
        session.commit()  # the request counts against the minute even if what it asks is refused
        if caller.requests > state.settings.admin_rpm:
            retry = max(1, int((caller.window_start + dt.timedelta(minutes=1) - state.clock()).total_seconds()))
            raise APIError(
                429,
                f"Too many admin API requests: at most {state.settings.admin_rpm} a minute per admin key. "
                f"Retry in {retry}s.",
                code="rate_limit_exceeded",
                type="requests",
                retry_after=retry,
            )
        audit.act_as(session, caller.actor)
        yield session
        session.commit()
    finally:
        session.close()


def bearer_key(request: Request) -> str | None:
    """The key sent as ``Authorization: Bearer``, the admin API's only way in: an admin key in another
    header would be one more place for proxies to log it. Two different ones are a 400."""
    found = set()
    for auth in request.headers.getlist("authorization"):
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found.add(value.strip())
    if len(found) > 1:
        raise APIError(400, "More than one admin key was sent: send exactly one.", code="ambiguous_api_key")
    return found.pop() if found else None


def _authenticate(session: Session, key: str | None, now: dt.datetime) -> admin_keys.AdminCaller:
    if key and admin_keys.is_well_formed(key):
        caller = admin_keys.authenticate(session.connection(), key, now)
        if caller is not None:
            return caller
    elif key and tokens.is_well_formed(key) and keys.authenticate(session, key, now) is not None:
        raise APIError(
            403,
            "API keys cannot call the admin API. Send an admin key (aimichat admin-keys create).",
            code="admin_key_required",
        )
    raise APIError(
        401,
        "Incorrect or missing admin key. Send it as 'Authorization: Bearer aimichat_admin_...'.",
        code="invalid_admin_key",
    )


AdminSession = Annotated[Session, Depends(admin_session, scope="function")]
AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]
PageNumber = Annotated[int, Query(ge=1, le=2**31 - 1)]
PerPage = Annotated[int, Query(ge=1, le=200)]

router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(_BEARER)])


def _offered(request: Request) -> serving.Offered:
    catalog = request.app.state.models.catalog
    return lambda tier: [spec.name for spec in catalog.visible(tier)]


def _today(request: Request) -> dt.date:
    return periods.day_start(request.app.state.clock())


Body = TypeVar("Body")


async def _created(request: Request, session: Session, work: Callable[[], Body], *, secret: bool = False) -> Response:
    """``work``'s answer as a 201, at most once per ``Idempotency-Key`` of the admin key. The change is
    committed before the answer leaves ``answer`` (so before it is kept for retries); an answer holding a
    key's ``secret`` is kept without it (``serving.without_secret``)."""

    def committed() -> Body:
        try:
            body = work()
        except BaseException:
            # Ended before the refusal is kept: on SQLite the open transaction holds the write lock that
            # keeping it needs (it would wait out the busy timeout, then keep nothing).
            session.rollback()
            raise
        session.commit()
        return body

    async def answer() -> Response:
        return JSONResponse(await run_in_threadpool(committed), status_code=201)

    owner = audit.actor_of(session)  # "admin_key:<id>": each admin key has its own Idempotency-Keys
    return await idempotent(request, owner, answer, serving.without_secret if secret else None)


# -- accounts ------------------------------------------------------------------------------------


@router.post("/accounts", status_code=201, response_model=AccountBody, openapi_extra=OPENAPI)
async def create_account(request: Request, session: AdminSession, body: AccountCreate) -> Response:
    default_tier = request.app.state.settings.default_tier
    return await _created(request, session, lambda: serving.create_account(session, body, default_tier))


@router.get("/accounts")
def list_accounts(
    session: AdminSession,
    q: Annotated[str, Query(max_length=320, description="Part of the email, any case.")] = "",
    page: PageNumber = 1,
    per_page: PerPage = 50,
) -> AccountList:
    return serving.list_accounts(session, q, page, per_page)


@router.get("/accounts/{account_id}")
def get_account(session: AdminSession, account_id: AccountId) -> AccountBody:
    return serving.get_account(session, account_id)


@router.patch("/accounts/{account_id}")
def update_account(session: AdminSession, account_id: AccountId, body: AccountUpdate) -> AccountBody:
    return serving.update_account(session, account_id, body)


@router.get("/accounts/{account_id}/ledger", response_class=Response, responses={200: {"content": {"text/csv": {}}}})
def ledger(
    request: Request,
    session: AdminSession,
    account_id: AccountId,
    start: Annotated[str | None, Query(alias="from", description="YYYY-MM-DD (default: the 1st of this month)")] = None,
    end: Annotated[str | None, Query(alias="to", description="YYYY-MM-DD (default: today)")] = None,
) -> Response:
    """The account's ledger as CSV (one row per request), as its own usage page downloads it."""
    body = serving.ledger_csv(session, account_id, start, end, _today(request))
    filename = f"aimichat-ledger-{account_id}.csv"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return Response(body, media_type="text/csv; charset=utf-8", headers=headers)


# -- keys ----------------------------------------------------------------------------------------


@router.post("/accounts/{account_id}/keys", status_code=201, response_model=dict[str, Any], openapi_extra=OPENAPI)
async def create_key(request: Request, session: AdminSession, account_id: AccountId, body: KeyCreate) -> Response:
    """A new key of the account; the answer's ``key`` field holds the secret, this once (a replay with the
    same ``Idempotency-Key`` has the key without it: secrets are not kept)."""
    offered, now = _offered(request), request.app.state.clock()
    work = lambda: serving.create_key(session, account_id, body, offered, now)  # noqa: E731
    return await _created(request, session, work, secret=True)


@router.get("/accounts/{account_id}/keys")
def list_keys(request: Request, session: AdminSession, account_id: AccountId) -> dict[str, Any]:
    return serving.list_keys(session, account_id, request.app.state.clock())


@router.get("/keys/{key_id}")
def get_key(request: Request, session: AdminSession, key_id: KeyId) -> dict[str, Any]:
    return serving.get_key(session, key_id, request.app.state.clock())


@router.patch("/keys/{key_id}")
def update_key(request: Request, session: AdminSession, key_id: KeyId, body: KeyLimitsBody) -> dict[str, Any]:
    """Change some of a key's limits: the fields sent (``null`` removes one); the others stay."""
    return serving.update_key(session, key_id, body, _offered(request), request.app.state.clock())


@router.delete("/keys/{key_id}")
def revoke_key(request: Request, session: AdminSession, key_id: KeyId) -> dict[str, Any]:
    """Revoke a key: it stops working at once, on every replica within a second."""
    return serving.revoke_key(session, key_id, request.app.state.clock())


@router.post("/keys/{key_id}/rotate", status_code=201, response_model=dict[str, Any], openapi_extra=OPENAPI)
async def rotate_key(request: Request, session: AdminSession, key_id: KeyId, body: KeyRotate | None = None) -> Response:
    """A new secret for the key (its name, limits and usage stay); ``grace`` keeps the old one working. A
    replay with the same ``Idempotency-Key`` does not rotate again, and has the key without its secret."""
    now = request.app.state.clock()
    work = lambda: serving.rotate_key(session, key_id, body or KeyRotate(), now)  # noqa: E731
    return await _created(request, session, work, secret=True)


# -- usage alerts --------------------------------------------------------------------------------


@router.get("/accounts/{account_id}/alerts")
def get_alerts(session: AdminSession, account_id: AccountId) -> AlertsBody:
    """When the account is alerted of its use (docs/alerts.md): thresholds, and whether by email too."""
    return serving.get_alerts(session, account_id)


@router.put("/accounts/{account_id}/alerts")
def set_alerts(request: Request, session: AdminSession, account_id: AccountId, body: AlertsSet) -> AlertsBody:
    """Change the account's thresholds and/or email choice (``aimichat alerts set``): the fields sent."""
    return serving.set_alerts(session, account_id, body, request.app.state.clock())


# -- tiers and prices ----------------------------------------------------------------------------


@router.get("/tiers")
def list_tiers(session: AdminSession) -> list[TierBody]:
    return serving.list_tiers(session)


@router.get("/tiers/{name}")
def get_tier(session: AdminSession, name: str) -> TierBody:
    return serving.get_tier(session, name)


@router.put("/tiers/{name}")
def save_tier(session: AdminSession, name: Annotated[str, Path(max_length=64)], body: TierSave) -> TierBody:
    """Create a tier, or change the fields sent of an existing one (``aimichat tiers set``)."""
    return serving.save_tier(session, name, body)


@router.get("/prices")
def list_prices(session: AdminSession, tier: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": serving.list_prices(session, tier)}


@router.put("/prices/{tier}/{model:path}")
def set_price(session: AdminSession, tier: str, model: str, body: PriceSet) -> dict[str, Any]:
    """What TIER pays for MODEL (``aimichat prices set``)."""
    return serving.set_price(session, tier, model, body)


@router.delete("/prices/{tier}/{model:path}", status_code=204, response_class=Response)
def remove_price(session: AdminSession, tier: str, model: str) -> Response:
    serving.remove_price(session, tier, model)
    return Response(status_code=204)


# -- the model registry --------------------------------------------------------------------------
# The fixed paths (aliases, sources, export, import) come before /models/{name}: a model's name may hold "/".

ModelName = Annotated[str, Path(max_length=128)]
TOML = {"requestBody": {"required": True, "content": {"application/toml": {"schema": {"type": "string"}}}}}


def _committed(session: Session, work: Callable[[], object]) -> None:
    """``work`` then the commit, in the thread pool: the answer is then read from this replica's catalog,
    which a commit marks stale, so it shows the change."""
    work()
    session.commit()


async def _model_answer(request: Request, name: str) -> dict[str, Any]:
    models = request.app.state.models
    catalog = await models.current()
    spec = catalog.models.get(name)
    if spec is None:  # removed by another request since this one's commit
        raise APIError(404, f"The model {name!r} was removed meanwhile.", code="model_not_found", param="name")
    status = {s.name: s for s in models.status()}.get(name)
    return serving.model_body(spec, request.app.state.settings, status)


@router.get("/models")
async def list_models(request: Request, session: AdminSession) -> ModelList:
    """Every model served (aimichat-1, the registry's, the discovered ones) with its settings and its state
    on this replica; ``hidden``: the models removed that ``POST /models/{name}/restore`` serves again."""
    models = request.app.state.models
    catalog = await models.current()
    statuses = models.status()  # on the event loop, where the engines' state changes
    return await run_in_threadpool(serving.list_models, session, catalog, statuses, request.app.state.settings)


@router.post("/models", status_code=201)
async def add_model(request: Request, session: AdminSession, body: ModelAdd) -> dict[str, Any]:
    """Add a model, or redefine one (``aimichat models add``): served by every replica within
    ``AIMICHAT_REGISTRY_POLL_SECONDS``; the answer is the model as this replica lists it."""
    await run_in_threadpool(_committed, session, lambda: serving.add_model(session, body))
    return await _model_answer(request, body.name)


@router.post("/models/aliases", status_code=201)
def add_alias(session: AdminSession, body: AliasAdd) -> dict[str, Any]:
    """Make ``alias`` another name of ``model`` (``aimichat models alias MODEL ALIAS``)."""
    return serving.add_alias(session, body.alias, body.model)


@router.delete("/models/aliases/{alias:path}", status_code=204, response_class=Response)
def remove_alias(session: AdminSession, alias: str) -> Response:
    serving.remove_alias(session, alias)
    return Response(status_code=204)


@router.get("/models/sources")
async def list_sources(request: Request, session: AdminSession) -> dict[str, Any]:
    """The discovered upstreams, each with the models this replica serves of it now."""
    catalog = await request.app.state.models.current()
    return {"object": "list", "data": await run_in_threadpool(serving.list_sources, session, catalog)}


@router.post("/models/sources", status_code=201)
def add_source(request: Request, session: AdminSession, body: SourceAdd) -> SourceBody:
    """Serve every model an OpenAI-compatible server lists, as ``prefix`` + its id (``aimichat models
    discover``); every replica reads its list within ``AIMICHAT_REGISTRY_POLL_SECONDS``."""
    return serving.add_source(session, body, request.app.state.models.catalog)


@router.delete("/models/sources/{prefix:path}", status_code=204, response_class=Response)
def remove_source(session: AdminSession, prefix: str) -> Response:
    """Stop serving a discovered upstream's models; ``/models/sources/`` is the one without a prefix."""
    serving.remove_source(session, prefix)
    return Response(status_code=204)


@router.get("/models/export", response_class=Response, responses={200: {"content": {"application/toml": {}}}})
def export_models(session: AdminSession) -> Response:
    """The registry as the TOML file ``aimichat models export`` writes (models, aliases, sources, tier
    access, prices)."""
    headers = {"Content-Disposition": 'attachment; filename="aimichat-models.toml"'}
    return Response(serving.export_toml(session), media_type="application/toml; charset=utf-8", headers=headers)


@router.post("/models/import", openapi_extra=TOML)
async def import_models(request: Request, session: AdminSession) -> dict[str, Any]:
    """Make the registry exactly what the TOML body says (``aimichat models import``): all or nothing;
    what the file leaves out goes."""
    body = await request.body()
    return await run_in_threadpool(serving.import_toml, session, body)


@router.patch("/models/{name:path}")
async def set_sampling(request: Request, session: AdminSession, name: ModelName, body: SamplingSet) -> dict[str, Any]:
    """Change a registered model's default sampling (``aimichat models set``): the fields sent, ``null``
    removing one; its other settings stay."""
    await run_in_threadpool(_committed, session, lambda: serving.set_sampling(session, name, body))
    return await _model_answer(request, name)


@router.delete("/models/{name:path}")
def remove_model(session: AdminSession, name: ModelName) -> dict[str, Any]:
    """Stop serving a model everywhere, with its aliases and prices; aimichat-1 and discovered models are
    hidden instead (``"hidden": true``; ``POST /models/{name}/restore`` serves them again)."""
    return serving.remove_model(session, name)


@router.post("/models/{name:path}/restore")
def restore_model(session: AdminSession, name: ModelName) -> dict[str, Any]:
    """Serve a hidden model again (``aimichat models restore``)."""
    return serving.restore_model(session, name)


# -- usage and the audit log ---------------------------------------------------------------------


@router.get("/usage")
def usage(
    request: Request,
    session: AdminSession,
    account_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    start: Annotated[str | None, Query(alias="from", description="YYYY-MM-DD (default: the 1st of this month)")] = None,
    end: Annotated[str | None, Query(alias="to", description="YYYY-MM-DD (default: today)")] = None,
) -> UsageBody:
    """Requests, credits and tokens per day, account, key and model (every account without ``account_id``)."""
    return serving.usage(session, account_id, start, end, _today(request))


@router.get("/audit")
def audit_log(
    session: AdminSession,
    actor: Annotated[str | None, Query(max_length=64, examples=["admin_key:1", "account:7", "cli"])] = None,
    action: Annotated[str | None, Query(max_length=64, examples=["key.revoked"])] = None,
    target: Annotated[str | None, Query(max_length=200, examples=["key:12"])] = None,
    page: PageNumber = 1,
    per_page: PerPage = 50,
) -> dict[str, Any]:
    """Changes to accounts, tiers, prices, models and keys, newest first; each filter an exact value."""
    return serving.audit_events(session, actor, action, target, page, per_page)
