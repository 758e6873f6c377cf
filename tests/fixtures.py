"""The tests' shared fixtures and helpers, in one place (``conftest.py`` registers the fixtures for pytest).

- Databases, parametrised over SQLite and PostgreSQL: ``database`` (migrated, holding the default tier
  alone; on PostgreSQL one database per session, emptied before each test) and ``db_url`` (a new, empty
  database); ``sqlite_url``, ``new_postgres_database``. Redis at ``REDIS_URL``, a ``redis_prefix`` per test.
- ``make_account`` / ``make_key``: plain functions over the store; ``MutableClock``: a clock tests move.
- Apps: ``app_client`` runs an app in-process (Starlette's TestClient: its lifespan, then requests through
  the same proxy-header handling uvicorn applies); ``serve_app`` serves one under uvicorn on a real socket
  (``LiveServer``), for what only a socket shows: hang-ups, streaming as it happens, other programs as clients.
  A chat answer's settlement is written after the answer is sent: before reading the ledger after answers
  from a socket, wait with ``settled(server)`` (in-process) or ``no_reserved_rows(db)`` (another process).
  Both take the engine to use: a ``ScriptedEngine`` (tests/scripted_engine.py) unless the model is what
  is tested, then conftest's session-wide ``engine``.
- ``server``: the app in-process over ``database`` with a scripted engine; ``api_server``: one per module
  over SQLite, with an account and its key (``.key``).
- ``sse_events`` / ``iter_sse``: the one SSE parser; ``migration_diff``: the one models-versus-migrations check.
- ``smtp_server``: a real SMTP server (aiosmtpd) in-process: ``.url`` for AIMICHAT_SMTP_URL, ``.messages`` the
  mails it received (``email.message.EmailMessage``), ``.wait(n)`` for mails sent after a response.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import functools
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import uvicorn
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from starlette.testclient import TestClient
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from aimichat.accounts import service as accounts
from aimichat.app import create_app
from aimichat.config import Settings
from aimichat.engines.base import Engine
from aimichat.keys import service as keys
from aimichat.registry.catalog import ModelSpec
from aimichat.registry.live import EngineFactory
from aimichat.store.clock import Clock
from aimichat.store.db import Database
from aimichat.store.models import Base, UsageEvent
from scripted_engine import ScriptedEngine

PG_URL = os.environ.get("AIMICHAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIMICHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
OUTPUT = Path(os.environ.get("AIMICHAT_TEST_OUTPUT", Path(__file__).parent.parent / "test-output"))


def tool_missing(reason: str) -> None:
    """A tool that `make test` installs is missing: skip on a developer's machine, fail in CI (``CI`` set)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; `make test` installs it, so CI must have it")
    pytest.skip(reason)


# -- databases -----------------------------------------------------------------------------------


def new_postgres_database() -> tuple[str, Callable[[], None]]:
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
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'aimichat.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'aimichat.db'}"
        return
    url, drop = new_postgres_database()
    yield url
    drop()


def migrated(url: str) -> Database:
    """A database at the head migration, with the default tier (what an app's start-up leaves)."""
    db = Database(url)
    db.upgrade()
    with db.session() as s:
        accounts.ensure_default_tier(s)
        s.commit()
    return db


class ReusedPostgres:
    """One migrated PostgreSQL database for a session's ``database`` fixtures, emptied before each test.

    Creating and migrating a database costs ~0.5 s; emptying one ~0.03 s: whatever a previous test left
    connected is disconnected, every row deleted, every sequence restarted and the default tier put back,
    which is what a new database at the head migration holds. Tests that change the schema take ``db_url``.
    """

    def __init__(self) -> None:
        self.url, self.drop = new_postgres_database()
        migrated(self.url).dispose()
        self._admin = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    def fresh(self) -> Database:
        with psycopg.connect(self._admin) as conn:  # one transaction
            conn.execute("SET LOCAL synchronous_commit = off")  # a test database need not survive a crash
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            for table in reversed(Base.metadata.sorted_tables):  # (TRUNCATE takes ~0.1 s: new files)
                conn.execute(f'DELETE FROM "{table.name}"')
            sequences = conn.execute("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'").fetchall()
            for (sequence,) in sequences:
                conn.execute(f'ALTER SEQUENCE "{sequence}" RESTART')
        db = Database(self.url)
        with db.session() as s:
            accounts.ensure_default_tier(s)
            s.commit()
        return db


