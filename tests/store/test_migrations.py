"""Alembic migrations upgrade and downgrade cleanly on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy import inspect

from aimichat.accounts import service as accounts
from aimichat.store import db as store
from aimichat.store.db import Database
from conftest import migration_diff, new_postgres_database

WEB_TABLES = {"web_sessions", "login_attempts"}  # added by 0002


def test_upgrade_downgrade_upgrade(db_url):
    db = Database(db_url)
    store.upgrade(db.sql_engine)
    assert {"tiers", "accounts", "api_keys", "usage_counters", "usage_ledger"} | WEB_TABLES <= set(
        inspect(db.sql_engine).get_table_names()
    )
    store.downgrade(db.sql_engine, "0001")  # the web pages' tables go, the API's stay
    tables = set(inspect(db.sql_engine).get_table_names())
    assert not WEB_TABLES & tables and "api_keys" in tables
    store.downgrade(db.sql_engine, "base")
    assert set(inspect(db.sql_engine).get_table_names()) <= {"alembic_version"}
    store.upgrade(db.sql_engine)
    assert set(inspect(db.sql_engine).get_table_names()) >= WEB_TABLES
    db.dispose()


def test_models_and_migrations_agree(db_url):
    db = Database(db_url)
    store.upgrade(db.sql_engine)
    diff = migration_diff(db)
    db.dispose()
    assert diff == []


def test_replicas_starting_together_on_a_fresh_postgresql_all_come_up(tmp_path):
    url, drop = new_postgres_database()
    start = (
        "import os; from aimichat.app import prepare_database; from aimichat.config import Settings; "
        "from aimichat.store.db import Database; prepare_database(Database(os.environ['URL']), Settings())"
    )
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", start], env={**os.environ, "URL": url}, stderr=subprocess.PIPE)
            for _ in range(4)
        ]
        results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
        assert [code for code, _ in results] == [0, 0, 0, 0], results
        db = Database(url)
        with db.session() as s:
            assert [t.name for t in accounts.list_tiers(s)] == ["free"]
        db.dispose()
    finally:
        drop()
