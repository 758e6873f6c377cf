"""The single-use tokens of emailed links: confirm an email address, reset a password.

A token is 256 random bits; the ``email_tokens`` table keeps only its SHA-256 (``keys.tokens.hash_key``), so a
copy of the database holds no usable link, and a token is found by its hash (timing an index lookup tells an
attacker about hashes, not tokens). Spending one is a single conditional UPDATE, so two replicas (or two clicks)
cannot both spend it. The rows also count the mails sent to an account, which is what throttles them.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from aimichat.keys.tokens import hash_key
from aimichat.store.models import EmailToken

Purpose = Literal["verify", "reset"]
VERIFY: Purpose = "verify"
RESET: Purpose = "reset"
LIFETIME: dict[Purpose, dt.timedelta] = {VERIFY: dt.timedelta(hours=24), RESET: dt.timedelta(hours=1)}
SEND_WINDOW = dt.timedelta(hours=1)
MAX_SENDS = 3  # links of one purpose mailed to one account within SEND_WINDOW
KEEP = dt.timedelta(days=1)  # a spent or expired token is kept this long, so its link can say why it fails
MAX_TOKEN_LEN = 128


class LinkRefused(Exception):
    """The link's token is unknown, spent or expired: ``message`` says which, for the person who clicked."""

    def __init__(self, message: str, reason: Literal["unknown", "used", "expired"]) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


def issue(session: Session, account_id: int, purpose: Purpose, now: dt.datetime) -> str:
    """A new token for ``account_id``'s link; the caller commits before mailing it."""
    session.execute(delete(EmailToken).where(EmailToken.expires_at <= now - KEEP))
    token = secrets.token_urlsafe(32)
    session.add(
        EmailToken(
            token_hash=hash_key(token),
            account_id=account_id,
            purpose=purpose,
            created_at=now,
            expires_at=now + LIFETIME[purpose],
        )
    )
    session.flush()
    return token


def send_retry_after(session: Session, account_id: int, purpose: Purpose, now: dt.datetime) -> int | None:
    """Seconds until another link of ``purpose`` may be mailed to the account, or None when one may be now."""
    recent = session.scalars(
        select(EmailToken.created_at)
        .where(
            EmailToken.account_id == account_id,
            EmailToken.purpose == purpose,
            EmailToken.created_at > now - SEND_WINDOW,
        )
        .order_by(EmailToken.created_at.desc())
        .limit(MAX_SENDS)
    ).all()
    if len(recent) < MAX_SENDS:
        return None
    return max(1, int((recent[-1] + SEND_WINDOW - now).total_seconds() + 0.999))


def check(session: Session, token: str, purpose: Purpose, now: dt.datetime) -> int:
    """The account a live token belongs to, without spending it (the page the link opens); LinkRefused if none."""
    return _live(_find(session, token, purpose), now).account_id


def spend(session: Session, token: str, purpose: Purpose, now: dt.datetime) -> int:
    """Spend a live token: the account it belongs to. LinkRefused if it is unknown, spent or expired."""
    spent = 0
    if token and len(token) <= MAX_TOKEN_LEN:
        result = session.execute(
            update(EmailToken)
            .where(
                EmailToken.token_hash == hash_key(token),
                EmailToken.purpose == purpose,
                EmailToken.used_at.is_(None),
                EmailToken.expires_at > now,
            )
            .values(used_at=now)
        )
        spent = cast("CursorResult[Any]", result).rowcount
    row = _find(session, token, purpose)
    if spent != 1 or row is None:
        _live(row, now)  # it was not live, or another request spent it first: this says why
        raise LinkRefused(USED, "used")
    return row.account_id


def void(session: Session, account_id: int, purpose: Purpose, now: dt.datetime) -> None:
    """Spend every live token of ``purpose`` of the account (its other links stop working)."""
    session.execute(
        update(EmailToken)
        .where(EmailToken.account_id == account_id, EmailToken.purpose == purpose, EmailToken.used_at.is_(None))
        .values(used_at=now)
    )


def _find(session: Session, token: str, purpose: Purpose) -> EmailToken | None:
    if not token or len(token) > MAX_TOKEN_LEN:
        return None
    query = select(EmailToken).where(EmailToken.token_hash == hash_key(token))
    row = session.scalar(query.execution_options(populate_existing=True))  # as the UPDATE above left it
    return row if row is not None and row.purpose == purpose else None


UNKNOWN = "This link is not valid: it may be mistyped or cut short. Open the whole link from the email."
USED = "This link was used already: each link works once."
EXPIRED = "This link has expired."


def _live(row: EmailToken | None, now: dt.datetime) -> EmailToken:
    if row is None:
        raise LinkRefused(UNKNOWN, "unknown")
    if row.used_at is not None:
        raise LinkRefused(USED, "used")
    if row.expires_at <= now:
        raise LinkRefused(EXPIRED, "expired")
    return row