@pytest.fixture(scope="session")
def reused_postgres() -> Iterator[ReusedPostgres]:
    reused = ReusedPostgres()
    yield reused
    reused.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A database at the head migration with the default tier and nothing else: a new SQLite file, then
    the session's PostgreSQL database emptied (``db_url`` gives a new, empty one of each instead)."""
    if request.param == "sqlite":
        db = migrated(f"sqlite:///{tmp_path / 'aimichat.db'}")
    else:
        db = request.getfixturevalue("reused_postgres").fresh()
    yield db
    db.dispose()


def migration_diff(db: Database) -> list[Any]:
    """What Alembic's autogenerate finds between ``db``'s schema and the models: nothing when they agree."""
    with db.sql_engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis; its keys are deleted afterwards."""
    prefix = "aimichat-test-" + secrets.token_hex(4)
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def make_account(
    db: Database,
    email: str = "user@example.com",
    *,
    tier: str = "free",
    daily: int | None = None,
    monthly: int | None = None,
    cost_rule: str = "per_request",
    per_1k: int = 1,
    password: str = "correct horse",
) -> int:
    """Create an account (and its own tier when limits are given); returns the account id."""
    with db.session() as s:
        if daily is not None:
            tier = tier if tier != "free" else f"t_{secrets.token_hex(3)}"
            accounts.set_tier(
                s, tier, daily_credits=daily, monthly_credits=monthly, cost_rule=cost_rule, credits_per_1k_tokens=per_1k
            )
        account = accounts.create_account(s, email, password, tier=tier)
        s.commit()
        return account.id


def make_key(db: Database, email: str = "user@example.com", name: str = "test key") -> str:
    with db.session() as s:
        created = keys.create_key(s, accounts.get_account(s, email), name)
        s.commit()
        return created.secret


class MutableClock:
    """An injectable clock (naive UTC) that tests move by hand."""

    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


# -- server-sent events --------------------------------------------------------------------------


def iter_sse(text: Iterable[str]) -> Iterator[dict[str, Any] | str]:
    """The data payloads of an event stream as its text arrives: JSON objects, and ``"[DONE]"`` as is.

    Checks the framing as it goes: every event is one ``data: `` line followed by a blank line, and (when
    the stream is read to its end) nothing is left over.
    """
    pending = ""
    for piece in text:
        pending += piece
        while "\n\n" in pending:
            block, pending = pending.split("\n\n", 1)
            assert block.startswith("data: ") and "\n" not in block, f"not one data line: {block!r}"
            payload = block[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)
    assert pending == "", f"the stream ended inside an event: {pending!r}"


def sse_events(body: str) -> list[dict[str, Any] | str]:
    """A whole event-stream body's payloads (see ``iter_sse``)."""
    return list(iter_sse([body]))


def sse_text(events: list[dict[str, Any] | str]) -> str:
    """The reply a stream carried: what the spec's minimal client joins, ``choices[0].delta.content``."""
    return "".join(
        e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e.get("choices")
    )


# -- apps ----------------------------------------------------------------------------------------


def build_app(
    engine: Engine,
    db: Database,
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    engine_factory: EngineFactory | None = None,
    fast_chat: bool = True,
    **settings: Any,
) -> FastAPI:
    """A fresh app over ``db`` and ``engine`` (which it starts, and leaves open for the next app).
    ``engine_factory`` builds the engines of the registry's models (default: a ScriptedEngine each);
    ``fast_chat=False``: chat requests go to the FastAPI route (see api/chat/fast_path.py)."""
    cfg = Settings(data_dir=tmp_path, database_url=db.url, **settings)
    return create_app(
        cfg,
        engine=engine,
        database=db,
        close_engine=False,
        engine_factory=engine_factory or scripted_factory(),
        fast_chat=fast_chat,
        **({"clock": clock} if clock else {}),
    )


