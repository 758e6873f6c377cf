"""A commit clears the replica's caches only when it wrote to a table one of them reads (store/changes.py)."""

from __future__ import annotations

import datetime as dt

import httpx
from sqlalchemy import event, select, text, update

from aimichat.accounts import service as accounts
from aimichat.store.changes import on_cached_change
from aimichat.store.db import Database
from aimichat.store.models import Account, AuditEvent, WebSession
from conftest import AppClient, build_app, make_account, make_key
from scripted_engine import ScriptedEngine


def _commits_that_cleared(database: Database, work) -> int:
    cleared: list[int] = []
    stop = on_cached_change(database.sessions, lambda: cleared.append(1))
    try:
        with database.session() as session:
            work(session)
            session.commit()
    finally:
        stop()
    return len(cleared)


def test_only_writes_to_cached_tables_clear_the_caches(database: Database) -> None:
    make_account(database, "a@example.com")
    with database.session() as session:
        account_id = accounts.get_account(session, "a@example.com").id

    def rename_nothing(session):  # a read alone
        session.execute(select(Account)).all()

    def disable(session):  # an ORM object changed
        session.get(Account, account_id).disabled = True

    def touch_sessions(session):  # what every logged-in page view does
        session.execute(
            update(WebSession).where(WebSession.account_id == account_id).values(last_seen_at=dt.datetime.now())
        )

    def bulk_disable(session):
        session.execute(update(Account).where(Account.id == account_id).values(disabled=False))

    def raw_sql(session):  # a table that cannot be told: counted as a change
        session.execute(text("UPDATE accounts SET disabled = disabled"))

    assert _commits_that_cleared(database, rename_nothing) == 0
    assert _commits_that_cleared(database, touch_sessions) == 0
    assert _commits_that_cleared(database, disable) == 1
    assert _commits_that_cleared(database, bulk_disable) == 1
    assert _commits_that_cleared(database, raw_sql) == 1

    cleared: list[int] = []
    stop = on_cached_change(database.sessions, lambda: cleared.append(1))
    try:
        with database.session() as session:  # rolled back: nothing changed, and the next commit starts clean
            session.get(Account, account_id).disabled = True
            session.flush()
            session.rollback()
            session.commit()
    finally:
        stop()
    assert cleared == []


def test_a_page_view_leaves_the_key_cache_warm_and_a_revocation_clears_it(database: Database, tmp_path) -> None:
    make_account(database)
    key = make_key(database)
    app = build_app(ScriptedEngine(), database, tmp_path)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    lookups: list[str] = []

    def count(_conn, _cursor, statement, *_rest) -> None:
        if "api_keys.key_hash" in statement:
            lookups.append(statement)

    with AppClient(app) as client:
        assert client.chat(body, key=key).status_code == 200
        event.listen(database.sql_engine, "before_cursor_execute", count)
        try:
            with database.session() as session:  # an audit row and a session touch: no cache reads them
                session.add(
                    AuditEvent(created_at=dt.datetime.now(), action="test.noted", target="account:1", actor="cli")
                )
                session.execute(update(WebSession).values(last_seen_at=dt.datetime.now()))
                session.commit()
            assert client.chat(body, key=key).status_code == 200
            assert lookups == []
            with database.session() as session:
                accounts.get_account(session, "user@example.com").disabled = True
                session.commit()
            answer: httpx.Response = client.chat(body, key=key)
            assert answer.status_code == 403  # at once, not after the cache's second
            assert len(lookups) == 1
        finally:
            event.remove(database.sql_engine, "before_cursor_execute", count)


def test_two_watchers_of_one_database_come_and_go_on_their_own(database: Database) -> None:
    first, second = [], []
    stop_first = on_cached_change(database.sessions, lambda: first.append(1))
    stop_second = on_cached_change(database.sessions, lambda: second.append(1))
    make_account(database, "a@example.com")  # each watcher hears of it (two replicas of one database)
    stop_first()
    make_account(database, "b@example.com")
    stop_second()
    make_account(database, "c@example.com")
    assert (first, second) == ([1], [1, 1])
