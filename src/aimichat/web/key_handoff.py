"""A new key's secret between the POST that made it and the one page that shows it (post/redirect/get).

The POST stores the secret here and redirects to ``/keys?shown=<token>``; that GET takes it out (one
``DELETE ... RETURNING``, so two loads of the page, even on two replicas, cannot both get it) and shows
it. A reload finds nothing and creates nothing. The secret is never in a URL or a cookie: the token in
the URL is a random handle that is useless without the browser's session cookie.

The row holds the secret masked with a pad derived from the session's cookie token and the URL token.
The database stores neither of them (only their SHA-256), so even a copy of it taken in those few
minutes shows no usable key, in keeping with "we keep only a fingerprint of it".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import delete
from sqlalchemy.orm import Session

from aimichat.keys.service import CreatedKey
from aimichat.store.models import KeyHandoff

from .deps import Visitor

LIFETIME = dt.timedelta(minutes=5)  # the redirect is followed at once; a hand-off left behind dies soon
Kind = Literal["created", "rotated", "replaced"]  # new key / new secret of a live key / new key for a revoked one


@dataclass(frozen=True)
class Handoff:
    """What the page after the redirect shows: the secret, whose key it is, and what became of the old one."""

    secret: str
    key_id: int
    kind: Kind
    old_prefix: str | None = None
    old_valid_until: dt.datetime | None = None  # a rotation's grace period; None: the old secret stopped at once


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _pad(session_token: str, token: str, length: int) -> bytes:
    # SHAKE-256 as a keyed pseudo-random function: one fresh URL token per secret, so the pad is never reused.
    material = b"aimichat-key-handoff\0" + session_token.encode("utf-8") + b"\0" + token.encode("utf-8")
    return hashlib.shake_256(material).digest(length)


def _seal(secret: str, session_token: str, token: str) -> str:
    data = secret.encode("utf-8")
    return bytes(a ^ b for a, b in zip(data, _pad(session_token, token, len(data)), strict=True)).hex()


def _open(sealed: str, session_token: str, token: str) -> str | None:
    data = bytes.fromhex(sealed)
    try:
        return bytes(a ^ b for a, b in zip(data, _pad(session_token, token, len(data)), strict=True)).decode("utf-8")
    except UnicodeDecodeError:  # another session's token: garbage, never shown
        return None


def put(
    session: Session,
    visitor: Visitor,
    created: CreatedKey,
    now: dt.datetime,
    *,
    kind: Kind,
    old_prefix: str | None = None,
    old_valid_until: dt.datetime | None = None,
) -> str:
    """Keep ``created``'s secret for the visitor's next page; returns the token for ``?shown=``."""
    if visitor.session_id is None or visitor.session_token is None:
        raise ValueError("a key is handed off to a logged-in browser session only")
    session.execute(delete(KeyHandoff).where(KeyHandoff.expires_at <= now))  # what nobody came back for
    token = secrets.token_urlsafe(24)
    session.add(
        KeyHandoff(
            token_hash=_digest(token),
            session_id=visitor.session_id,
            key_id=created.key.id,
            kind=kind,
            sealed=_seal(created.secret, visitor.session_token, token),
            old_prefix=old_prefix,
            old_valid_until=old_valid_until,
            expires_at=now + LIFETIME,
        )
    )
    session.flush()
    return token


def take(session: Session, visitor: Visitor, token: str | None, now: dt.datetime) -> Handoff | None:
    """The hand-off of ``token`` for this browser session, removed as it is read; None when there is none
    (already shown, expired, another session's, or a made-up token)."""
    if not token or len(token) > 64 or visitor.session_id is None or visitor.session_token is None:
        return None
    t = KeyHandoff.__table__.c
    row = session.execute(
        delete(KeyHandoff)
        .where(KeyHandoff.token_hash == _digest(token), KeyHandoff.session_id == visitor.session_id)
        .returning(t.key_id, t.kind, t.sealed, t.old_prefix, t.old_valid_until, t.expires_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None or row.expires_at <= now:
        return None
    secret = _open(row.sealed, visitor.session_token, token)
    if secret is None:
        return None
    return Handoff(secret, row.key_id, row.kind, row.old_prefix, row.old_valid_until)