def scripted_factory(**options: Any) -> EngineFactory:
    """Builds a ScriptedEngine (with ``options``) named after each registry model, its system prompt
    taken from the model's settings when it has one; ``.built`` maps model names to the engines made."""
    built: dict[str, ScriptedEngine] = {}

    def build(spec: ModelSpec, threads: int | None) -> Engine:
        prompt = getattr(spec.config, "system_prompt", None)
        engine = ScriptedEngine(model_id=spec.name, **({"system_prompt": prompt} if prompt else {}), **options)
        built[spec.name] = engine
        return engine

    build.built = built  # type: ignore[attr-defined]
    return build


CLIENT_ADDRESS = ("127.0.0.1", 50000)  # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: so does AppClient


class _Server:
    """What AppClient and LiveServer share: ``http`` (an httpx.Client on the app), ``url``, and the app's
    ``db`` and ``engine``; ``key`` is set by fixtures that make an account."""

    http: httpx.Client
    url: str
    key: str

    def chat(self, body: dict[str, Any], key: str | None = None, **kwargs: Any) -> httpx.Response:
        """POST /v1/chat/completions with ``key`` (default: ``self.key``) as a Bearer token."""
        headers = {"Authorization": f"Bearer {key or self.key}", **kwargs.pop("headers", {})}
        return self.http.post("/v1/chat/completions", json=body, headers=headers, **kwargs)


class _SharedLoopClient(TestClient):
    """Another cookie jar on an AppClient's app: same event loop, and no second lifespan."""

    def __enter__(self) -> _SharedLoopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AppClient(_Server):
    """An app run in-process: ``with`` runs its lifespan once (migrations, engine start), and ``http`` (a
    Starlette TestClient, an httpx.Client) sends requests into it on one event loop, from 127.0.0.1 and
    through uvicorn's proxy-header handling, so the app sees what it sees behind a real socket.

    ``client()`` gives another client (its own cookies) on the same app. The body of a streamed answer
    arrives whole: tests of hang-ups and of streaming as it happens use a LiveServer.
    """

    def __init__(self, app: FastAPI, url: str = "http://127.0.0.1:8000"):
        self.app = app
        self.url = url
        self._asgi = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")
        # Redirects are not followed, as by any httpx.Client (TestClient's own default is to follow them).
        self.http = TestClient(self._asgi, base_url=url, client=CLIENT_ADDRESS, follow_redirects=False)
        self.db: Database = app.state.database
        self.engine: Engine = app.state.engine
        self.key = ""  # the API key of the fixture's account, where the fixture makes one

    def __enter__(self) -> AppClient:
        self.http.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.__exit__(*exc)

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("follow_redirects", False)
        other = _SharedLoopClient(self._asgi, base_url=self.url, client=CLIENT_ADDRESS, **kwargs)
        other.portal = self.http.portal  # run on the app's loop, where its lifespan ran
        return other


def app_client(
    engine: Engine, db: Database, tmp_path: Path, *, clock: Clock | None = None, **settings: Any
) -> AppClient:
    """An AppClient for a fresh app over ``db`` and ``engine``; use it as a context manager
    (``engine_factory=`` as for :func:`build_app`)."""
    return AppClient(build_app(engine, db, tmp_path, clock=clock, **settings))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer(_Server):
    """An ASGI app served by uvicorn on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app: ASGIApp, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        state = getattr(app, "state", None)  # an AimiChat app's; a plain ASGI app (a fake upstream) has none
        self.db: Database | None = getattr(state, "database", None)
        self.engine: Engine | None = getattr(state, "engine", None)
        self.key = ""
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
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if "http" in self.__dict__:
            self.http.close()
        self._server.should_exit = True
        self._thread.join(timeout=15)

    @functools.cached_property
    def http(self) -> httpx.Client:
        return self.client()  # made on first use: an httpx.Client builds an SSL context (~20 ms)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def serve_app(
    engine: Engine, db: Database, tmp_path: Path, *, clock: Clock | None = None, **settings: Any
) -> LiveServer:
    """A LiveServer for a fresh app over ``db`` and ``engine``; use it as a context manager."""
    return LiveServer(build_app(engine, db, tmp_path, clock=clock, **settings))


def settled(*servers: _Server | FastAPI, timeout: float = 10) -> None:
    """Wait until the chat answers the apps (in this process) have sent have written their settlements.

    ``/v1/chat/completions`` writes an answer's settlement after sending it (issue 14): a test that reads the
    ledger right after an answer from a real socket must wait for it. For a server in another process, see
    :func:`no_reserved_rows`."""
    deadline = time.monotonic() + timeout
    for server in servers:
        app = server if isinstance(server, FastAPI) else server.app
        while len(app.state.chat.unsettled):
            assert time.monotonic() < deadline, "settlements still in flight"
            time.sleep(0.005)


def no_reserved_rows(db: Database, timeout: float = 10) -> None:
    """Wait until no ledger row is ``reserved``: every answer sent by a server in another process has written
    its settlement (see :func:`settled`). Returns quietly on timeout: the test's assertions say what is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as s:
            if not s.scalar(select(func.count()).select_from(UsageEvent).where(UsageEvent.status == "reserved")):
                return
        time.sleep(0.01)


