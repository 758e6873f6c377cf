"""Models list, liveness and readiness."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from aimichat.keys import service as keys
from aimichat.keys.service import Principal
from aimichat.quota import pricing
from aimichat.registry.catalog import Catalog, ModelSpec, context_length
from aimichat.store.health import CachedCheck

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
    gone); ``engine`` is aimichat-1's engine, as before the registry existed. The stores' health comes
    from cached checks (``store.health``): this answers within about half a second even when a store
    hangs, and fails within a few seconds of one going away."""
    state = request.app.state
    stats = state.engine.stats()
    models = state.models.status()
    checks = [state.database.health]
    if state.settings.redis_url:
        checks.append(_redis_health(state))
    results = await asyncio.gather(*(check.result() for check in checks))
    database = results[0].as_json()
    body: dict[str, Any] = {
        "status": "",
        # Requests waiting for their turn in the fairness gate (quota/fairness.py) are queued too.
        "engine": stats.as_json() | {"queued": stats.queued + state.fairness.waiting(state.engine)},
        "models": [m.as_json() for m in models],
        "database": database,
    }
    if state.settings.redis_url:
        body["redis"] = results[1].as_json()
    ready = any(m.ready for m in models) and all(r.ok for r in results)
    body["status"] = "ready" if ready else "not ready"
    return JSONResponse(body, status_code=200 if ready else 503)


def _redis_health(state: Any) -> CachedCheck:
    """The cached check of the quota's Redis client (made on first use, kept on the app's state)."""
    client = state.quota.redis
    check: CachedCheck | None = getattr(state, "redis_health", None)
    if check is None or check.probe != client.ping:
        check = CachedCheck("redis", client.ping)
        state.redis_health = check
    return check
