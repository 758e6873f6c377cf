"""Log-in and sign-up throttling, counted in the ``login_attempts`` table (a row per failed log-in or sign-up).

Failed log-ins, each a row with the email tried and the client address, within ``WINDOW`` (15 minutes):

- **per address**: after ``MAX_FAILURES`` (10) from one address, for any emails, log-ins from that address
  wait. That stops one client trying a password against many accounts, or many passwords against one.
- **per email**: after ``MAX_EMAIL_FAILURES`` (30) for one email, from any number of addresses, log-ins to
  that email wait, but only in browsers that have never logged in to it. That stops a guessing run spread
  over many addresses. One address alone never gets there: it is stopped at 10.
- **per known device**: a browser that has logged in to the account before (its signed cookie, see
  ``devices.py``) is held back by neither rule, only by its own failures (``MAX_FAILURES``). Failures from
  elsewhere cannot lock the owner out, and a stolen copy of the cookie is no licence to guess.

The wait lasts until the oldest counted failure leaves the window. Refused tries are not counted, so nobody
waits longer than the window. A success forgives that browser's failures for that email (those from its
address, and those made with its device cookie), never those from elsewhere.

Sign-ups: at most ``MAX_SIGNUPS`` (10) from one address within ``SIGNUP_WINDOW`` (an hour), whether the
email was free or not (each account is free credits; and the count must not tell taken emails apart).

Rows that are not failed log-ins carry a marker instead of an email: ``#signup``, or ``#device:`` and the
device's id (a failure from a known device is two rows: the usual one, and the device's). No email key
starts with ``#`` (see :func:`email_key`), so nothing typed into the form can count as a marker.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ColumnElement, delete, or_, select
from sqlalchemy.orm import Session

from aimichat.store.models import LoginAttempt

WINDOW = dt.timedelta(minutes=15)
MAX_FAILURES = 10  # per address, and per known device
MAX_EMAIL_FAILURES = 3 * MAX_FAILURES  # per email, for browsers that are not known devices of its account
SIGNUP_WINDOW = dt.timedelta(hours=1)
MAX_SIGNUPS = 10  # per address

SIGNUP = "#signup"  # marks sign-up rows, which count per address apart from failed log-ins
_DEVICE = "#device:"


def email_key(email: str) -> str:
    key = email.strip().lower()[:319]
    return "!" + key if key.startswith("#") else key  # never a marker


def device_key(device: str) -> str:
    return _DEVICE + device[:64]


def _address(address: str) -> ColumnElement[bool]:
    return LoginAttempt.address == address[:64]


_LOG_IN = ~LoginAttempt.email.startswith("#")  # a failed log-in's own row (not a marker)


def retry_after(
    session: Session, email: str, address: str, now: dt.datetime, *, device: str | None = None
) -> int | None:
    """Seconds until a log-in to ``email`` may be tried again, or None when it may be tried now.

    ``device`` is the browser's known-device id for that email's account (see ``devices.py``), if it has one.
    """
    if device is not None:
        return _wait(session, LoginAttempt.email == device_key(device), now, MAX_FAILURES) or None
    waits = [
        _wait(session, _address(address) & _LOG_IN, now, MAX_FAILURES),
        _wait(session, LoginAttempt.email == email_key(email), now, MAX_EMAIL_FAILURES),
    ]
    return max(waits) or None


def _wait(
    session: Session, who: ColumnElement[bool], now: dt.datetime, limit: int, window: dt.timedelta = WINDOW
) -> int:
    recent = session.scalars(
        select(LoginAttempt.created_at)
        .where(who, LoginAttempt.created_at > now - window)
        .order_by(LoginAttempt.created_at.desc())
        .limit(limit)
    ).all()
    if len(recent) < limit:
        return 0
    # Free again when the oldest of the last ``limit`` rows is older than the window.
    return max(1, int((recent[-1] + window - now).total_seconds() + 0.999))


def record_failure(session: Session, email: str, address: str, now: dt.datetime, *, device: str | None = None) -> None:
    _prune(session, now)
    session.add(LoginAttempt(email=email_key(email), address=address[:64], created_at=now))
    if device is not None:
        session.add(LoginAttempt(email=device_key(device), address=address[:64], created_at=now))
    session.flush()


def _prune(session: Session, now: dt.datetime) -> None:
    # Rows outside their window count for nothing; dropping them here keeps the table small.
    session.execute(
        delete(LoginAttempt).where(
            or_(
                LoginAttempt.created_at <= now - SIGNUP_WINDOW,
                (LoginAttempt.created_at <= now - WINDOW) & (LoginAttempt.email != SIGNUP),
            )
        )
    )


def clear(session: Session, email: str, address: str, *, device: str | None = None) -> None:
    """A successful log-in forgives that browser's failures for that email: those from its address and
    those made with its device cookie. Not the email's failures from elsewhere (a guessing run goes on
    counting while the owner logs in), nor the address's for other emails (one's own account must not
    reset a counter that guards everybody else's)."""
    session.execute(delete(LoginAttempt).where(LoginAttempt.email == email_key(email), _address(address)))
    if device is not None:
        session.execute(delete(LoginAttempt).where(LoginAttempt.email == device_key(device)))


def signup_retry_after(session: Session, address: str, now: dt.datetime) -> int | None:
    """Seconds until ``address`` may sign up again, or None."""
    who = (LoginAttempt.email == SIGNUP) & _address(address)
    return _wait(session, who, now, MAX_SIGNUPS, SIGNUP_WINDOW) or None


def record_signup(session: Session, address: str, now: dt.datetime) -> None:
    _prune(session, now)
    session.add(LoginAttempt(email=SIGNUP, address=address[:64], created_at=now))
    session.flush()