def wait_ready(urls: list[str], procs: list, timeout: float = 60) -> None:
    """Wait until every `aimichat serve` subprocess answers /readyz with 200 (fail at once if one exits)."""
    deadline = time.monotonic() + timeout
    for url, proc in zip(urls, procs, strict=True):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)


# -- app fixtures --------------------------------------------------------------------------------


@pytest.fixture
def server(database: Database, tmp_path: Path) -> Iterator[AppClient]:
    """The app in-process over ``database`` (SQLite, then PostgreSQL), answered by a ScriptedEngine; no accounts."""
    with app_client(ScriptedEngine(), database, tmp_path) as client:
        yield client


API_EMAIL = "api@example.com"


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppClient]:
    """One in-process app per module over SQLite, answered by a ScriptedEngine, with an account of
    100,000 daily credits (``API_EMAIL``) and its key (``.key``). For tests that change no shared state."""
    tmp = tmp_path_factory.mktemp("api")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with app_client(ScriptedEngine(), db, tmp) as client:
        make_account(db, API_EMAIL, daily=100_000)
        client.key = make_key(db, API_EMAIL)
        yield client
    db.dispose()


# -- mail ----------------------------------------------------------------------------------------


class SmtpServer:
    """A real SMTP server (aiosmtpd) on 127.0.0.1, in its own thread. It takes mail only after AUTH with the
    credentials in ``url`` (so a sender that drops them fails); ``messages`` are the mails it received."""

    USER, PASSWORD = "aimichat", "smtp-secret"

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
                self.USER.encode(),
                self.PASSWORD.encode(),
            )
            return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself

        self.messages: list[EmailMessage] = []
        self.port = free_port()
        # starttls=false said outright: this loopback server offers no TLS, and credentials over smtp:// would
        # otherwise require it (docs/email.md).
        self.url = f"smtp://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}?starttls=false"
        self._received = threading.Condition()
        self._controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_require_tls=False,  # a test server on the loopback; real ones are reached over TLS
        )

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not session.authenticated:  # (aiosmtpd's auth_required=True warns about plain-text AUTH)
            return "530 5.7.0 Authentication required"
        # SMTP carries CRLF line ends; a mail program shows plain lines, and so do these messages.
        message = email.message_from_bytes(envelope.content.replace(b"\r\n", b"\n"), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._received:
            self.messages.append(message)
            self._received.notify_all()
        return "250 Message accepted for delivery"

    def wait(self, count: int = 1, timeout: float = 10) -> list[EmailMessage]:
        """The mails received once there are at least ``count`` (mail leaves after the response that caused it)."""
        with self._received:
            assert self._received.wait_for(lambda: len(self.messages) >= count, timeout), (
                f"expected {count} mail(s), got {len(self.messages)}"
            )
            return list(self.messages)

    def __enter__(self) -> SmtpServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server in-process: set ``AIMICHAT_SMTP_URL`` (``smtp_url=``) to its ``.url``."""
    with SmtpServer() as server:
        yield server
