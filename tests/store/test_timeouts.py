"""A slow or silent PostgreSQL costs bounded time: one account's locked counters fail that account's
requests within the lock timeout (503 + Retry-After) and hold up no one else; a database that stops
answering fails requests within the statement and connect timeouts, turns /readyz 503 within seconds
(each answer well under a second) and service comes back by itself when it answers again.

Real PostgreSQL, a real HTTP server (uvicorn) over an app built from ``Settings`` (so the
``database_*`` settings are what it runs with), and the scripted engine. The timeouts are short here;
the production defaults are in ``Settings``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from aimichat.app import create_app
from aimichat.cli import cli
from aimichat.config import Settings
from aimichat.store.db import Database
from aimichat.store.errors import STORE_UNAVAILABLE
from aimichat.store.models import UsageEvent
from conftest import LiveServer, make_account, make_key, migrated, new_postgres_database, settled
from fixtures import scripted_factory
from scripted_engine import ScriptedEngine
from tcp_proxy import TCPProxy

HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
FAST = {  # short limits, so that the tests are short
    "database_connect_timeout": 2,  # libpq's minimum
    "database_statement_timeout": 1.5,
    "database_lock_timeout": 1.0,
    "database_pool_timeout": 5,
}
ROUND_TRIP = FAST["database_statement_timeout"] + FAST["database_connect_timeout"]  # a silent server's bound


class BlackHoleProxy(TCPProxy):
    """A TCPProxy that can also black-hole: connections stay open and new ones are accepted, but
    nothing gets through either way (a frozen host, a dead path behind a load balancer)."""

    forwarding = True

    def black_hole(self) -> None:
        self.forwarding = False

    def forward(self) -> None:
        self.forwarding = True

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:  # type: ignore[override]
        try:
            while data := src.recv(65536):
                if self.forwarding:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def serve(url: str, tmp_path: Path, engine: ScriptedEngine, **settings: Any) -> Iterator[LiveServer]:
    """A LiveServer for an app that builds its own Database from ``Settings`` (``FAST`` limits)."""
    cfg = Settings(data_dir=tmp_path, database_url=url, **{**FAST, **settings})
    app = create_app(cfg, engine=engine, close_engine=False, engine_factory=scripted_factory())
    try:
        with LiveServer(app) as server:
            yield server
    finally:
        app.state.database.dispose()


def timed(call: Any, *args: Any, **kwargs: Any) -> tuple[float, httpx.Response]:
    start = time.monotonic()
    response = call(*args, **kwargs)
    return time.monotonic() - start, response


def assert_store_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "store_unavailable" and int(r.headers["retry-after"]) >= 1


def admin_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg_url() -> Iterator[str]:
    url, drop = new_postgres_database()
    migrated(url).dispose()
    yield url
    drop()


@pytest.mark.timeout(30)
def test_the_database_settings_reach_postgresql_and_sqlite(pg_url, tmp_path):
    limits = {"database_statement_timeout": 1.5, "database_lock_timeout": 0.25, "database_pool_timeout": 0.5}
    app = create_app(Settings(database_url=pg_url, **limits), engine=ScriptedEngine(), close_engine=False)
    db: Database = app.state.database
    try:
        with db.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "250ms"
            assert conn.connection.dbapi_connection.info.get_parameters()["connect_timeout"] == "5"
            # Each limit raises what the API answers with 503 + Retry-After.
            start = time.monotonic()
            with pytest.raises(STORE_UNAVAILABLE) as statement_limit:
                conn.execute(text("SELECT pg_sleep(5)"))
            assert isinstance(statement_limit.value.orig, psycopg.errors.QueryCanceled)
            assert time.monotonic() - start < 2.5
        with contextlib.ExitStack() as stack:
            for _ in range(30):  # the whole pool
                stack.enter_context(db.connect())
            start = time.monotonic()
            with pytest.raises(STORE_UNAVAILABLE):
                db.connect()
            assert 0.4 < time.monotonic() - start < 1.5
    finally:
        db.dispose()

    sqlite = create_app(Settings(data_dir=tmp_path, **limits), engine=ScriptedEngine(), close_engine=False)
    db = sqlite.state.database
    try:
        with db.connect() as conn:
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 1500  # SQLite's wait for its write lock
    finally:
        db.dispose()

    listed = CliRunner().invoke(cli, ["settings"], env={"COLUMNS": "200"}).output
    for name in ("CONNECT", "STATEMENT", "LOCK", "POOL"):
        assert f"AIMICHAT_DATABASE_{name}_TIMEOUT" in listed


@pytest.mark.timeout(90)
def test_a_locked_counter_row_fails_its_account_within_the_lock_timeout_and_blocks_no_one_else(pg_url, tmp_path):
    direct = Database(pg_url)
    locked_id = make_account(direct, "locked@example.com", daily=1000)
    make_account(direct, "other@example.com", daily=1000)
    locked_key, other_key = make_key(direct, "locked@example.com"), make_key(direct, "other@example.com")
    lock = FAST["database_lock_timeout"]
    engine = ScriptedEngine()
    http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=200, max_keepalive_connections=200))
    try:
        with serve(pg_url, tmp_path, engine) as server, ThreadPoolExecutor(80) as pool:
            http.base_url = httpx.URL(server.url)

            def chat(key: str) -> tuple[float, httpx.Response]:
                return timed(http.post, "/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"})

            for key in (locked_key, other_key):  # the counter rows exist
                assert chat(key)[1].status_code == 200
            settled(server)  # their settlements written before the rows are locked

            # Another connection holds the account's counters, as a replica stuck mid-transaction would.
            with psycopg.connect(admin_url(pg_url)) as locker:
                locker.execute("SELECT used FROM usage_counters WHERE account_id = %s FOR UPDATE", (locked_id,))

                # A few of the account's requests wait on its rows...
                waiting = [pool.submit(chat, locked_key) for _ in range(5)]
                time.sleep(0.3)
                # ...while another account's requests, and pages, are answered at once.
                elapsed, r = chat(other_key)
                assert r.status_code == 200 and elapsed < 0.5, (r.status_code, elapsed)
                elapsed, r = timed(http.get, "/login")
                assert r.status_code == 200 and elapsed < 0.5, elapsed
                for future in waiting:  # and the waiting ones fail closed at the lock timeout, not at its release
                    elapsed, r = future.result()
                    assert_store_unavailable(r)
                    assert lock * 0.9 < elapsed < lock + 1.5, elapsed

                # A burst larger than the connection pool (30) and the request thread pool (40): each
                # waiter gives its connection back within the lock timeout, so everyone is answered soon.
                burst = [pool.submit(chat, locked_key) for _ in range(60)]
                time.sleep(0.3)
                elapsed, r = chat(other_key)
                assert r.status_code == 200 and elapsed < 4 * lock, (r.status_code, elapsed)
                elapsed, r = timed(http.get, "/login")
                assert r.status_code == 200 and elapsed < 4 * lock, elapsed
                answers = [future.result() for future in burst]
                for _, r in answers:
                    assert_store_unavailable(r)
                assert max(elapsed for elapsed, _ in answers) < 6 * lock
                locker.rollback()

            assert chat(locked_key)[1].status_code == 200  # the lock gone, the account is served again
        assert len(engine.generations) == 5, "no engine call for a refused request"
        with direct.session() as s:  # and the refused requests left no trace
            assert s.scalar(select(func.count(UsageEvent.id))) == 5
    finally:
        http.close()
        direct.dispose()


@pytest.mark.timeout(90)
def test_a_silent_postgresql_fails_requests_and_readiness_within_seconds_and_recovers(pg_url, tmp_path):
    real = make_url(pg_url)
    proxy = BlackHoleProxy(real.host or "127.0.0.1", real.port or 5432).start()
    direct = Database(pg_url)
    make_account(direct, daily=100)
    key = make_key(direct)
    via_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
    engine = ScriptedEngine()
    http = httpx.Client(timeout=30)
    try:
        with serve(via_proxy, tmp_path, engine) as server:
            http.base_url = httpx.URL(server.url)

            def chat() -> tuple[float, httpx.Response]:
                return timed(http.post, "/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"})

            def ready() -> httpx.Response:
                elapsed, r = timed(http.get, "/readyz", timeout=2)
                assert elapsed < 0.8, f"/readyz took {elapsed:.2f} s"
                return r

            assert chat()[1].status_code == 200
            settled(server)  # its settlement written before the database goes silent
            assert ready().status_code == 200

            held = server.db.sql_engine.connect()  # an open connection, as the pool keeps them
            held.execute(text("SELECT 1"))

            def round_trip_on_held() -> float:
                start = time.monotonic()
                with pytest.raises(OperationalError, match="did not answer within"):
                    held.execute(text("SELECT 1"))
                held.close()
                return time.monotonic() - start

            proxy.black_hole()
            went = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                given_up = pool.submit(round_trip_on_held)
                chats = pool.submit(lambda: [chat() for _ in range(3)])  # a pooled connection, then new ones
                while (r := ready()).status_code == 200:  # meanwhile /readyz answers at once, and soon fails
                    assert time.monotonic() - went < 6, "/readyz still 200 6 s after the database went silent"
                    time.sleep(0.1)
                assert r.json()["database"] == {"ok": False, "error": "TimeoutError"}
                # The server cannot cancel what it never received: the client gives up by itself.
                assert ROUND_TRIP - 0.2 < given_up.result() < ROUND_TRIP + 1
                for elapsed, r in chats.result():  # each within its timeout
                    assert_store_unavailable(r)
                    assert elapsed < ROUND_TRIP + 1.5, elapsed
            assert len(engine.generations) == 1, "no engine call without the database"
            assert ready().status_code == 503

            proxy.forward()
            back = time.monotonic()
            while ready().status_code != 200:
                assert time.monotonic() - back < 8, "/readyz still 503 8 s after the database came back"
                time.sleep(0.1)
            elapsed, r = chat()
            assert r.status_code == 200, r.text
        with direct.session() as s:
            assert s.scalar(select(func.count(UsageEvent.id))) == 2  # the refused requests left no trace
    finally:
        http.close()
        proxy.stop()
        direct.dispose()
