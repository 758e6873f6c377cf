"""Models list, liveness and readiness."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.keys import service as keys
from aimichat.keys.service import Principal
from aimichat.quota import pricing
from aimichat.registry.catalog import Catalog, ModelSpec, context_length

from .auth import optional_key
from .errors import APIError

router = APIRouter()
log = logging.getLogger(__name__)


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal | None = Depends(optional_key)) -> dict[str, Any]:
    """The models the key's tier may use, with this tier's price of each; without a key, every model."""
    state = request.app.state
    catalog = await state.models.current()
    tier = principal.tier_name if principal else None
    specs = [spec for spec in catalog.visible(tier) if principal is None or keys.model_allowed(principal, spec.name)]
    return {"object": "list", "data": [_model(state, spec, principal) for spec in specs]}


@router.get("/v1/models/{model_id:path}")
async def get_model(
    request: Request, model_id: str, principal: Principal | None = Depends(optional_key)
) -> dict[str, Any]:
    state = request.app.state
    catalog = await state.models.current()
    spec = catalog.resolve(model_id)
    if spec is None or (principal is not None and not _usable(catalog, principal, spec.name)):
        raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return _model(state, spec, principal)


def _usable(catalog: Catalog, principal: Principal, model: str) -> bool:
    return catalog.may_use(principal.tier_name, model) and keys.model_allowed(principal, model)


def _model(state: Any, spec: ModelSpec, principal: Principal | None) -> dict[str, Any]:
    """OpenAI's model object, plus what a client of a gateway needs: the context window, the other
    names it answers to, and (with a key) what this caller's tier pays for it."""
    body: dict[str, Any] = {
        "id": spec.name,
        "object": "model",
        "created": state.started,
        "owned_by": "aimichat",
        "engine": spec.kind,
        "context_length": context_length(spec, state.settings),
        "aliases": list(spec.aliases),
    }
    if principal is not None:
        rule = pricing.tier_price(principal.cost_rule, principal.credits_per_1k_tokens)
        body["pricing"] = state.models.catalog.price(principal.tier_name, spec.name, rule).as_json()
    return body


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 when some model, the database and (if configured) Redis can serve; 503 otherwise.

    ``models`` says, model by model, which can take requests here (a missing GGUF, an upstream that is
    gone); ``engine`` is aimichat-1's engine, as before the registry existed."""
    state = request.app.state
    stats = state.engine.stats()
    models = state.models.status()
    try:
        await run_in_threadpool(state.database.ping)
        database: dict[str, Any] = {"ok": True}
    except Exception as exc:  # any driver error means "not reachable"; the reason goes to the caller
        log.warning("readiness: database unreachable: %s", exc)
        database = {"ok": False, "error": type(exc).__name__}
    body: dict[str, Any] = {
        "status": "",
        "engine": stats.as_json(),
        "models": [m.as_json() for m in models],
        "database": database,
    }
    if state.settings.redis_url:
        try:
            await run_in_threadpool(state.quota.redis.ping)
            body["redis"] = {"ok": True}
        except Exception as exc:  # any client error means "not reachable"; the reason goes to the caller
            log.warning("readiness: redis unreachable: %s", exc)
            body["redis"] = {"ok": False, "error": type(exc).__name__}
    ready = any(m.ready for m in models) and database["ok"] and body.get("redis", {}).get("ok", True)
    body["status"] = "ready" if ready else "not ready"
    return JSONResponse(body, status_code=200 if ready else 503)
