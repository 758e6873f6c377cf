"""Sign-up, log-in and password change as plain functions over a database session.

Each returns the new session token (the caller sets it as the cookie) or raises :class:`Refused`
with a message fit for the person at the keyboard.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from functools import cache

from argon2 import PasswordHasher
from sqlalchemy.orm import Session

from aimichat.accounts import service as accounts
from aimichat.store.models import Account

from . import sessions, throttle


class Refused(Exception):
    """Sign-up, log-in or password change refused: ``message`` for the person, the HTTP ``status``, and
    ``retry_after`` seconds when throttled."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


def sign_up(
    session: Session,
    email: str,
    password: str,
    *,
    tier: str,
    now: dt.datetime,
    old_token: str | None = None,
    address: str = "unknown",
) -> tuple[Account, str]:
    """Create the account, counted against ``address``'s sign-up limit, and start its session."""
    wait = throttle.signup_retry_after(session, address, now)
    if wait:
        minutes = max(1, round(wait / 60))
        raise Refused(f"Too many new accounts from your address. Try again in {minutes} minutes.", 429, wait)
    try:
        account = accounts.create_account(session, email, password, tier=tier)
    except accounts.AccountError as exc:
        raise Refused(_sentence(str(exc))) from None
    throttle.record_signup(session, address, now)
    return account, sessions.start(session, account, now, replacing=old_token)


def log_in(
    session: Session, email: str, password: str, *, address: str, now: dt.datetime, old_token: str | None = None
) -> tuple[Account, str]:
    """Check the throttle, then the password; failures are committed even though we raise."""
    _check_throttle(session, email, address, now)
    account = _find(session, email)
    if account is None or not accounts.verify_password(account, password):
        _fail(session, email, address, now)
        raise Refused("Wrong email or password.")
    if account.disabled:
        raise Refused("This account is disabled. Contact the operator of this server.", 403)
    throttle.clear(session, email)
    return account, sessions.start(session, account, now, replacing=old_token)


def change_password(
    session: Session, account: Account, current: str, new: str, *, address: str, now: dt.datetime
) -> str:
    """Change the password and log out every other session (a thief's included); the new token is ours.

    ``account`` must be loaded in ``session`` (the web's visitor is: one session per request)."""
    _check_throttle(session, account.email, address, now)  # a stolen session must not become a password oracle
    if not accounts.verify_password(account, current):
        _fail(session, account.email, address, now)
        raise Refused("The current password is wrong.")
    try:
        accounts.change_password(session, account, current, new)
    except accounts.AccountError as exc:
        raise Refused(_sentence(str(exc))) from None
    sessions.end_all(session, account.id)
    return sessions.start(session, account, now)


def _check_throttle(session: Session, email: str, address: str, now: dt.datetime) -> None:
    wait = throttle.retry_after(session, email, address, now)
    if wait:
        minutes = max(1, round(wait / 60))
        raise Refused(
            f"Too many failed log-in attempts for this email or from your network. "
            f"Wait {minutes} minute{'s' if minutes != 1 else ''} and try again.",
            429,
            retry_after=wait,
        )


def _fail(session: Session, email: str, address: str, now: dt.datetime) -> None:
    throttle.record_failure(session, email, address, now)
    session.commit()  # the caller rolls back on Refused; the failure must count anyway


def _find(session: Session, email: str) -> Account | None:
    try:
        return accounts.get_account(session, email)
    except accounts.AccountError:
        # Spend the time a real check takes, so timing does not tell which emails have accounts.
        _burn()
        return None


def _burn() -> None:
    with contextlib.suppress(Exception):  # always a mismatch: we only want the time it takes
        _dummy_hasher().verify(_dummy_hash(), "not the password")


@cache
def _dummy_hasher() -> PasswordHasher:
    return PasswordHasher()


@cache
def _dummy_hash() -> str:
    return _dummy_hasher().hash("a password nobody has")


def _sentence(message: str) -> str:
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
