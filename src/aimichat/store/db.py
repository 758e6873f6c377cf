"""Database connection and migrations (SQLite by default, PostgreSQL for fleets).

Nothing waits on the database without a limit (``DatabaseTimeouts``): opening a connection, waiting
for a pooled one, a statement, a row lock, a round trip with a server that stopped answering. Each
limit raises one of ``store.errors.STORE_UNAVAILABLE``, which the API answers with 503 + Retry-After.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from .health import CachedCheck

if TYPE_CHECKING:
    from aimichat.config import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
# The readiness probe's own limits: it must answer (or fail) within the health check's timeout.
PROBE_STATEMENT_TIMEOUT = 1.0
PROBE_CONNECT_TIMEOUT = 2.0


# PostgreSQL connections a replica keeps open once it has needed them (AIMICHAT_DATABASE_POOL_SIZE), and how
# many more it may open at a peak, closed again when returned: 30 at most, as before. With 10 kept and 20
# more, 32 concurrent clients kept opening and closing connections (a py-spy profile of bench/gateway.py
# showed connection set-up in the worker threads; each one costs PostgreSQL a process fork on the same cores).
POOL_SIZE = 20
POOL_OVERFLOW = 10


@dataclass(frozen=True)
class DatabaseTimeouts:
    """Seconds the app waits on its database (the ``database_*_timeout`` settings); 0: no limit.

    - ``connect``: to open a connection (PostgreSQL: whole seconds, at least 2, as libpq counts them).
    - ``statement``: one statement; PostgreSQL cancels it (``statement_timeout``), and a server that does
      not answer at all is given up on after ``statement`` + ``connect``. SQLite: its wait for the write lock.
    - ``lock``: a statement's wait for a row lock (PostgreSQL ``lock_timeout``).
    - ``pool``: a request's wait for a free connection of the pool.
    """

    connect: float = 5.0
    statement: float = 10.0
    lock: float = 3.0
    pool: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DatabaseTimeouts:
        return cls(
            connect=settings.database_connect_timeout,
            statement=settings.database_statement_timeout,
            lock=settings.database_lock_timeout,
            pool=settings.database_pool_timeout,
        )


class Database:
    """One database: its SQLAlchemy engine (``sql_engine``), session factory and Core connections.

    ``health`` is the cached readiness check of ``/readyz`` (see ``store.health``)."""

    def __init__(self, url: str, timeouts: DatabaseTimeouts | None = None, *, pool_size: int = POOL_SIZE):
        self.url = url
        self.timeouts = timeouts or DatabaseTimeouts()
        self.sql_engine = make_sql_engine(url, self.timeouts, pool_size=pool_size)
        self.sessions = sessionmaker(self.sql_engine, expire_on_commit=False)
        self._lock = threading.Lock()
        self._probe: Engine | None = None
        self._health: CachedCheck | None = None
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
        """Apply pending migrations. On PostgreSQL without statement and lock limits (a migration may
        rewrite a big table, and waits its turn behind another replica's): connect limits stay."""
        if self.is_sqlite:
            upgrade(self.sql_engine)
            return
        unlimited = dataclasses.replace(self.timeouts, statement=0, lock=0)
        engine = make_sql_engine(self.url, unlimited, pool_size=1, max_overflow=0)
        try:
            upgrade(engine)
        finally:
            engine.dispose()

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """The database ``settings`` name, with their ``database_*`` limits."""
        timeouts = DatabaseTimeouts.from_settings(settings)
        return cls(settings.resolved_database_url(), timeouts, pool_size=settings.database_pool_size)

    def ping(self) -> None:
        """One ``SELECT 1``, failing within a few seconds (its own connection and short limits)."""
        if self.is_sqlite:  # outside a transaction: a ping must not queue for the write lock
            raw = self.sql_engine.raw_connection()
            try:
                raw.cursor().execute("SELECT 1")
            finally:
                raw.close()
            return
        with self._probe_engine().connect() as conn:
            conn.execute(text("SELECT 1"))

    @property
    def health(self) -> CachedCheck:
        """``ping``, run at most every couple of seconds in its own thread; ``/readyz`` reads it."""
        with self._lock:
            if self._health is None:
                self._health = CachedCheck("database", self.ping)
            return self._health

    def _probe_engine(self) -> Engine:
        """One PostgreSQL connection of its own: a pool busy with requests (or waiting on their locks)
        must not make the database look down, nor the probe wait behind them."""
        with self._lock:
            if self._probe is None:
                limits = dataclasses.replace(
                    self.timeouts,
                    connect=min(self.timeouts.connect, PROBE_CONNECT_TIMEOUT),
                    statement=PROBE_STATEMENT_TIMEOUT,
                    pool=PROBE_CONNECT_TIMEOUT,
                )
                self._probe = make_sql_engine(self.url, limits, pool_size=1, max_overflow=0)
            return self._probe.execution_options(isolation_level="AUTOCOMMIT")

    def dispose(self) -> None:
        self.sql_engine.dispose()
        with self._lock:
            if self._probe is not None:
                self._probe.dispose()


def make_sql_engine(
    url: str, timeouts: DatabaseTimeouts | None = None, *, pool_size: int = POOL_SIZE, max_overflow: int = POOL_OVERFLOW
) -> Engine:
    """The SQLAlchemy engine of ``url`` with ``timeouts`` (default: ``DatabaseTimeouts()``)."""
    timeouts = timeouts or DatabaseTimeouts()
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        busy = _sqlite_busy_timeout(timeouts)
        engine = create_engine(
            url,
            connect_args={"timeout": busy, "check_same_thread": False},
            pool_size=8,
            pool_timeout=timeouts.pool,
        )
        event.listen(engine, "connect", lambda dbapi_conn, record: _sqlite_pragmas(dbapi_conn, record, busy))
        # pysqlite opens transactions lazily and never for SELECT; take the write lock up front instead,
        # so concurrent writers queue on busy_timeout rather than failing to upgrade a read lock.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    from . import pg  # psycopg is loaded for PostgreSQL only

    # No pre-ping (a round trip per checkout): a dead connection raises, SQLAlchemy then drops the
    # whole pool, the request fails closed with 503 and the next one reconnects.
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=timeouts.pool,
        connect_args=pg.connect_args(url, timeouts),
    )
    if engine.dialect.driver == "psycopg":
        deadline = pg.round_trip_deadline(timeouts)
        event.listen(engine, "do_connect", lambda _d, _r, cargs, cparams: pg.connect(deadline, *cargs, **cparams))
    return engine


def _sqlite_busy_timeout(timeouts: DatabaseTimeouts) -> float:
    """How long an SQLite writer waits for the database's write lock: the statement limit (the whole
    database is one lock there, so the row-lock limit would be too short under load); a day if none."""
    return timeouts.statement if timeouts.statement > 0 else 86400.0


def _sqlite_pragmas(dbapi_conn: Any, _record: object, busy_timeout: float) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see make_sql_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
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
