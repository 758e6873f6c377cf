"""The usage page (meter, reset times, per-key use, 30-day chart) and the ledger as CSV."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from aimichat.keys import service as keys
from aimichat.quota import ledger, periods

from . import usage_data
from .deps import Visitor, WebError, require_user
from .render import WebRoute, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)
CHART_DAYS = 30


@router.get("/usage")
def usage(request: Request, visitor: Visitor = Depends(require_user)):
    state = request.app.state
    now = state.clock()
    account = visitor.account
    with state.db.session() as db:
        summary = ledger.summary(db, keys.principal_for(account), now)
        series = usage_data.daily_credits(db, account.id, periods.day_start(now), CHART_DAYS)
        per_key = usage_data.keys_today(db, account.id, periods.day_start(now))
    return page(
        request, visitor, "usage.html", title="Usage", s=summary, per_key=per_key, chart=usage_data.bar_chart(series),
        today=periods.day_start(now), month_start=periods.month_start(now), now=now,
    )


@router.get("/usage.csv")
def usage_csv(request: Request, visitor: Visitor = Depends(require_user), start: str | None = None, end: str | None = None):
    state = request.app.state
    try:
        first, last = usage_data.parse_range(start, end, periods.day_start(state.clock()))
    except usage_data.BadRange as exc:
        raise WebError(400, "Invalid date range", str(exc)) from None
    with state.db.session() as db:
        body = usage_data.ledger_csv(db, visitor.account.id, first, last)
    filename = f"aimichat-usage-{first.isoformat()}-to-{last.isoformat()}.csv"
    return Response(body, media_type="text/csv; charset=utf-8", headers={"Content-Disposition": f'attachment; filename="{filename}"'})
