"""Shared fixtures: one loaded model per session, real databases (SQLite and PostgreSQL), real HTTP servers.

- ``engine``: the embedded SmolLM2 engine, loaded once for the whole session.
- ``db_url``: parametrised over SQLite and PostgreSQL (a fresh database each time); ``sqlite_url`` alone.
- ``LiveServer``: runs an app under uvicorn on a free port in a background thread.
- ``make_account`` / ``make_key``: plain-function helpers over the store.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy.engine import make_url

from aimichat.accounts import service as accounts
from aimichat.app import create_app
from aimichat.config import Settings
from aimichat.engines.embedded import EmbeddedEngine
from aimichat.keys import service as keys
from aimichat.store.db import Database

PG_URL = os.environ.get("AIMICHAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIMICHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
OUTPUT = Path(os.environ.get("AIMICHAT_TEST_OUTPUT", Path(__file__).parent.parent / "test-output"))


def tool_missing(reason: str) -> None:
    """A tool that `make test` installs is missing: skip on a developer's machine, fail in CI (``CI`` set)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; `make test` installs it, so CI must have it")
    pytest.skip(reason)


# -- model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine() -> EmbeddedEngine:
    """The embedded engine, loaded once and shared by every app in the session."""
    eng = EmbeddedEngine(
        context_length=2048,
        threads=os.cpu_count() or 1,
        system_prompt=Settings().system_prompt,
        max_queue=64,
    )
    eng.load()
    return eng


# -- databases -----------------------------------------------------------------------------------


def new_postgres_database() -> tuple[str, callable]:
    """Create an empty PostgreSQL database; return its URL and a function that drops it."""
    base = make_url(PG_URL)
    name = "aimichat_t_" + secrets.token_hex(6)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return base.set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'aimichat.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'aimichat.db'}"
        return
    url, drop = new_postgres_database()
    yield url
    drop()


@pytest.fixture
def database(db_url) -> Database:
    db = Database(db_url)
    db.upgrade()
    with db.session() as s:
        accounts.ensure_default_tier(s)
        s.commit()
    yield db
    db.dispose()


def make_account(db: Database, email: str = "user@example.com", *, tier: str = "free", daily: int | None = None,
                 monthly: int | None = None, cost_rule: str = "per_request", per_1k: int = 1, password: str = "correct horse") -> int:
    """Create an account (and its own tier when limits are given); returns the account id."""
    with db.session() as s:
        if daily is not None:
            tier = tier if tier != "free" else f"t_{secrets.token_hex(3)}"
            accounts.set_tier(s, tier, daily_credits=daily, monthly_credits=monthly, cost_rule=cost_rule, credits_per_1k_tokens=per_1k)
        account = accounts.create_account(s, email, password, tier=tier)
        s.commit()
        return account.id


def make_key(db: Database, email: str = "user@example.com", name: str = "test key") -> str:
    with db.session() as s:
        created = keys.create_key(s, accounts.get_account(s, email), name)
        s.commit()
        return created.secret


# -- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="on")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


class MutableClock:
    """An injectable clock (naive UTC) that tests move by hand."""

    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += dt.timedelta(**delta)


def serve_app(engine, db: Database, tmp_path: Path, *, clock=None, **settings) -> LiveServer:
    """A LiveServer for a fresh app over ``db``, sharing the session's engine."""
    cfg = Settings(data_dir=tmp_path, database_url=db.url, **settings)
    kwargs = {"clock": clock} if clock else {}
    app = create_app(cfg, engine=engine, db=db, close_engine=False, **kwargs)
    return LiveServer(app)


def wait_ready(urls: list[str], procs: list, timeout: float = 60) -> None:
    """Wait until every `aimichat serve` subprocess answers /readyz with 200 (fail at once if one exits)."""
    deadline = time.monotonic() + timeout
    for url, proc in zip(urls, procs):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
