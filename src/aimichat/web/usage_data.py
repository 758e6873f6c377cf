"""What the usage page and the account API show: per-day totals, per-key use today, per-model use over a
range of days, each key's history over the chart's days (credits, requests, tokens), the page's query
(metric, key, page of requests) and the geometry of the 30-day bar chart (drawn as SVG on the server, so it
needs no script). The date range and the ledger as CSV are ``quota.usage_report``'s, the pages of recent
requests ``quota.history``'s."""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args
from urllib.parse import urlencode

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aimichat.keys.service import KeyUse, use_by_key
from aimichat.quota import history
from aimichat.quota.history import KeyFilter, RequestPage
from aimichat.quota.ledger import use_by_model

# The date range and the CSV are the quota layer's (the admin API serves them too); the pages read them here.
from aimichat.quota.usage_report import MAX_RANGE_DAYS as MAX_RANGE_DAYS
from aimichat.quota.usage_report import BadRange as BadRange
from aimichat.quota.usage_report import ledger_csv as ledger_csv
from aimichat.quota.usage_report import parse_range as parse_range
from aimichat.quota.usage_report import spreadsheet_safe as spreadsheet_safe
from aimichat.quota.usage_report import use_by_day
from aimichat.store.models import ApiKey, UsageEvent

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
    value: int  # of the chart's metric
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
    for i, (day, value) in enumerate(series):
        # A day without use still gets a 1-unit stub, so every one of the days is visible.
        h = max(1.0, round(height * value / top_value, 2))
        bars.append(Bar(day, value, i * slot + 1, round(height - h, 2), slot - 2, h))
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


# -- per key over the chart's days ---------------------------------------------------------------

Metric = Literal["credits", "requests", "tokens"]
METRICS: tuple[Metric, ...] = get_args(Metric)
# What one and several of each are called: "1 credit", "1,204 tokens".
UNITS: dict[Metric, tuple[str, str]] = {
    "credits": ("credit", "credits"),
    "requests": ("request", "requests"),
    "tokens": ("token", "tokens"),
}


def amount(value: int, metric: Metric) -> str:
    """``value`` with its unit, as the chart's labels say it: "1 credit", "1,204 tokens"."""
    one, many = UNITS[metric]
    return f"{value:,} {one if value == 1 else many}"


@dataclass(frozen=True)
class Totals:
    """Credits, requests and tokens (prompt plus completion) of one day, one key or a whole window."""

    credits: int = 0
    requests: int = 0
    tokens: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.credits + other.credits, self.requests + other.requests, self.tokens + other.tokens)

    def of(self, metric: Metric) -> int:
        return {"credits": self.credits, "requests": self.requests, "tokens": self.tokens}[metric]


@dataclass(frozen=True)
class KeyHistory:
    """One key's use (``key_id`` None: the playground's) on each day of a window, oldest day first."""

    key_id: int | None
    name: str
    prefix: str | None
    revoked: bool
    days: list[tuple[dt.date, Totals]]

    @property
    def total(self) -> Totals:
        return sum((t for _, t in self.days), Totals())

    @property
    def choice(self) -> str:
        """Its value of the page's ``?key=`` parameter."""
        return PLAYGROUND if self.key_id is None else str(self.key_id)


PLAYGROUND: Final = "playground"


def days_ending(last_day: dt.date, days: int) -> list[dt.date]:
    """The ``days`` UTC days that end with ``last_day``, oldest first."""
    return [last_day - dt.timedelta(days=days - 1 - i) for i in range(days)]


def key_history(session: Session, account_id: int, last_day: dt.date, days: int) -> list[KeyHistory]:
    """Each key of the account over ``days`` UTC days ending with ``last_day``, in creation order, then the
    playground if it was used in them. Live keys are all listed (an unused one shows zeros); a revoked key is
    listed when it was used in the window, so what it spent before it was revoked stays explained."""
    window = days_ending(last_day, days)
    used: defaultdict[int | None, defaultdict[dt.date, Totals]] = defaultdict(lambda: defaultdict(Totals))
    for use in use_by_day(session, window[0], last_day, account_id):  # per day, key and model: summed over models
        tokens = use.prompt_tokens + use.completion_tokens
        used[use.key_id][use.day] += Totals(use.credits, use.requests, tokens)
    keys = session.execute(
        select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.revoked_at)
        .where(ApiKey.account_id == account_id)
        .order_by(ApiKey.id)
    ).all()
    result = [
        KeyHistory(key_id, name, prefix, revoked_at is not None, [(d, used[key_id][d]) for d in window])
        for key_id, name, prefix, revoked_at in keys
        if revoked_at is None or key_id in used
    ]
    if None in used:
        result.append(KeyHistory(None, "Playground", None, False, [(d, used[None][d]) for d in window]))
    return result


