"""Tell the replica's caches when one of its ORM sessions committed a change they may hold.

The key cache, the tiers' limits and the model registry are read on the request path from memory and
dropped when this process commits a change to what they hold (other processes' changes reach them
within their TTL). Dropping them on *every* commit made each logged-in page view (its session's
``last_seen_at``), each alert poll and each audit row cost the next API request of every key a database
lookup. So a commit clears them only when it wrote to a table not in :data:`NOT_CACHED`: the tables no
cache reads, which change all the time. A table added later is watched until it is listed here, so a
forgotten entry costs a lookup, never a stale answer.

Writes are seen by the flush (ORM objects added, changed or deleted) and by ``Session.execute`` of
UPDATE, DELETE and INSERT statements; a statement whose table cannot be told (raw SQL other than a
SELECT) counts as a change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction, sessionmaker
from sqlalchemy.sql.elements import TextClause

NOT_CACHED = frozenset(
    {
        "usage_counters",
        "key_counters",
        "usage_ledger",
        "web_sessions",
        "key_handoffs",
        "login_attempts",
        "admin_keys",
        "audit_log",
        "email_tokens",
        "idempotency_records",
        "alert_settings",
        "webhook_endpoints",
        "usage_alerts",
        "alert_deliveries",
    }
)


def _table_of(instance: object) -> str | None:
    table = getattr(type(instance), "__table__", None)
    return table.name if isinstance(table, Table) else None


def _flush_changed(session: Session) -> bool:
    return any(_table_of(instance) not in NOT_CACHED for instance in (*session.new, *session.dirty, *session.deleted))


def _statement_changes(state: ORMExecuteState) -> bool:
    statement: Any = state.statement
    if state.is_select:
        return False
    if isinstance(statement, TextClause):
        return bool(statement.text.lstrip()[:6].upper() != "SELECT")
    table = getattr(statement, "table", None)
    return not isinstance(table, Table) or table.name not in NOT_CACHED


def on_cached_change(sessions: sessionmaker[Session], *listeners: Callable[[], None]) -> Callable[[], None]:
    """Call ``listeners`` after each commit of ``sessions`` that changed a cached table; returns the function
    that stops it."""
    # A mark and functions of this call's own: two apps on one database (tests, two replicas in one
    # process) each see every commit, and SQLAlchemy keeps one registration per function.
    mark = object()

    def after_flush(session: Session, _flush: UOWTransaction) -> None:
        if _flush_changed(session):
            session.info[mark] = True

    def on_execute(state: ORMExecuteState) -> None:
        if _statement_changes(state):
            state.session.info[mark] = True

    def after_commit(session: Session) -> None:
        if session.info.pop(mark, False):
            for listener in listeners:
                listener()

    def after_rollback(session: Session) -> None:
        session.info.pop(mark, None)

    hooks: list[tuple[str, Callable[..., None]]] = [
        ("after_flush", after_flush),
        ("do_orm_execute", on_execute),
        ("after_commit", after_commit),
        ("after_rollback", after_rollback),
    ]
    for name, hook in hooks:
        event.listen(sessions, name, hook)

    def stop() -> None:
        for name, hook in hooks:
            event.remove(sessions, name, hook)

    return stop
