"""What the usage page and the account API show: per-day totals, per-key use today, per-model use over a
range of days, the ledger as CSV, and the geometry of the 30-day bar chart (drawn as SVG on the server, so
it needs no script)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aimichat.keys.service import KeyUse, use_by_key
from aimichat.quota.ledger import LEGACY_MODEL, use_by_model
from aimichat.store.models import ApiKey, UsageEvent

MAX_RANGE_DAYS = 366


class BadRange(ValueError):
    """A CSV date range that cannot be served; the message says why."""


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


# -- CSV -----------------------------------------------------------------------------------------


def parse_range(start: str | None, end: str | None, today: dt.date) -> tuple[dt.date, dt.date]:
    """``start``/``end`` as YYYY-MM-DD (default: this month so far); inclusive, at most a year."""
    try:
        first = dt.date.fromisoformat(start) if start else today.replace(day=1)
        last = dt.date.fromisoformat(end) if end else today
    except ValueError:
        raise BadRange("Dates must look like 2025-01-31.") from None
    if last < first:
        raise BadRange("The end date is before the start date.")
    if (last - first).days >= MAX_RANGE_DAYS:
        raise BadRange(f"Choose at most {MAX_RANGE_DAYS} days at a time.")
    return first, last


CSV_COLUMNS = [
    "time_utc",
    "day",
    "request_id",
    "key_id",
    "key_name",
    "key_prefix",
    "status",
    "credits",
    "prompt_tokens",
    "completion_tokens",
    "model",  # last, so programs reading the columns by position before it existed still work
]


def ledger_csv(session: Session, account_id: int, first: dt.date, last: dt.date) -> str:
    """The account's ledger rows from ``first`` to ``last`` (inclusive) as CSV, oldest first."""
    rows = session.execute(
        select(UsageEvent, ApiKey.name, ApiKey.prefix)
        .join(ApiKey, ApiKey.id == UsageEvent.api_key_id, isouter=True)
        .where(UsageEvent.account_id == account_id, UsageEvent.day >= first, UsageEvent.day <= last)
        .order_by(UsageEvent.created_at, UsageEvent.id)
    ).all()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for event, name, prefix in rows:
        writer.writerow(
            [
                event.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                event.day.isoformat(),
                event.request_id,
                event.api_key_id or "",
                spreadsheet_safe(name if event.api_key_id else "playground"),
                prefix or "",
                event.status,
                event.credits,
                event.prompt_tokens,
                event.completion_tokens,
                spreadsheet_safe(event.model or LEGACY_MODEL),
            ]
        )
    return out.getvalue()


# What makes a spreadsheet read a cell as a formula or a command (OWASP's CSV injection list, plus "|" and ";"
# that some import dialects treat as separators, and the full-width forms some spreadsheets normalise).
_FORMULA_START = frozenset("=+-@\t\r|;\uff1d\uff0b\uff0d\uff20")
# Invisible characters a spreadsheet skips before deciding (a zero-width space before "=" is still a formula).
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00a0 "


def spreadsheet_safe(text: str) -> str:
    """A key named "=HYPERLINK(...)" must open in a spreadsheet as text, not as a formula."""
    visible = text.lstrip(_INVISIBLE)
    return "'" + text if visible[:1] in _FORMULA_START else text
