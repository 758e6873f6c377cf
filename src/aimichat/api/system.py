"""Models list, liveness and readiness."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

router = APIRouter()
log = logging.getLogger(__name__)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    engine = request.app.state.engine
    return {"object": "list", "data": [_model(engine.model_id, request.app.state.started)]}


@router.get("/v1/models/{model_id}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    from .errors import APIError

    engine = request.app.state.engine
    if model_id != engine.model_id:
        raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return _model(engine.model_id, request.app.state.started)


def _model(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "aimichat"}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 when the engine, the database and (if configured) Redis can serve; 503 otherwise."""
    state = request.app.state
    stats = state.engine.stats()
    try:
        await run_in_threadpool(state.database.ping)
        database: dict[str, Any] = {"ok": True}
    except Exception as exc:  # any driver error means "not reachable"; the reason goes to the caller
        log.warning("readiness: database unreachable: %s", exc)
        database = {"ok": False, "error": type(exc).__name__}
    body: dict[str, Any] = {"status": "", "engine": stats.as_json(), "database": database}
    if state.settings.redis_url:
        try:
            await run_in_threadpool(state.quota.redis.ping)
            body["redis"] = {"ok": True}
        except Exception as exc:  # any client error means "not reachable"; the reason goes to the caller
            log.warning("readiness: redis unreachable: %s", exc)
            body["redis"] = {"ok": False, "error": type(exc).__name__}
    ready = stats.ready and database["ok"] and body.get("redis", {}).get("ok", True)
    body["status"] = "ready" if ready else "not ready"
    return JSONResponse(body, status_code=200 if ready else 503)
