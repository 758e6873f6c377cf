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
