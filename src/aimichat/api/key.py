"""``GET /v1/key``: where the calling key stands (its limits and what remains of each). Costs nothing."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aimichat.keys.service import Principal
from aimichat.quota import ledger, periods
from aimichat.store.clock import iso_utc

from .auth import require_key
from .responses import rate_limit_headers

router = APIRouter()


@router.get("/v1/key")
async def key_standing(request: Request, principal: Principal = Depends(require_key)) -> JSONResponse:
    state = request.app.state
    now = state.clock()

    def read() -> tuple[ledger.UsageSummary, int, int, tuple[int, int]]:
        day, month = periods.day_start(now), periods.month_start(now)
        with state.database.session() as session:
            summary = ledger.summary(session, principal, now)
            key_day = ledger.key_ledger_sum(session, principal.key_id or 0, day, day)
            key_month = ledger.key_ledger_sum(session, principal.key_id or 0, month, day)
        return summary, key_day, key_month, state.quota.minute_use(principal, now)

    summary, key_day, key_month, (requests, tokens) = await run_in_threadpool(read)
    body = key_body(principal, summary, key_day, key_month, requests, tokens, now)
    figures = ledger.key_figures(principal.limits, now, day=key_day, month=key_month, requests=requests, tokens=tokens)
    standing = ledger.Reservation(
        ledger_id=0,
        request_id="",
        account_id=principal.account_id,
        credits=0,
        day=periods.day_start(now),
        month=None,
        day_used=summary.day_used,
        daily_limit=summary.daily_limit,
        reset_at=summary.day_reset,
        key_id=principal.key_id,
        key=figures,
    )
    return JSONResponse(body, headers=rate_limit_headers(standing.rate_limit()))


def key_body(
    principal: Principal,
    summary: ledger.UsageSummary,
    key_day: int,
    key_month: int,
    requests: int,
    tokens: int,
    now: dt.datetime,
) -> dict[str, Any]:
    limits = principal.limits
    minute_reset = iso_utc(periods.next_minute(now))

    def cap(limit: int | None, used: int, reset: dt.datetime) -> dict[str, Any] | None:
        if limit is None:
            return None
        return {"limit": limit, "used": used, "remaining": max(0, limit - used), "resetAt": iso_utc(reset)}

    def rate(limit: int | None, used: int) -> dict[str, Any] | None:
        if limit is None:
            return None
        return {"limit": limit, "used": used, "remaining": max(0, limit - used), "resetAt": minute_reset}

    return {
        "object": "key",
        "id": principal.key_id,
        "name": principal.key_name,
        "prefix": principal.key_prefix,
        "tier": principal.tier_name,
        "expires_at": iso_utc(limits.expires_at) if limits.expires_at else None,
        "old_secret_valid_until": iso_utc(principal.grace_until) if principal.grace_until else None,
        "models": list(limits.models) if limits.models is not None else None,
        "ips": list(limits.ips) if limits.ips is not None else None,
        "daily_cap": cap(limits.daily_cap, key_day, summary.day_reset),
        "monthly_cap": cap(limits.monthly_cap, key_month, summary.month_reset),
        "requests_per_minute": rate(limits.rpm, requests),
        "tokens_per_minute": rate(limits.tpm, tokens),
        "account": {
            "daily": cap(summary.daily_limit, summary.day_used, summary.day_reset),
            "monthly": cap(summary.monthly_limit, summary.month_used, summary.month_reset),
        },
    }
