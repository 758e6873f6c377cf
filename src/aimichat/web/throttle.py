"""Log-in throttling: after ``MAX_FAILURES`` failed log-ins within ``WINDOW`` for one email or from one
client address, further tries are refused (429) until the oldest counted failure leaves the window.

Counting per email stops a guessing run against one account from many addresses; counting per address
stops one client from trying a password against many accounts. Refused tries are not counted, so a
locked-out person is never locked out for longer than the window.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session

from aimichat.store.models import LoginAttempt

WINDOW = dt.timedelta(minutes=15)
MAX_FAILURES = 10


def email_key(email: str) -> str:
    return email.strip().lower()[:320]


SIGNUP = "#signup"  # marks sign-up rows, which count per address apart from failed log-ins


def retry_after(session: Session, email: str, address: str, now: dt.datetime) -> int | None:
    """Seconds until a log-in may be tried again, or None when it may be tried now."""
    by_address = (LoginAttempt.address == address[:64]) & (LoginAttempt.email != SIGNUP)
    waits = [_wait(session, LoginAttempt.email == email_key(email), now), _wait(session, by_address, now)]
    return max(waits) or None


def _wait(session: Session, who: ColumnElement[bool], now: dt.datetime) -> int:
    recent = session.scalars(
        select(LoginAttempt.created_at)
        .where(who, LoginAttempt.created_at > now - WINDOW)
        .order_by(LoginAttempt.created_at.desc())
        .limit(MAX_FAILURES)
    ).all()
    if len(recent) < MAX_FAILURES:
        return 0
    # Free again when the oldest of the last MAX_FAILURES failures is older than the window.
    return max(1, int((recent[-1] + WINDOW - now).total_seconds() + 0.999))


def record_failure(session: Session, email: str, address: str, now: dt.datetime) -> None:
    # Rows outside the window count for nothing; dropping them here keeps the table small.
    session.execute(delete(LoginAttempt).where(LoginAttempt.created_at <= now - WINDOW))
    session.add(LoginAttempt(email=email_key(email), address=address[:64], created_at=now))
    session.flush()


def clear(session: Session, email: str) -> None:
    """A successful log-in forgives that email's failures (not the address's: one own account must
    not reset a counter that guards everybody else's)."""
    session.execute(delete(LoginAttempt).where(LoginAttempt.email == email_key(email)))


def signup_retry_after(session: Session, address: str, now: dt.datetime) -> int | None:
    """Sign-ups from one address are limited like failed log-ins: each account is free credits."""
    return _wait(session, (LoginAttempt.email == SIGNUP) & (LoginAttempt.address == address[:64]), now) or None


def record_signup(session: Session, address: str, now: dt.datetime) -> None:
    record_failure(session, SIGNUP, address, now)
