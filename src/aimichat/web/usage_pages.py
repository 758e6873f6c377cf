"""The usage page (meter, reset times, per-key and per-model use, 30-day chart) and the ledger as CSV."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from aimichat.alerts import service as alerts
from aimichat.keys import service as keys
from aimichat.quota import ledger, periods

from . import usage_data
from .deps import RequestSession, User, WebError
from .render import WebRoute, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)
CHART_DAYS = 30


@router.get("/usage")
def usage(request: Request, session: RequestSession, visitor: User) -> Response:
    now = request.app.state.clock()
    account = visitor.user
    today = periods.day_start(now)
    summary = ledger.summary(session, keys.principal_for(account), now)
    series = usage_data.daily_credits(session, account.id, today, CHART_DAYS)
    per_key = usage_data.keys_today(session, account.id, today)
    return page(
        request,
        visitor,
        "usage.html",
        title="Usage",
        s=summary,
        per_key=per_key,
        chart=usage_data.bar_chart(series),
        per_model_days=usage_data.models_over(session, account.id, today, CHART_DAYS),
        today=today,
        month_start=periods.month_start(now),
        now=now,
        alerts=alerts.alert_config(session, account.id),  # the thresholds form (web/alerts_pages.py)
    )


@router.get("/usage.csv")
def usage_csv(
    request: Request, session: RequestSession, visitor: User, start: str | None = None, end: str | None = None
) -> Response:
    try:
        first, last = usage_data.parse_range(start, end, periods.day_start(request.app.state.clock()))
    except usage_data.BadRange as exc:
        raise WebError(400, "Invalid date range", str(exc)) from None
    body = usage_data.ledger_csv(session, visitor.user.id, first, last)
    filename = f"aimichat-usage-{first.isoformat()}-to-{last.isoformat()}.csv"
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
