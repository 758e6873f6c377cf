"""``GET /v1/usage``: where the caller's account stands. Costs nothing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.keys.service import Principal
from aimichat.quota import ledger
from aimichat.store.clock import iso_utc

from .auth import require_key
from .responses import rate_limit_headers

router = APIRouter()


@router.get("/v1/usage")
async def usage(request: Request, principal: Principal = Depends(require_key)) -> JSONResponse:
    state = request.app.state

    def read() -> ledger.UsageSummary:
        with state.database.session() as session:
            return ledger.summary(session, principal, state.clock())

    s = await run_in_threadpool(read)
    return JSONResponse(usage_body(principal, s), headers=rate_limit_headers(s.rate_limit))


def usage_body(principal: Principal, s: ledger.UsageSummary) -> dict[str, Any]:
    month_remaining = None if s.monthly_limit is None else max(0, s.monthly_limit - s.month_used)
    return {
        "object": "usage",
        "tier": principal.tier_name,
        "cost_rule": principal.cost_rule,
        "daily": {
            "used": s.day_used,
            "limit": s.daily_limit,
            "remaining": max(0, s.daily_limit - s.day_used),
            "resetAt": iso_utc(s.day_reset),
        },
        "monthly": {
            "used": s.month_used,
            "limit": s.monthly_limit,
            "remaining": month_remaining,
            "resetAt": iso_utc(s.month_reset),
        },
        "keys_today": s.per_key_today,
        "models_today": s.per_model_today,
    }
