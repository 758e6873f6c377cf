"""Usage alerts and webhook endpoints: plain functions over a session, for the pages, the CLI and the admin API.

An alert is decided in the database: crossing a threshold inserts one ``usage_alerts`` row, unique per
(account, key, period, period start, percent). Whichever replica's INSERT lands queues the alert's
deliveries in the same transaction; every other replica that saw the same crossing inserts nothing and
queues nothing. So an alert goes out at most once per threshold per period, however many replicas saw it.

An allotment is at 100% when its use reaches it, or when a request was refused because what remains of it
could not pay for that request (a price of 3 stops a 100-credit day at 99): the refusal names it spent.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from aimichat.quota import ledger, periods
from aimichat.quota.ledger import Refusal
from aimichat.store.clock import iso_utc
from aimichat.store.models import Account, AlertDelivery, AlertSettings, ApiKey, UsageAlert, WebhookEndpoint

from . import signing, urls

DEFAULT_PERCENTS = (80, 100)
MAX_PERCENTS = 5
MAX_ENDPOINTS = 5
RECENT_DELIVERIES = 20
TESTS_PER_MINUTE = 3  # test events an account may send: each may hold a sender for its whole deadline

Period = Literal["day", "month"]
Channel = Literal["email", "webhook"]


# -- thresholds ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertConfig:
    """When an account is alerted (percent of each allotment: the account's day and month, each key's caps)
    and whether by email too (webhooks always, to every endpoint)."""

    percents: tuple[int, ...] = DEFAULT_PERCENTS
    email: bool = True


def parse_percents(text: str) -> tuple[int, ...]:
    """``"80, 100"`` -> (80, 100); ``""`` turns alerts off. ValueError with a message for people."""
    values: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip().removesuffix("%").strip()
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"{part!r} is not a whole percentage")
        values.add(int(part))
    return check_percents(values)


def check_percents(percents: Iterable[int]) -> tuple[int, ...]:
    values = tuple(sorted(set(percents)))
    if any(not 1 <= p <= 100 for p in values):
        raise ValueError("thresholds are percentages from 1 to 100")
    if len(values) > MAX_PERCENTS:
        raise ValueError(f"at most {MAX_PERCENTS} thresholds")
    return values


def alert_config(session: Session, account_id: int) -> AlertConfig:
    row = session.get(AlertSettings, account_id)
    if row is None:
        return AlertConfig()
    return AlertConfig(tuple(row.percents), row.email)


def set_alert_config(
    session: Session,
    account_id: int,
    now: dt.datetime,
    *,
    percents: Sequence[int] | None = None,
    email: bool | None = None,
) -> AlertConfig:
    """Change an account's thresholds and/or email choice (None: keep); what the admin API calls too."""
    if session.get(Account, account_id) is None:
        raise ValueError(f"no account with id {account_id}")
    current = alert_config(session, account_id)
    config = AlertConfig(
        check_percents(percents) if percents is not None else current.percents,
        email if email is not None else current.email,
    )
    # One statement that inserts or updates: two first saves at once would otherwise both INSERT the
    # primary key. Only what was given is changed when the row is there (by then, maybe another's save).
    given: dict[str, Any] = {"updated_at": now}
    if percents is not None:
        given["percents"] = list(config.percents)
    if email is not None:
        given["email"] = config.email
    upsert = _insert(session)(AlertSettings).values(
        account_id=account_id, percents=list(config.percents), email=config.email, updated_at=now
    )
    session.execute(upsert.on_conflict_do_update(index_elements=[AlertSettings.account_id], set_=given))
    row = session.get(AlertSettings, account_id, populate_existing=True)  # as the statement left it
    assert row is not None
    return AlertConfig(tuple(row.percents), row.email)


def _insert(session: Session) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (PostgreSQL and SQLite alike)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# -- webhook endpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedEndpoint:
    endpoint: WebhookEndpoint
    secret: str  # shown once, on the page that made it


def add_endpoint(
    session: Session, account_id: int, url: str, now: dt.datetime, *, allow_private: bool = False
) -> CreatedEndpoint:
    """A new endpoint with a new secret; ``urls.BadWebhookUrl`` (a ValueError) for a URL refused."""
    url = urls.check_url(url, allow_private)
    if len(list_endpoints(session, account_id)) >= MAX_ENDPOINTS:
        raise ValueError(f"at most {MAX_ENDPOINTS} webhook endpoints; remove one first")
    secret = signing.new_secret()
    endpoint = WebhookEndpoint(account_id=account_id, url=url, secret=secret, created_at=now)
    session.add(endpoint)
    session.flush()
    return CreatedEndpoint(endpoint, secret)


def list_endpoints(session: Session, account_id: int) -> list[WebhookEndpoint]:
    query = select(WebhookEndpoint).where(WebhookEndpoint.account_id == account_id).order_by(WebhookEndpoint.id)
    return list(session.scalars(query))


