"""Sending the queued deliveries: claim the due ones, send each, record how it went.

A replica claims a due delivery with a conditional UPDATE (still pending, due, and unclaimed or its claim
lapsed) that sets ``claimed_until``: of two replicas, only one UPDATE matches, so one replica at a time
tries a delivery (PostgreSQL's ``FOR UPDATE SKIP LOCKED`` also keeps them from queueing on each other's
rows). A claim lapses after ``LEASE``, so a replica killed mid-send leaves the row to another.

An attempt has a total deadline (the webhook timeout, or ``MAIL_DEADLINE``), well inside ``LEASE``: a
receiver that answers a byte at a time, or a mail server that takes its time at every step, cannot keep
the claim past its lease. The outcome is written only while this replica's claim still holds (the same
``claimed_until`` and attempt), so a replica that lost its claim never overwrites another's.

A failure (no answer within the deadline, an answer other than 2xx, a refused mail) is recorded with its
reason and retried after ``base`` seconds, then 4 times longer each time: 8 attempts over about 5.7 hours
with the default 5 s. A receiver should therefore deduplicate on ``webhook-id``: an answer lost on the
way back means the same event comes again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.orm import Session

from aimichat.mail import Mailer, MailError
from aimichat.store.models import Account, AlertDelivery, WebhookEndpoint

from . import signing, urls

MAX_DEADLINE = 30.0  # the longest webhook timeout the settings accept (config.Settings.webhook_timeout)
MAIL_DEADLINE = 30.0  # seconds for a whole mail (aiosmtplib's own timeout is per step)
# Twice the longest attempt: what is left covers recording it, and a replica paused for a while.
LEASE = dt.timedelta(seconds=2 * max(MAX_DEADLINE, MAIL_DEADLINE))
MAX_ATTEMPTS = 8
BATCH = 20


@dataclass(frozen=True)
class Claimed:
    """A delivery this replica may now try, with what sending it needs."""

    id: int
    channel: str
    event_id: str
    body: str
    url: str | None  # webhook
    secret: str | None  # webhook
    to: str  # the account's address (email)
    attempt: int  # this one's number (1 for the first)
    claimed_until: dt.datetime  # this replica's claim: the outcome is written only while it holds


def backoff(attempts: int, base: float) -> dt.timedelta:
    """The pause after the ``attempts``-th failed attempt."""
    return dt.timedelta(seconds=base * 4 ** (attempts - 1))


def _due(now: dt.datetime) -> Any:
    return (
        (AlertDelivery.status == "pending")
        & (AlertDelivery.next_attempt_at <= now)
        & or_(AlertDelivery.claimed_until.is_(None), AlertDelivery.claimed_until < now)
    )


def claim_due(session: Session, now: dt.datetime, limit: int = BATCH) -> list[Claimed]:
    """Claim up to ``limit`` due deliveries for this replica; the caller commits before sending them."""
    candidates = session.scalars(
        select(AlertDelivery.id)
        .where(_due(now))
        .order_by(AlertDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer anyway
    ).all()
    until = now + LEASE
    won = []
    for delivery_id in candidates:
        claim = (
            update(AlertDelivery)
            .where(AlertDelivery.id == delivery_id, _due(now))
            .values(claimed_until=until, attempts=AlertDelivery.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        if cast("CursorResult[Any]", session.execute(claim)).rowcount == 1:
            won.append(delivery_id)
    if not won:
        return []
    rows = session.execute(
        select(
            AlertDelivery.id,
            AlertDelivery.channel,
            AlertDelivery.event_id,
            AlertDelivery.body,
            AlertDelivery.attempts,
            WebhookEndpoint.url,
            WebhookEndpoint.secret,
            Account.email,
        )
        .join(Account, Account.id == AlertDelivery.account_id)
        .outerjoin(WebhookEndpoint, WebhookEndpoint.id == AlertDelivery.endpoint_id)
        .where(AlertDelivery.id.in_(won))
        .order_by(AlertDelivery.id)
    ).all()
    return [
        Claimed(row.id, row.channel, row.event_id, row.body, row.url, row.secret, row.email, row.attempts, until)
        for row in rows
    ]


def record(session: Session, claimed: Claimed, error: str | None, now: dt.datetime, retry_base: float) -> bool:
    """Record one attempt: sent (``error`` None), or failed and due again after the backoff, or given up
    after the last. Only while this replica's claim holds: False when it lapsed and another replica
    claimed the delivery since (its outcome is that replica's to write), or the row is gone."""
    values: dict[str, Any] = {"claimed_until": None}
    if error is None:
        values |= {"status": "sent", "sent_at": now, "last_error": None}
    else:
        values["last_error"] = error[:500]
        if claimed.attempt >= MAX_ATTEMPTS:
            values["status"] = "failed"
        else:
            values["next_attempt_at"] = now + backoff(claimed.attempt, retry_base)
    outcome = (
        update(AlertDelivery)
        .where(
            AlertDelivery.id == claimed.id,
            AlertDelivery.status == "pending",
            AlertDelivery.claimed_until == claimed.claimed_until,
            AlertDelivery.attempts == claimed.attempt,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return cast("CursorResult[Any]", session.execute(outcome)).rowcount == 1


def deadline_of(claimed: Claimed, webhook_timeout: float) -> float:
    """Seconds the whole attempt may take."""
    return webhook_timeout if claimed.channel == "webhook" else MAIL_DEADLINE


async def send(
    claimed: Claimed,
    client: httpx.AsyncClient,
    mailer: Mailer | None,
    *,
    timestamp: int,
    allow_private: bool,
    deadline: float,
) -> str | None:
    """Try one delivery within ``deadline`` seconds in all: None when it was accepted, else why not (kept as
    ``last_error``)."""
    try:
        async with asyncio.timeout(deadline):
            if claimed.channel == "webhook":
                return await _post(claimed, client, timestamp, allow_private)
            return await _mail(claimed, mailer)
    except TimeoutError:
        return f"no answer within {deadline:g} s"


async def _post(claimed: Claimed, client: httpx.AsyncClient, timestamp: int, allow_private: bool) -> str | None:
    if claimed.url is None or claimed.secret is None:
        return "the endpoint was removed"
    try:
        # Again at each attempt (the name may point somewhere else by now), and the post goes to the
        # address checked here: no second lookup on connect.
        target = await asyncio.to_thread(urls.pinned, claimed.url, allow_private)
    except urls.BadWebhookUrl as exc:
        return str(exc)
    headers = signing.headers(claimed.secret, claimed.event_id, timestamp, claimed.body) | target.headers
    request = client.build_request(
        "POST", target.url, content=claimed.body.encode(), headers=headers, extensions=target.extensions
    )
    try:
        # Streamed, and the body never read: the status line is the answer, and a receiver's body (endless,
        # or huge) costs nothing. Closing the stream closes the connection.
        answer = await client.send(request, stream=True)
        await answer.aclose()
    except httpx.TimeoutException:
        return "no answer within the timeout"
    except httpx.HTTPError as exc:
        return f"could not deliver: {type(exc).__name__}"
    if 200 <= answer.status_code < 300:
        return None
    return f"the receiver answered HTTP {answer.status_code}"  # 3xx too: redirects are not followed


async def _mail(claimed: Claimed, mailer: Mailer | None) -> str | None:
    if mailer is None:
        return "email is not set up on this server"
    mail = json.loads(claimed.body)
    try:
        await mailer.send(claimed.to, mail["subject"], mail["text"])
    except MailError as exc:
        return f"the mail server refused it: {exc}"
    return None
