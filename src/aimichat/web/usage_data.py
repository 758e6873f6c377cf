"""What the usage page and the account API show: per-day totals, per-key use today, per-model use over a
range of days, and the geometry of the 30-day bar chart (drawn as SVG on the server, so it needs no script).
The date range and the ledger as CSV are ``quota.usage_report``'s."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aimichat.keys.service import KeyUse, use_by_key
from aimichat.quota.ledger import use_by_model

# The date range and the CSV are the quota layer's (the admin API serves them too); the pages read them here.
from aimichat.quota.usage_report import MAX_RANGE_DAYS as MAX_RANGE_DAYS
from aimichat.quota.usage_report import BadRange as BadRange
from aimichat.quota.usage_report import ledger_csv as ledger_csv
from aimichat.quota.usage_report import parse_range as parse_range
from aimichat.quota.usage_report import spreadsheet_safe as spreadsheet_safe
from aimichat.store.models import UsageEvent

# -- per day -------------------------------------------------------------------------------------


def daily_credits(session: Session, account_id: int, last_day: dt.date, days: int) -> list[tuple[dt.date, int]]:
    """Credits per UTC day for ``days`` days ending with ``last_day``; days without use are 0."""
    first = last_day - dt.timedelta(days=days - 1)
    rows = session.execute(
        select(UsageEvent.day, func.sum(UsageEvent.credits))
        .where(UsageEvent.account_id == account_id, UsageEvent.day >= first, UsageEvent.day <= last_day)
        .group_by(UsageEvent.day)
    ).all()
    by_day = {day: int(credits or 0) for day, credits in rows}
    return [(first + dt.timedelta(days=i), by_day.get(first + dt.timedelta(days=i), 0)) for i in range(days)]


@dataclass(frozen=True)
class Bar:
    day: dt.date
    credits: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    """Bars in a ``width`` x ``height`` box; the page stretches it to fit, labels are HTML around it."""

    bars: list[Bar]
    width: int
    height: int
    top_value: int  # the value at the top of the box
    total: int


def bar_chart(series: list[tuple[dt.date, int]], height: int = 100, slot: int = 10) -> Chart:
    """One bar per day, ``slot`` units apart, scaled so the top of the box is a round number."""
    top_value = nice_ceiling(max((c for _, c in series), default=0))
    bars: list[Bar] = []
    for i, (day, credits) in enumerate(series):
        # A day without use still gets a 1-unit stub, so every one of the days is visible.
        h = max(1.0, round(height * credits / top_value, 2))
        bars.append(Bar(day, credits, i * slot + 1, round(height - h, 2), slot - 2, h))
    return Chart(bars, slot * len(series), height, top_value, sum(c for _, c in series))


def nice_ceiling(value: int) -> int:
    """A round number at or above ``value`` (1, 2, 5, 10, 20, 50, ...), so the axis reads easily."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= value:
                return step * m
        step *= 10


# -- per model -----------------------------------------------------------------------------------


def models_over(session: Session, account_id: int, last_day: dt.date, days: int) -> list[dict[str, Any]]:
    """Requests, credits and tokens by model over ``days`` days ending with ``last_day`` (the chart's
    days), most credits first; rows from before the registry count as ``aimichat-1``."""
    return use_by_model(session, account_id, last_day - dt.timedelta(days=days - 1), last_day)


# -- per key today -------------------------------------------------------------------------------


def keys_today(session: Session, account_id: int, day: dt.date) -> list[KeyUse]:
    """Each key's use on ``day`` (see ``keys.use_by_key``), then the playground's, if it was used."""
    uses = use_by_key(session, account_id, day)
    credits, requests = session.execute(
        select(func.coalesce(func.sum(UsageEvent.credits), 0), func.count(UsageEvent.id)).where(
            UsageEvent.account_id == account_id, UsageEvent.api_key_id.is_(None), UsageEvent.day == day
        )
    ).one()
    if requests:
        uses.append(KeyUse(None, "Playground", None, int(requests), int(credits), None, False))
    return uses
