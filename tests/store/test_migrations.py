"""Alembic migrations upgrade and downgrade cleanly on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from aimichat.store.db import Database, downgrade, upgrade
from aimichat.store.models import Base


def test_upgrade_downgrade_upgrade(db_url):
    db = Database(db_url)
    upgrade(db.engine)
    assert {"tiers", "accounts", "api_keys", "usage_counters", "usage_ledger"} <= set(inspect(db.engine).get_table_names())
    downgrade(db.engine, "base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    upgrade(db.engine)
    db.dispose()


def test_models_and_migrations_agree(db_url):
    db = Database(db_url)
    upgrade(db.engine)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    db.dispose()
    assert diff == []


def test_replicas_starting_together_on_a_fresh_postgresql_all_come_up(tmp_path):
    import os
    import subprocess
    import sys

    from aimichat.accounts import service as accounts
    from conftest import new_postgres_database

    url, drop = new_postgres_database()
    start = "import os; from aimichat.app import prepare_database; from aimichat.config import Settings; " \
            "from aimichat.store.db import Database; prepare_database(Database(os.environ['URL']), Settings())"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", start], env={**os.environ, "URL": url}, stderr=subprocess.PIPE)
                 for _ in range(4)]
        results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
        assert [code for code, _ in results] == [0, 0, 0, 0], results
        db = Database(url)
        with db.session() as s:
            assert [t.name for t in accounts.list_tiers(s)] == ["free"]
        db.dispose()
    finally:
        drop()
