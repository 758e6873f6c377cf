"""The usage page (meter, reset times, per-key and per-model use, each key's 30 days as a chart of credits,
requests or tokens, the recent requests a page at a time) and the ledger as CSV."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from aimichat.alerts import service as alerts
from aimichat.keys import service as keys
from aimichat.quota import ledger, periods

from . import usage_data
from .deps import RequestSession, User, Visitor
from .render import WebRoute, page, time_ago

router = APIRouter(route_class=WebRoute, include_in_schema=False)
CHART_DAYS = 30


def utc(moment: dt.datetime) -> str:
    """A moment as every page shows it (the templates' ``utc`` filter): "2026-12-01 00:00 UTC"."""
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def time_left(moment: dt.datetime, now: dt.datetime) -> str:
    """How long until ``moment``, as /usage says it: "in 3 h 12 min", or "in 2 d 5 h" a day or more ahead."""
    secs = max(0, int((moment - now).total_seconds()))
    if secs >= 86400:
        return f"in {secs // 86400} d {(secs % 86400) // 3600} h"
    return f"in {secs // 3600} h {(secs % 3600) // 60} min"


@dataclass(frozen=True)
class Spent:
    """The account's credits are spent for ``period`` ("today" or "this month") until ``reset_at``."""

    period: str
    reset_at: dt.datetime
    message: str


def credits_spent(summary: ledger.UsageSummary, now: dt.datetime) -> Spent | None:
    """The banner of /keys and the playground when the day's (or the month's) credits are all used; the
    month wins when both are, since its reset is the later one and nothing works before it."""
    if summary.monthly_limit is not None and summary.month_used >= summary.monthly_limit:
        period, reset_at = "this month", summary.month_reset
    elif summary.day_used >= summary.daily_limit:
        period, reset_at = "today", summary.day_reset
    else:
        return None
    message = (
        f"Your credits for {period} are spent: every key gets 429 until {utc(reset_at)} ({time_left(reset_at, now)})."
    )
    return Spent(period, reset_at, message)


@router.get("/usage")
def usage(
    request: Request,
    session: RequestSession,
    visitor: User,
    metric: str | None = None,
    key: str | None = None,
    before: str | None = None,
    after: str | None = None,
) -> Response:
    now = request.app.state.clock()
    account = visitor.user
    today = periods.day_start(now)
    try:
        query = usage_data.parse_query(metric, key, before, after)
        view = usage_data.history_view(session, account.id, today, CHART_DAYS, query)
    except usage_data.BadQuery as exc:
        return bad_request(request, visitor, "Invalid usage view", str(exc))
    summary = ledger.summary(session, keys.principal_for(account), now)
    return page(
        request,
        visitor,
        "usage.html",
        title="Usage",
        s=summary,
        per_key=usage_data.keys_today(session, account.id, today),
        view=view,
        amount=usage_data.amount,
        status_word=usage_data.status_word,
        per_model_days=usage_data.models_over(session, account.id, today, CHART_DAYS),
        today=today,
        month_start=periods.month_start(now),
        now=now,
        until=lambda moment: time_left(moment, now),
        ago=lambda moment: time_ago(moment, now),
        alerts=alerts.alert_config(session, account.id),  # the thresholds form (web/alerts_pages.py)
    )


@router.get("/usage.csv")
def usage_csv(
    request: Request, session: RequestSession, visitor: User, start: str | None = None, end: str | None = None
) -> Response:
    try:
        first, last = usage_data.parse_range(start, end, periods.day_start(request.app.state.clock()))
    except usage_data.BadRange as exc:
        return bad_request(request, visitor, "Invalid date range", str(exc), back="/usage#csv-title")
    body = usage_data.ledger_csv(session, visitor.user.id, first, last)
    filename = f"aimichat-usage-{first.isoformat()}-to-{last.isoformat()}.csv"
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def bad_request(request: Request, visitor: Visitor, title: str, message: str, back: str = "/usage") -> Response:
    """A 400 page that says what was wrong and leads back to the usage page (not to /keys, as other errors do)."""
    return page(
        request,
        visitor,
        "error.html",
        status=400,
        title=title,
        message=message,
        back_href=back,
        back_label="Back to Usage",
    )
