"""Browser sessions of the account pages, kept server-side.

The cookie carries a random 256-bit token; the table stores only its SHA-256, so a copy of the
database cannot be replayed as a logged-in browser. The CSRF token is derived from the session token
(another hash of it), so it needs no storage, changes with every new session and cannot be computed
from the database either.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from aimichat.store.models import Account, WebSession

LIFETIME = dt.timedelta(days=30)  # absolute: a stolen cookie stops working eventually
IDLE_TIMEOUT = dt.timedelta(days=7)
TOUCH_EVERY = dt.timedelta(minutes=10)  # so a busy browser does not write on every page view


@dataclass(frozen=True)
class SessionUser:
    """A live session and the account it belongs to (with its tier loaded)."""

    session_id: int
    account: Account
    csrf_token: str


def new_token() -> str:
    """A fresh session token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_for(token: str) -> str:
    # A separate hash of the session token: known to the page, useless as a session cookie.
    return hashlib.sha256(b"aimichat-csrf\0" + token.encode("utf-8")).hexdigest()


def start(session: Session, account: Account, now: dt.datetime, *, replacing: str | None = None) -> str:
    """A new session for ``account``; the old token (if any) is ended, so a planted one is useless."""
    if replacing:
        end(session, replacing)
    session.execute(delete(WebSession).where(WebSession.account_id == account.id, WebSession.expires_at <= now))
    token = new_token()
    session.add(
        WebSession(
            token_hash=hash_token(token),
            account_id=account.id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + LIFETIME,
        )
    )
    session.flush()
    return token


def lookup(session: Session, token: str | None, now: dt.datetime) -> SessionUser | None:
    """The session's user, or None for an unknown, expired or idle session or a disabled account."""
    if not token or len(token) > 128:
        return None
    row = session.execute(
        select(WebSession, Account)
        .join(Account, Account.id == WebSession.account_id)
        .where(WebSession.token_hash == hash_token(token))
    ).first()
    if row is None:
        return None
    web_session, account = row
    seen = web_session.last_seen_at
    if web_session.expires_at <= now or now - seen > IDLE_TIMEOUT or account.disabled:
        return None
    if now - seen >= TOUCH_EVERY:
        session.execute(update(WebSession).where(WebSession.id == web_session.id).values(last_seen_at=now))
    return SessionUser(web_session.id, account, csrf_for(token))


def end(session: Session, token: str) -> None:
    """End the session of ``token`` (no error if there is none)."""
    session.execute(delete(WebSession).where(WebSession.token_hash == hash_token(token)))


def end_all(session: Session, account_id: int) -> int:
    """Log an account out everywhere (password change, account disabled)."""
    result = cast("CursorResult[Any]", session.execute(delete(WebSession).where(WebSession.account_id == account_id)))
    return result.rowcount
