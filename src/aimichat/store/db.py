"""Database connection and migrations (SQLite by default, PostgreSQL for fleets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


class Database:
    """One database: its SQLAlchemy engine (``sql_engine``), session factory and Core connections."""

    def __init__(self, url: str):
        self.url = url
        self.sql_engine = make_sql_engine(url)
        self.sessions = sessionmaker(self.sql_engine, expire_on_commit=False)
        # SQLite keeps its transactions: they cost no round trip, and our BEGIN IMMEDIATE hook (see
        # make_sql_engine) would otherwise open one that autocommit never closes.
        self._single = (
            self.sql_engine if self.is_sqlite else self.sql_engine.execution_options(isolation_level="AUTOCOMMIT")
        )

    @property
    def is_sqlite(self) -> bool:
        return self.sql_engine.dialect.name == "sqlite"

    def session(self) -> Session:
        return self.sessions()

    def connect(self, *, single_statement: bool = False) -> Connection:
        """A Core connection for the request path (no ORM session: it costs more than the statements).

        ``single_statement``: the caller runs one statement, atomic on its own; on PostgreSQL the
        connection is in autocommit, which spares the BEGIN and COMMIT round trips around it.
        """
        return (self._single if single_statement else self.sql_engine).connect()

    def upgrade(self) -> None:
        upgrade(self.sql_engine)

    def ping(self) -> None:
        with self.sql_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.sql_engine.dispose()


def make_sql_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite opens transactions lazily and never for SELECT; take the write lock up front instead,
        # so concurrent writers queue on busy_timeout rather than failing to upgrade a read lock.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # No pre-ping (a round trip per checkout): a dead connection raises, SQLAlchemy then drops the
    # whole pool, the request fails closed with 503 and the next one reconnects.
    return create_engine(url, pool_size=10, max_overflow=20)


def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see make_sql_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    command.downgrade(alembic_config(engine), revision)
