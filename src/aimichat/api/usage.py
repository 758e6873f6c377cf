"""``GET /v1/usage``: where the caller's account stands. Costs nothing."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.keys.service import Principal
from aimichat.quota import ledger, periods

from .auth import require_key

router = APIRouter()


@router.get("/v1/usage")
async def usage(request: Request, principal: Principal = Depends(require_key)):
    state = request.app.state

    def read():
        with state.db.session() as db:
            return ledger.summary(db, principal, state.clock())

    s = await run_in_threadpool(read)
    headers = {
        "X-RateLimit-Limit": str(s.daily_limit),
        "X-RateLimit-Remaining": str(max(0, s.daily_limit - s.day_used)),
        "X-RateLimit-Reset": periods.iso_utc(s.day_reset),
    }
    return JSONResponse(usage_body(principal, s), headers=headers)


def usage_body(principal: Principal, s: ledger.UsageSummary) -> dict:
    month_remaining = None if s.monthly_limit is None else max(0, s.monthly_limit - s.month_used)
    return {
        "object": "usage",
        "tier": principal.tier_name,
        "cost_rule": principal.cost_rule,
        "daily": {
            "used": s.day_used,
            "limit": s.daily_limit,
            "remaining": max(0, s.daily_limit - s.day_used),
            "resetAt": periods.iso_utc(s.day_reset),
        },
        "monthly": {
            "used": s.month_used,
            "limit": s.monthly_limit,
            "remaining": month_remaining,
            "resetAt": periods.iso_utc(s.month_reset),
        },
        "keys_today": s.per_key_today,
    }