def all_keys(histories: list[KeyHistory], last_day: dt.date, days: int) -> list[tuple[dt.date, Totals]]:
    """The account's use per day: the sum of ``histories`` (zeros when there are none)."""
    summed = [(day, Totals()) for day in days_ending(last_day, days)]
    for h in histories:
        summed = [(day, total + t) for (day, total), (_, t) in zip(summed, h.days, strict=True)]
    return summed


# -- the page's query ----------------------------------------------------------------------------


class BadQuery(ValueError):
    """A /usage query parameter that cannot be served; the message says why (a 400)."""


# A ledger row's id in a page link: digits, and small enough for the database's integer column.
_ROW_ID = re.compile(r"[1-9][0-9]{0,9}")
_LARGEST_ID = 2**31 - 1


@dataclass(frozen=True)
class UsageQuery:
    """What /usage shows: the chart's metric, one key (or every key: None) and which page of requests."""

    metric: Metric = "credits"
    key: str | None = None  # a key's id, "playground", or None for every key
    before: int | None = None
    after: int | None = None

    def url(self, *, anchor: str = "", **changes: Any) -> str:
        """/usage with this query, ``changes`` applied; defaults are left out, so the plain page is "/usage"."""
        fields = {"metric": self.metric, "key": self.key, "before": self.before, "after": self.after, **changes}
        params = {k: v for k, v in fields.items() if v is not None and not (k == "metric" and v == "credits")}
        return "/usage" + (f"?{urlencode(params)}" if params else "") + (f"#{anchor}" if anchor else "")


def parse_query(metric: str | None, key: str | None, before: str | None, after: str | None) -> UsageQuery:
    """The page's parameters as typed in a URL; BadQuery names the one that is wrong. Empty means absent."""
    if key and key != PLAYGROUND and not (_ROW_ID.fullmatch(key) and int(key) <= _LARGEST_ID):
        raise BadQuery(f"'key' must be a key's id or '{PLAYGROUND}'.")
    if before and after:
        raise BadQuery("Give 'before' or 'after', not both.")
    return UsageQuery(_metric(metric), key or None, _row_id("before", before), _row_id("after", after))


def _metric(value: str | None) -> Metric:
    if not value:
        return "credits"
    for metric in METRICS:
        if value == metric:
            return metric
    raise BadQuery(f"'metric' must be one of {', '.join(METRICS)}.")


def _row_id(name: str, value: str | None) -> int | None:
    if not value:
        return None
    if not _ROW_ID.fullmatch(value) or int(value) > _LARGEST_ID:
        raise BadQuery(f"'{name}' must be the id of a request, as in the page's Older and Newer links.")
    return int(value)


# What a ledger row's status means to the person reading the requests table.
STATUS_WORDS = {"reserved": "Running", "charged": "Charged", "released": "Refunded"}


def status_word(status: str) -> str:
    return STATUS_WORDS.get(status, status)


# -- the history section and the recent requests, for one query ----------------------------------


@dataclass(frozen=True)
class HistoryView:
    """The 30-day section of /usage for a query: the keys, the one chosen (None: all), its days and chart,
    and the page of recent requests (of the chosen key, within the same days)."""

    query: UsageQuery
    keys: list[KeyHistory]
    chosen: KeyHistory | None
    days: list[tuple[dt.date, Totals]]  # oldest first
    chart: Chart
    requests: RequestPage
    metrics: tuple[Metric, ...] = field(default=METRICS)


def history_view(session: Session, account_id: int, last_day: dt.date, days: int, query: UsageQuery) -> HistoryView:
    """Everything the history section and the requests table show; BadQuery for a key that is not one of
    the account's listed keys or a page anchored on a request that is not the account's."""
    keys = key_history(session, account_id, last_day, days)
    chosen = _chosen(keys, query.key)
    series = chosen.days if chosen else all_keys(keys, last_day, days)
    key_filter: KeyFilter = None if chosen is None else (chosen.key_id if chosen.key_id is not None else PLAYGROUND)
    since = last_day - dt.timedelta(days=days - 1)
    try:
        page = history.request_page(session, account_id, since, key=key_filter, before=query.before, after=query.after)
    except history.UnknownCursor:
        raise BadQuery("That page of requests does not exist: start again from the newest.") from None
    chart = bar_chart([(day, t.of(query.metric)) for day, t in series])
    return HistoryView(query, keys, chosen, series, chart, page)


def _chosen(keys: list[KeyHistory], choice: str | None) -> KeyHistory | None:
    if choice is None:
        return None
    for k in keys:
        if k.choice == choice:
            return k
    raise BadQuery("No such key in your usage: choose one of the keys listed on the usage page.")
