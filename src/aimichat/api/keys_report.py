"""``POST /v1/keys/report``: anybody who finds an AimiChat key in the open reports it here (docs/security.md).

No authentication: the finder is rarely the owner. The answer is the same ``202`` whatever the key was
(live and now revoked, unknown, already revoked, not even well formed), so the endpoint tells nobody
whether a string is a working key. The rules live in ``alerts.leaks``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.alerts import leaks

from .errors import APIError

router = APIRouter()


@router.post("/v1/keys/report", status_code=202)
async def report_keys(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        body: Any = json.loads(await request.body())
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; arrays nested thousands deep
        raise APIError(400, "The body is not a JSON report: " + leaks.SHAPE + ".", code="invalid_report") from None
    try:
        reports = leaks.parse_report(body)
    except leaks.BadReport as exc:
        raise APIError(400, str(exc), code="invalid_report") from None
    # uvicorn already applied X-Forwarded-For from trusted proxies to this.
    address = (request.client.host if request.client else "") or "unknown"
    mailer = getattr(state, "mailer", None)
    email = bool(mailer is not None and mailer.enabled)

    def handle() -> int | None:
        now = state.clock()
        with state.database.session() as session:
            wait = leaks.retry_after(session, address, now, state.settings.key_reports_per_minute)
            if wait is not None:
                return wait
            handled = leaks.report_keys(session, reports, address, now, email=email)
            session.commit()
        if any(h.outcome == "revoked" for h in handled):
            state.alerts.wake()  # tell the owner now, not at the next poll
        return None

    wait = await run_in_threadpool(handle)
    if wait is not None:
        raise APIError(
            429,
            f"Too many key reports from this address; try again in {wait} s.",
            code="rate_limit_exceeded",
            type="rate_limit_error",
            retry_after=wait,
        )
    return JSONResponse({"object": "key_report", "received": len(reports)}, status_code=202)
