"""Alembic environment: the engine comes from the caller (``store.db.upgrade``), never from an ini file."""

from alembic import context
from sqlalchemy import text

from aimichat.store.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        # Replicas starting together all run migrations: one at a time, the others then find them done.
        connection.execute(text("SELECT pg_advisory_xact_lock(7271960)"))
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