def remove_endpoint(session: Session, account_id: int, endpoint_id: int) -> None:
    """Remove one of the account's endpoints and its deliveries; LookupError if it has none of that id."""
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.account_id != account_id:
        raise LookupError(f"no webhook endpoint with id {endpoint_id}")
    session.execute(delete(AlertDelivery).where(AlertDelivery.endpoint_id == endpoint_id))
    session.delete(endpoint)
    session.flush()


def recent_deliveries(session: Session, account_id: int, limit: int = RECENT_DELIVERIES) -> list[AlertDelivery]:
    query = (
        select(AlertDelivery)
        .where(AlertDelivery.account_id == account_id)
        .order_by(AlertDelivery.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


# -- events and their deliveries -----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """What happened, as a webhook carries it (``type``, ``timestamp``, ``data``) and as a mail tells it."""

    type: str
    data: dict[str, Any]
    subject: str
    text: str
    timestamp: dt.datetime

    def body(self) -> str:
        payload = {"type": self.type, "timestamp": iso_utc(self.timestamp), "data": self.data}
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def queue_event(
    session: Session,
    account_id: int,
    event: Event,
    now: dt.datetime,
    *,
    email: bool,
    endpoint_id: int | None = None,
) -> int:
    """Queue ``event`` to every webhook endpoint of the account (or only ``endpoint_id``) and, with
    ``email``, to its address; the deliveries queued. The caller commits; the worker sends."""
    event_id = "msg_" + secrets.token_hex(12)
    endpoints = [e for e in list_endpoints(session, account_id) if endpoint_id in (None, e.id)]
    rows = [
        AlertDelivery(
            account_id=account_id,
            event_id=event_id,
            event_type=event.type,
            body=event.body(),
            channel="webhook",
            endpoint_id=endpoint.id,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        for endpoint in endpoints
    ]
    if email:
        mail = json.dumps({"subject": event.subject, "text": event.text}, ensure_ascii=False)
        rows.append(
            AlertDelivery(
                account_id=account_id,
                event_id=event_id,
                event_type=event.type,
                body=mail,
                channel="email",
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.add_all(rows)
    session.flush()
    return len(rows)


def test_retry_after(session: Session, account_id: int, now: dt.datetime) -> int | None:
    """Seconds until the account may send another test event, or None when it may now (counted in the
    database, so across every replica)."""
    recent = session.scalars(
        select(AlertDelivery.created_at)
        .where(
            AlertDelivery.account_id == account_id,
            AlertDelivery.event_type == "test",
            AlertDelivery.created_at > now - dt.timedelta(minutes=1),
        )
        .order_by(AlertDelivery.created_at.desc())
        .limit(TESTS_PER_MINUTE)
    ).all()
    if len(recent) < TESTS_PER_MINUTE:
        return None
    return max(1, math.ceil((recent[-1] + dt.timedelta(minutes=1) - now).total_seconds()))


def test_event(now: dt.datetime) -> Event:
    return Event(
        "test",
        {"message": "A test event from AimiChat: your endpoint receives and verifies our webhooks."},
        subject="AimiChat test event",
        text="A test event from AimiChat.",
        timestamp=now,
    )


# -- usage thresholds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Allotment:
    """One allotment an account's use counts against: its own day or month, or one key's cap."""

    key_id: int  # 0: the account's
    key_name: str | None
    period: Period
    start: dt.date
    used: int
    limit: int
    resets_at: dt.datetime
    spent: bool = False  # a request was refused because what remains could not pay for it: at 100%

    def crossed(self, percents: Iterable[int]) -> list[int]:
        if self.spent:
            return list(percents)
        return [p for p in percents if self.limit > 0 and self.used * 100 >= p * self.limit]

    def next_at(self, percents: Iterable[int]) -> int | None:
        """The use at which the next threshold not yet crossed is crossed (None: none left)."""
        if self.spent:
            return None
        ahead = [math.ceil(p * self.limit / 100) for p in percents if self.used * 100 < p * self.limit]
        return min(ahead, default=None)


@dataclass(frozen=True)
class Spent:
    """An allotment a refusal found spent: the account's (``key_id`` 0) or a key's cap, ``period``, and when
    it resets (which names the period it was spent in: a refusal heard of after a reset spends nothing)."""

    key_id: int
    period: Period
    resets_at: dt.datetime


def spent_by(key_id: int | None, refusal: Refusal) -> Spent | None:
    """The allotment ``refusal`` found too low to pay for its request; None for a per-minute rate limit."""
    if refusal.period in ("day", "month"):
        return Spent(0, refusal.period, refusal.reset_at)
    if refusal.period in ("key_day", "key_month") and key_id is not None:
        return Spent(key_id, "day" if refusal.period == "key_day" else "month", refusal.reset_at)
    return None


def allotments(session: Session, account_id: int, key_ids: Iterable[int], now: dt.datetime) -> list[Allotment]:
    """Where the account stands in each of its allotments, and each of ``key_ids``' caps, from the ledger."""
    account = session.get(Account, account_id)
    if account is None:
        return []
    day, month = periods.day_start(now), periods.month_start(now)
    day_reset, month_reset = periods.next_day_reset(now), periods.next_month_reset(now)
    tier = account.tier
    found = [
        Allotment(0, None, "day", day, ledger.ledger_sum(session, account_id, day, day), tier.daily_credits, day_reset)
    ]
    if tier.monthly_credits is not None:
        used = ledger.ledger_sum(session, account_id, month, day)
        found.append(Allotment(0, None, "month", month, used, tier.monthly_credits, month_reset))
    for key_id in sorted(set(key_ids) - {0}):
        key = session.get(ApiKey, key_id)
        if key is None or key.account_id != account_id:
            continue
        if key.daily_cap is not None:
            used = ledger.key_ledger_sum(session, key_id, day, day)
            found.append(Allotment(key_id, key.name, "day", day, used, key.daily_cap, day_reset))
        if key.monthly_cap is not None:
            used = ledger.key_ledger_sum(session, key_id, month, day)
            found.append(Allotment(key_id, key.name, "month", month, used, key.monthly_cap, month_reset))
    return found


@dataclass(frozen=True)
class Check:
    """What one check of an account found: the alerts it sent (won), and where every allotment stands."""

    sent: list[UsageAlert]
    allotments: list[Allotment]
    percents: tuple[int, ...]


def check_usage(
    session: Session,
    account_id: int,
    key_ids: Iterable[int],
    now: dt.datetime,
    *,
    email: bool,
    spent: Iterable[Spent] = (),
) -> Check:
    """Queue an alert for each threshold the account (or one of ``key_ids``' caps) has crossed and that was
    not sent yet this period; ``email``: whether mail can be sent at all; ``spent``: allotments refusals
    found spent (every threshold crossed). The caller commits."""
    config = alert_config(session, account_id)
    gone = set(spent)
    standing = [
        replace(a, spent=True) if Spent(a.key_id, a.period, a.resets_at) in gone else a
        for a in allotments(session, account_id, key_ids, now)
    ]
    sent: list[UsageAlert] = []
    account = session.get(Account, account_id)
    for allotment in standing:
        for percent in allotment.crossed(config.percents):
            alert = _claim(session, account_id, allotment, percent, now)
            if alert is not None and account is not None:
                queue_event(
                    session,
                    account_id,
                    usage_event(account, allotment, percent, now),
                    now,
                    email=email and config.email,
                )
                sent.append(alert)
    return Check(sent, standing, config.percents)


def _claim(
    session: Session, account_id: int, allotment: Allotment, percent: int, now: dt.datetime
) -> UsageAlert | None:
    """Insert the alert's row unless it is there already: the row when this call inserted it, else None.

    ON CONFLICT DO NOTHING: on PostgreSQL a second transaction inserting the same row waits for the first
    to commit, then inserts nothing; SQLite runs one writer at a time. Either way one INSERT wins."""
    upsert = _insert(session)
    values = {
        "account_id": account_id,
        "key_id": allotment.key_id,
        "period": allotment.period,
        "period_start": allotment.start,
        "percent": percent,
        "used": allotment.used,
        "allotment": allotment.limit,
        "created_at": now,
    }
    inserted = session.execute(
        upsert(UsageAlert).values(**values).on_conflict_do_nothing().returning(UsageAlert.id)
    ).scalar()
    return None if inserted is None else session.get(UsageAlert, inserted)


def usage_event(account: Account, allotment: Allotment, percent: int, now: dt.datetime) -> Event:
    period = "daily" if allotment.period == "day" else "monthly"
    whose = f"key “{allotment.key_name}”'s {period} cap" if allotment.key_id else f"{period} credits"
    subject = f"AimiChat: {percent}% of your {whose} used"
    text = (
        f"Your AimiChat account {account.email} has used {allotment.used:,} of {allotment.limit:,} "
        f"{whose.removesuffix(' credits')} credits ({percent}% threshold) in the period that started on "
        f"{allotment.start.isoformat()}.\n"
        f"It resets at {iso_utc(allotment.resets_at)}.\n"
        + ("Requests are refused until then.\n" if allotment.spent or allotment.used >= allotment.limit else "")
        + "\nChange these alerts on the usage page of your account."
    )
    data = {
        "account_id": account.id,
        "scope": "key" if allotment.key_id else "account",
        "key_id": allotment.key_id or None,
        "key_name": allotment.key_name,
        "period": allotment.period,
        "period_start": allotment.start.isoformat(),
        "threshold_percent": percent,
        "used": allotment.used,
        "limit": allotment.limit,
        "resets_at": iso_utc(allotment.resets_at),
    }
    return Event("usage.threshold_crossed", data, subject=subject, text=text, timestamp=now)
