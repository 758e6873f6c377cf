"""Admin keys: who may call the admin API (``/admin/v1/...``).

The format is the API keys' (``keys.tokens``: 32 random base62 characters and a CRC32 checksum) under
another prefix, ``aimichat_admin_``, so secret scanners and people tell the two apart. Stored as the
SHA-256 of the whole key, compared in constant time, shown once. An admin key belongs to no account:
it cannot call the chat API, and an API key cannot call the admin API.

Each admin key may make ``limit`` requests a minute: the one statement that finds a live key also counts
the request in the key's current minute (resetting it when the minute has moved on), so the limit holds
across every replica with no extra round trip.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, case, select, update
from sqlalchemy.orm import Session

from aimichat.audit import service as audit
from aimichat.store.clock import utcnow
from aimichat.store.models import AdminKey

from . import tokens
from .service import UnknownKey, clean_name

PREFIX = "aimichat_admin_"
KEY_LEN = len(PREFIX) + tokens.RANDOM_LEN + tokens.CHECKSUM_LEN
DISPLAY_LEN = len(PREFIX) + 4


@dataclass(frozen=True)
class CreatedAdminKey:
    key: AdminKey
    secret: str  # shown once, never stored


@dataclass(frozen=True)
class AdminCaller:
    """A live admin key that presented itself, and where it stands in its minute."""

    key_id: int
    name: str
    requests: int  # this minute's, this one included
    window_start: dt.datetime

    @property
    def actor(self) -> str:
        return audit.admin_key_actor(self.key_id)


def generate() -> str:
    # An API key's random part and checksum under the admin prefix: one format, one checksum rule.
    return PREFIX + tokens.generate_key()[len(tokens.PREFIX) :]


def is_well_formed(key: str) -> bool:
    """Format and checksum check; needs no database."""
    if len(key) != KEY_LEN or not key.startswith(PREFIX):
        return False
    return tokens.is_well_formed(tokens.PREFIX + key[len(PREFIX) :])


def create(session: Session, name: str) -> CreatedAdminKey:
    secret = generate()
    key = AdminKey(
        name=clean_name(name),
        key_hash=tokens.hash_key(secret),
        prefix=secret[:DISPLAY_LEN],
        created_at=utcnow(),
        window_requests=0,
    )
    session.add(key)
    session.flush()
    audit.note(session, "admin_key.created", audit.admin_key_actor(key.id), {"name": key.name})
    return CreatedAdminKey(key, secret)


def list_admin_keys(session: Session) -> list[AdminKey]:
    return list(session.scalars(select(AdminKey).order_by(AdminKey.id)))


def revoke(session: Session, key_id: int) -> AdminKey:
    key = session.get(AdminKey, key_id)
    if key is None:
        raise UnknownKey(f"no admin key with id {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        audit.note(session, "admin_key.revoked", audit.admin_key_actor(key.id), {"name": key.name})
        session.flush()
    return key


def status(key: AdminKey) -> str:
    return "revoked" if key.revoked_at else "active"


_CURRENT = AdminKey.window_start >= bindparam("p_window")  # a replica whose clock lags adds to the newer minute
_COUNT = (
    update(AdminKey)
    .where(AdminKey.key_hash == bindparam("p_digest"), AdminKey.revoked_at.is_(None))
    .values(
        window_requests=case((_CURRENT, AdminKey.window_requests + 1), else_=1),
        window_start=case((_CURRENT, AdminKey.window_start), else_=bindparam("p_window")),
        last_used_at=bindparam("p_now"),
    )
    .returning(AdminKey.id, AdminKey.name, AdminKey.key_hash, AdminKey.window_requests, AdminKey.window_start)
)


def authenticate(conn: Connection, presented: str, now: dt.datetime) -> AdminCaller | None:
    """The live admin key ``presented`` names, with this request counted in its minute; None for any other
    string (a malformed one before any query). The caller commits."""
    if not is_well_formed(presented):
        return None
    digest = tokens.hash_key(presented)
    window = now.replace(second=0, microsecond=0)
    row = conn.execute(_COUNT, {"p_digest": digest, "p_window": window, "p_now": now}).first()
    if row is None or not secrets.compare_digest(row.key_hash, digest):
        return None
    return AdminCaller(row.id, row.name, int(row.window_requests), row.window_start)


def exists(conn: Connection, presented: str) -> bool:
    """Is ``presented`` a live admin key? (Read only: for refusing one where it does not belong.)"""
    if not is_well_formed(presented):
        return False
    digest = tokens.hash_key(presented)
    found = conn.execute(
        select(AdminKey.key_hash).where(AdminKey.key_hash == digest, AdminKey.revoked_at.is_(None))
    ).scalar()
    return found is not None and secrets.compare_digest(found, digest)
