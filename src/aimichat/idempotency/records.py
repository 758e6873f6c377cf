"""The ``idempotency_records`` table: one row per (owner, Idempotency-Key), decided by the database.

Each function is one short transaction that any replica may run at the same moment as another:

- :func:`claim` inserts the row *before* the request runs (``INSERT … ON CONFLICT DO NOTHING``): the
  replica whose insert lands runs the request; every other one reads the row and learns whether the
  answer is kept, still running, or was for another request.
- :func:`keep` and :func:`release` change the row only while the attempt that claimed it still holds it
  (``attempt`` matches and ``state = 'running'``), so an attempt whose row was taken over never
  overwrites the newer one's answer.
- :func:`clean` deletes expired rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, and_, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from aimichat.store.db import Database
from aimichat.store.models import IdempotencyRecord

RUNNING, DONE = "running", "done"
CLEAN_BATCH = 1000  # rows deleted per statement, so a long backlog never holds a lock for long
_CLAIM_TRIES = 3  # a row deleted or taken over between our insert and our read: look again


@dataclass(frozen=True)
class Stored:
    """An answer kept for retries: its status, the headers worth repeating and its exact body."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Claimed:
    """This attempt holds the row: it runs the request, then keeps or releases the row."""

    record_id: int
    attempt: str


@dataclass(frozen=True)
class Running:
    """Another attempt holds the row and has not finished."""


@dataclass(frozen=True)
class Mismatch:
    """The key was used for another request (another body, or another operation)."""


Claim = Claimed | Stored | Running | Mismatch


def digest(data: bytes | str) -> str:
    """Hex SHA-256, how keys and bodies are compared (a key is a caller's choice: not kept as sent)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def claim(
    database: Database,
    owner: str,
    key: str,
    operation: str,
    body: bytes,
    now: dt.datetime,
    *,
    ttl: dt.timedelta,
    lease: dt.timedelta,
) -> Claim:
    """Claim ``key`` of ``owner`` for a request (``operation`` and its raw ``body``), or say who has it.

    A row past ``expires_at`` counts as absent. A row still running after ``lease`` is taken over: the
    attempt that claimed it died with its replica (or could not reach the database to finish).
    """
    key_hash, request_hash = digest(key), digest(body)
    for _ in range(_CLAIM_TRIES):
        attempt = secrets.token_hex(16)
        fresh = {
            "operation": operation,
            "request_hash": request_hash,
            "attempt": attempt,
            "state": RUNNING,
            "started_at": now,
            "expires_at": now + ttl,
            "status": None,
            "headers": None,
            "body": None,
        }
        with database.connect() as conn:
            record_id = _insert(conn, {"owner": owner, "key_hash": key_hash, **fresh})
            if record_id is not None:
                conn.commit()
                return Claimed(record_id, attempt)
            row = conn.execute(
                select(IdempotencyRecord.__table__).where(
                    IdempotencyRecord.owner == owner, IdempotencyRecord.key_hash == key_hash
                )
            ).one_or_none()
            if row is None:  # released between our insert and our read
                conn.commit()
                continue
            expired = row.expires_at <= now
            if not expired and (row.operation, row.request_hash) != (operation, request_hash):
                return Mismatch()
            if not expired and row.state == DONE:
                return Stored(int(row.status), dict(row.headers or {}), bytes(row.body or b""))
            if not expired and row.started_at > now - lease:
                return Running()
            taken = conn.execute(
                update(IdempotencyRecord)
                .where(IdempotencyRecord.id == row.id, IdempotencyRecord.attempt == row.attempt)
                .values(**fresh)
            ).rowcount
            conn.commit()
            if taken:
                return Claimed(int(row.id), attempt)
    return Running()  # the row changes hands faster than we can read it: someone is running it


def keep(database: Database, claimed: Claimed, stored: Stored) -> bool:
    """Keep the answer of a claimed request for its retries; False if the claim was lost (taken over)."""
    with database.connect() as conn:
        done = conn.execute(
            update(IdempotencyRecord)
            .where(_held(claimed))
            .values(state=DONE, status=stored.status, headers=stored.headers, body=stored.body)
        ).rowcount
        conn.commit()
    return bool(done)


def release(database: Database, claimed: Claimed) -> None:
    """Give the key up: the request failed or was cut short, and a retry runs anew."""
    with database.connect() as conn:
        conn.execute(delete(IdempotencyRecord).where(_held(claimed)))
        conn.commit()


def clean(database: Database, now: dt.datetime) -> int:
    """Delete the rows that expired before ``now``; how many."""
    deleted = 0
    while True:
        with database.connect() as conn:
            batch = (
                select(IdempotencyRecord.id)
                .where(IdempotencyRecord.expires_at <= now)
                .limit(CLEAN_BATCH)
                .scalar_subquery()
            )
            count = conn.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id.in_(batch))).rowcount
            conn.commit()
        deleted += count
        if count < CLEAN_BATCH:
            return deleted


def _insert(conn: Connection, values: dict[str, object]) -> int | None:
    """Insert the row unless (owner, key_hash) exists; its id, or None."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = insert(IdempotencyRecord).values(values).on_conflict_do_nothing().returning(IdempotencyRecord.id)
    record_id = conn.execute(statement).scalar()
    return None if record_id is None else int(record_id)


def _held(claimed: Claimed) -> ColumnElement[bool]:
    """The row, while the attempt that claimed it still holds it."""
    return and_(
        IdempotencyRecord.id == claimed.record_id,
        IdempotencyRecord.attempt == claimed.attempt,
        IdempotencyRecord.state == RUNNING,
    )
