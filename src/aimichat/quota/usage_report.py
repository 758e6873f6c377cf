"""The ledger read back for people and programs: a range of days as asked for, use per day, account, key and
model over it (the admin API's usage), and an account's ledger rows as CSV (its usage page's download, the
admin API's ledger). Plain functions over a session; web/ and api/ both call them."""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aimichat.store.models import ApiKey, UsageEvent

from .ledger import LEGACY_MODEL

MAX_RANGE_DAYS = 366


class BadRange(ValueError):
    """A date range that cannot be served; the message says why."""


# -- per day, account, key and model -------------------------------------------------------------


@dataclass(frozen=True)
class DayUse:
    """One account's use of one model with one key (None: the playground) on one UTC day."""

    day: dt.date
    account_id: int
    key_id: int | None
    model: str
    requests: int
    credits: int
    prompt_tokens: int
    completion_tokens: int


def use_by_day(session: Session, first: dt.date, last: dt.date, account_id: int | None = None) -> list[DayUse]:
    """Requests, credits and tokens per day, account, key and model from ``first`` to ``last`` (inclusive),
    of one account or (None) of every one; rows from before the registry count as ``aimichat-1``."""
    model = func.coalesce(UsageEvent.model, LEGACY_MODEL)
    groups = (UsageEvent.day, UsageEvent.account_id, UsageEvent.api_key_id, model)
    query = (
        select(
            *groups,
            func.count(UsageEvent.id),
            func.coalesce(func.sum(UsageEvent.credits), 0),
            func.coalesce(func.sum(UsageEvent.prompt_tokens), 0),
            func.coalesce(func.sum(UsageEvent.completion_tokens), 0),
        )
        .where(UsageEvent.day >= first, UsageEvent.day <= last)
        .group_by(*groups)
        .order_by(*groups)
    )
    if account_id is not None:
        query = query.where(UsageEvent.account_id == account_id)
    return [
        DayUse(day, owner, key_id, name, int(requests), int(credits), int(prompt), int(completion))
        for day, owner, key_id, name, requests, credits, prompt, completion in session.execute(query)
    ]


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
