"""Sign-up, log-in and password change as plain functions over a database session.

Each returns the new session token (the caller sets it as the cookie) or raises :class:`Refused`
with a message fit for the person at the keyboard.
"""

from __future__ import annotations

import datetime as dt
from functools import cache

from argon2 import PasswordHasher
from sqlalchemy.orm import Session

from aimichat.accounts import service as accounts
from aimichat.store.models import Account

from . import sessions, throttle


class Refused(Exception):
    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


def sign_up(db: Session, email: str, password: str, *, tier: str, now: dt.datetime, old_token: str | None = None,
            address: str = "unknown") -> tuple[Account, str]:
    wait = throttle.signup_retry_after(db, address, now)
    if wait:
        raise Refused(f"Too many new accounts from your address. Try again in {max(1, round(wait / 60))} minutes.", 429, wait)
    try:
        account = accounts.create_account(db, email, password, tier=tier)
    except accounts.AccountError as exc:
        raise Refused(_sentence(str(exc))) from None
    throttle.record_signup(db, address, now)
    return account, sessions.start(db, account, now, replacing=old_token)


def log_in(db: Session, email: str, password: str, *, address: str, now: dt.datetime, old_token: str | None = None) -> tuple[Account, str]:
    """Check the throttle, then the password; failures are committed even though we raise."""
    _check_throttle(db, email, address, now)
    account = _find(db, email)
    if account is None or not accounts.verify_password(account, password):
        _fail(db, email, address, now)
        raise Refused("Wrong email or password.")
    if account.disabled:
        raise Refused("This account is disabled. Contact the operator of this server.", 403)
    throttle.clear(db, email)
    return account, sessions.start(db, account, now, replacing=old_token)


def change_password(db: Session, account: Account, current: str, new: str, *, address: str, now: dt.datetime) -> str:
    """Change the password and log out every other session (a thief's included); the new token is ours."""
    _check_throttle(db, account.email, address, now)  # a stolen session must not become a password oracle
    account = db.get(Account, account.id)  # the caller's copy belongs to a closed session
    if not accounts.verify_password(account, current):
        _fail(db, account.email, address, now)
        raise Refused("The current password is wrong.")
    try:
        accounts.change_password(db, account, current, new)
    except accounts.AccountError as exc:
        raise Refused(_sentence(str(exc))) from None
    sessions.end_all(db, account.id)
    return sessions.start(db, account, now)


def _check_throttle(db: Session, email: str, address: str, now: dt.datetime) -> None:
    wait = throttle.retry_after(db, email, address, now)
    if wait:
        minutes = max(1, round(wait / 60))
        raise Refused(
            f"Too many failed log-in attempts for this email or from your network. "
            f"Wait {minutes} minute{'s' if minutes != 1 else ''} and try again.",
            429,
            retry_after=wait,
        )


def _fail(db: Session, email: str, address: str, now: dt.datetime) -> None:
    throttle.record_failure(db, email, address, now)
    db.commit()  # the caller rolls back on Refused; the failure must count anyway


def _find(db: Session, email: str) -> Account | None:
    try:
        return accounts.get_account(db, email)
    except accounts.AccountError:
        # Spend the time a real check takes, so timing does not tell which emails have accounts.
        _burn()
        return None


def _burn() -> None:
    try:
        _dummy_hasher().verify(_dummy_hash(), "not the password")
    except Exception:  # always a mismatch: we only want the time it takes
        pass


@cache
def _dummy_hasher() -> PasswordHasher:
    return PasswordHasher()


@cache
def _dummy_hash() -> str:
    return _dummy_hasher().hash("a password nobody has")


def _sentence(message: str) -> str:
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
