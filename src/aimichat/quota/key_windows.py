"""A key's own counters in SQL: its day's and month's credits, its minute's requests and tokens.

One row per (key, kind) in ``key_counters``. The conditional UPDATE that takes from it also moves it
to a newer window (resetting it), so it is one statement, exact under any concurrency, and the table
never grows. A refund applies only while the row is still in the window the reservation was made in:
once the window has moved on, what was taken there no longer counts anyway.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, bindparam, case, select, update
from sqlalchemy.dialects import postgresql, sqlite

from aimichat.store.models import KeyCounter

_ROW = (KeyCounter.key_id == bindparam("p_key")) & (KeyCounter.kind == bindparam("p_kind"))
_CURRENT = KeyCounter.window_start >= bindparam("p_window")  # a replica whose clock lags adds to the newer window
_USED_NOW = case((_CURRENT, KeyCounter.used), else_=0)
_TAKE = (
    update(KeyCounter)
    .where(_ROW, _USED_NOW + bindparam("p_amount") <= bindparam("p_limit"))
    .values(
        used=_USED_NOW + bindparam("p_amount"),
        window_start=case((_CURRENT, KeyCounter.window_start), else_=bindparam("p_window")),
    )
    .returning(KeyCounter.used)
)
_GIVE_BACK = (
    update(KeyCounter)
    .where(_ROW, KeyCounter.window_start == bindparam("p_window"))
    .values(used=KeyCounter.used - bindparam("p_amount"))
)
_READ = select(KeyCounter.used).where(_ROW, KeyCounter.window_start == bindparam("p_window"))


def take(conn: Connection, key_id: int, kind: str, window: dt.datetime, amount: int, limit: int) -> int | None:
    """Add ``amount`` to the key's ``kind`` counter in ``window`` if it stays within ``limit``; the new
    total, or None when it does not fit (the caller rolls back whatever else it took)."""
    params = {"p_key": key_id, "p_kind": kind, "p_window": window, "p_amount": amount, "p_limit": limit}
    used = conn.execute(_TAKE, params).scalar()
    if used is None:
        upsert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(
            upsert(KeyCounter).values(key_id=key_id, kind=kind, window_start=window, used=0).on_conflict_do_nothing()
        )
        used = conn.execute(_TAKE, params).scalar()
    return None if used is None else int(used)


def give_back(conn: Connection, key_id: int, kind: str, window: dt.datetime, amount: int) -> None:
    if amount > 0:
        conn.execute(_GIVE_BACK, {"p_key": key_id, "p_kind": kind, "p_window": window, "p_amount": amount})


def used(conn: Connection, key_id: int, kind: str, window: dt.datetime) -> int:
    """What the key's ``kind`` counter holds for ``window`` (0 once it has moved on, or before its first use)."""
    value = conn.execute(_READ, {"p_key": key_id, "p_kind": kind, "p_window": window}).scalar()
    return int(value or 0)
