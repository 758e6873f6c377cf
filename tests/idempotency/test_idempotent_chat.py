"""``Idempotency-Key`` on ``POST /v1/chat/completions``: a retry gets the first answer and is charged once.

Through the real app with the scripted engine: in-process where the answer is what is checked, behind
a real socket where timing is (a retry while the first still streams, a hang-up, two servers sharing
PostgreSQL). "Charged once" is read from the ledger (one row, charged) and the engine (one generation).
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from aimichat.engines.base import EngineError
from aimichat.store.db import Database
from aimichat.store.models import IdempotencyRecord, UsageEvent
from conftest import (
    AppClient,
    LiveServer,
    MutableClock,
    app_client,
    iter_sse,
    make_account,
    make_key,
    migrated,
    serve_app,
    sse_events,
    sse_text,
)
from scripted_engine import REPLY, ScriptedEngine, endless

HELLO = {"messages": [{"role": "user", "content": "Hello, how are you?"}]}
STREAM = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-scope")


def with_key(key: str) -> dict[str, dict[str, str]]:
    return {"headers": {"Idempotency-Key": key}}


def ledger(db: Database) -> list[tuple[str, int]]:
    """(status, credits) of every ledger row, oldest first."""
    with db.session() as s:
        return [(r.status, r.credits) for r in s.scalars(select(UsageEvent).order_by(UsageEvent.id))]


def records(db: Database) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(IdempotencyRecord)) or 0


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Database:
    db = migrated(sqlite_url)
    yield db
    db.dispose()


def start(server: AppClient | LiveServer, daily: int = 1000) -> str:
    make_account(server.db, daily=daily)
    server.key = make_key(server.db)
    return server.key


def test_same_key_twice_gets_the_first_answer_and_is_charged_once(database, tmp_path):
    engine = ScriptedEngine()
    with app_client(engine, database, tmp_path) as server:
        start(server)
        first = server.chat(HELLO, **with_key("order-1"))
        again = server.chat(HELLO, **with_key("order-1"))
        other = server.chat(HELLO, **with_key("order-2"))

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and first.json()["choices"][0]["message"]["content"] == REPLY
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert [again.headers[h] for h in RATE_HEADERS] == [first.headers[h] for h in RATE_HEADERS]
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["x-request-id"] != first.headers["x-request-id"]  # the retry is its own request
    assert other.json()["id"] != first.json()["id"]  # another key is another request
    assert len(engine.generations) == 2
    assert ledger(database) == [("charged", 1), ("charged", 1)]


def test_a_stream_is_replayed_event_for_event(sqlite_db, tmp_path):
    engine = ScriptedEngine()
    with app_client(engine, sqlite_db, tmp_path) as server:
        start(server)
        first = server.chat(STREAM, **with_key("stream-1"))
        again = server.chat(STREAM, **with_key("stream-1"))

    events = sse_events(first.text)
    assert events[-1] == "[DONE]" and sse_text(events) == REPLY
    assert again.content == first.content and sse_events(again.text) == events
    assert again.headers["content-type"].startswith("text/event-stream")
    assert again.headers["cache-control"] == "no-cache" and again.headers["idempotent-replayed"] == "true"
    assert len(engine.generations) == 1 and ledger(sqlite_db) == [("charged", 1)]


def test_a_key_is_the_accounts_whichever_of_its_keys_sends_it(sqlite_db, tmp_path):
    with app_client(ScriptedEngine(), sqlite_db, tmp_path) as server:
        laptop = start(server)
        phone = make_key(sqlite_db, name="phone")
        make_account(sqlite_db, "other@example.com")
        stranger = make_key(sqlite_db, "other@example.com")
        first = server.chat(HELLO, laptop, **with_key("shared"))
        same_account = server.chat(HELLO, phone, **with_key("shared"))
        other_account = server.chat(HELLO, stranger, **with_key("shared"))

    assert same_account.json()["id"] == first.json()["id"]
    assert other_account.status_code == 200 and other_account.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in other_account.headers


def test_the_same_key_with_another_body_is_refused_and_bad_keys_are_400(sqlite_db, tmp_path):
    with app_client(ScriptedEngine(), sqlite_db, tmp_path) as server:
        start(server)
        assert server.chat(HELLO, **with_key("k")).status_code == 200
        other = server.chat({**HELLO, "max_tokens": 3}, **with_key("k"))
        empty = server.chat(HELLO, **with_key(""))
        too_long = server.chat(HELLO, **with_key("x" * 256))
        longest = server.chat(HELLO, **with_key("x" * 255))

    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert set(other.json()["error"]) == {"message", "type", "param", "code"}
    for bad in (empty, too_long):
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["code"] == "invalid_idempotency_key"
        assert bad.json()["error"]["param"] == "Idempotency-Key"
    assert longest.status_code == 200
    assert ledger(sqlite_db) == [("charged", 1), ("charged", 1)]  # refusals run nothing


def test_the_openapi_document_names_the_header(sqlite_db, tmp_path):
    with app_client(ScriptedEngine(), sqlite_db, tmp_path) as server:
        operation = server.http.get("/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]
    [header] = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert header["in"] == "header" and header["schema"]["maxLength"] == 255


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_first_attempt_lets_the_retry_run(sqlite_db, tmp_path, stream):
    engine = ScriptedEngine(error=EngineError("injected failure"))
    with app_client(engine, sqlite_db, tmp_path) as server:
        start(server)
        body = STREAM if stream else HELLO
        failed = server.chat(body, **with_key("retry-me"))
        engine.error = None
        retried = server.chat(body, **with_key("retry-me"))
        replayed = server.chat(body, **with_key("retry-me"))

    assert failed.status_code == 503 and failed.json()["error"]["code"] == "engine_error"
    assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
    assert replayed.content == retried.content and replayed.headers["idempotent-replayed"] == "true"
    assert ledger(sqlite_db) == [("released", 0), ("charged", 1)]


def test_a_stream_that_failed_midway_is_not_replayed(sqlite_db, tmp_path):
    engine = ScriptedEngine(endless(), fail_after=3)
    body = {**STREAM, "max_tokens": 5}
    with app_client(engine, sqlite_db, tmp_path) as server:
        start(server)
        failed = server.chat(body, **with_key("midway"))
        engine.fail_after = None
        retried = server.chat(body, **with_key("midway"))

    assert "error" in sse_events(failed.text)[-2]
    assert sse_text(sse_events(retried.text)) == "one two three four five"
    assert "idempotent-replayed" not in retried.headers and len(engine.generations) == 2


def test_a_4xx_is_replayed_but_a_429_is_not(sqlite_db, tmp_path):
    clock = MutableClock(dt.datetime(2026, 3, 1, 12, 0))
    with app_client(ScriptedEngine(), sqlite_db, tmp_path, clock=clock) as server:
        start(server, daily=1)
        refused = server.chat({**HELLO, "mode": "code"}, **with_key("mode"))
        refused_again = server.chat({**HELLO, "mode": "code"}, **with_key("mode"))
        assert server.chat(HELLO).status_code == 200  # the day's one credit
        spent = server.chat(HELLO, **with_key("tomorrow"))
        clock.advance(days=1)
        next_day = server.chat(HELLO, **with_key("tomorrow"))

    assert refused.status_code == refused_again.status_code == 403
    assert refused_again.json() == refused.json() and refused_again.headers["idempotent-replayed"] == "true"
    assert spent.status_code == 429 and next_day.status_code == 200
    assert "idempotent-replayed" not in next_day.headers


def test_an_answer_is_kept_24_hours_then_the_key_runs_anew(database, tmp_path):
    clock = MutableClock(dt.datetime(2026, 3, 1, 12, 0))
    engine = ScriptedEngine()
    with app_client(engine, database, tmp_path, clock=clock) as server:
        start(server)
        first = server.chat(HELLO, **with_key("daily-report"))
        clock.advance(hours=23, minutes=59)
        within = server.chat(HELLO, **with_key("daily-report"))
        clock.advance(minutes=1)
        after = server.chat(HELLO, **with_key("daily-report"))

    assert within.json()["id"] == first.json()["id"]
    assert after.status_code == 200 and after.json()["id"] != first.json()["id"]
    assert len(engine.generations) == 2 and [s for s, _ in ledger(database)] == ["charged", "charged"]


def stream_in_thread(server: LiveServer, body: dict, key: str) -> tuple[threading.Thread, threading.Event, list]:
    """Stream ``body`` with Idempotency-Key ``key`` from a thread; the event is set once the first event
    has arrived, and the list receives the stream's text when it ends."""
    started, got = threading.Event(), []

    def run() -> None:
        with server.client() as c:
            headers = {"Authorization": f"Bearer {server.key}", "Idempotency-Key": key}
            with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                text = ""
                for piece in r.iter_text():
                    text += piece
                    started.set()
                got.append(text)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(10), "the first stream did not start"
    return thread, started, got


def test_a_retry_while_the_first_still_streams_waits_for_it(database, tmp_path):
    engine = ScriptedEngine(token_delay=0.05)  # ~0.7 s for the reply
    with serve_app(engine, database, tmp_path) as server:
        start(server)
        thread, _, got = stream_in_thread(server, STREAM, "slow")
        assert engine.generations[0].outcome == "running"
        retry = server.chat(STREAM, headers={"Idempotency-Key": "slow"}, timeout=30)
        thread.join(10)

    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert retry.text == got[0] and sse_text(sse_events(retry.text)) == REPLY
    assert len(engine.generations) == 1 and ledger(database) == [("charged", 1)]


def test_a_retry_waits_only_so_long_then_409(sqlite_db, tmp_path):
    engine = ScriptedEngine(token_delay=0.1)  # ~1.4 s for the reply
    with serve_app(engine, sqlite_db, tmp_path, idempotency_wait=0.3) as server:
        start(server)
        thread, _, got = stream_in_thread(server, STREAM, "busy")
        busy = server.chat(STREAM, headers={"Idempotency-Key": "busy"})
        thread.join(10)
        after = server.chat(STREAM, headers={"Idempotency-Key": "busy"})

    assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_key_in_progress"
    assert busy.headers["retry-after"] == "1"
    assert after.text == got[0] and len(engine.generations) == 1


def test_a_caller_hanging_up_mid_stream_releases_the_key(sqlite_db, tmp_path):
    engine = ScriptedEngine(endless(), token_delay=0.02)
    body = {**STREAM, "max_tokens": 200}
    with serve_app(engine, sqlite_db, tmp_path) as server, server.client() as c:
        start(server)
        headers = {"Authorization": f"Bearer {server.key}", "Idempotency-Key": "cut"}
        with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            events = iter_sse(r.iter_text())
            list(itertools.islice(events, 5))
            events.close()
        deadline = time.monotonic() + 5
        while records(sqlite_db) and time.monotonic() < deadline:  # released as the server notices
            time.sleep(0.02)
        assert records(sqlite_db) == 0
        engine.reply = "A fresh answer."
        retried = server.chat({**body, "max_tokens": 200}, headers={"Idempotency-Key": "cut"})

    assert sse_text(sse_events(retried.text)) == "A fresh answer." and "idempotent-replayed" not in retried.headers
    assert len(engine.generations) == 2


def test_two_servers_sharing_postgresql_answer_a_key_once(reused_postgres, tmp_path):
    db_a = reused_postgres.fresh()
    db_b = Database(db_a.url)  # the second replica's own pool
    engine_a, engine_b = ScriptedEngine(token_delay=0.05), ScriptedEngine(token_delay=0.05)
    try:
        with (
            serve_app(engine_a, db_a, tmp_path / "a") as a,
            serve_app(engine_b, db_b, tmp_path / "b") as b,
        ):
            b.key = start(a)
            thread, _, got = stream_in_thread(a, STREAM, "fleet")
            on_b = b.chat(STREAM, headers={"Idempotency-Key": "fleet"}, timeout=30)  # while a still streams
            thread.join(10)
            # Both replicas at once, once the answer is kept: neither runs it again.
            with ThreadPoolExecutor(4) as pool:
                later = list(pool.map(lambda s: s.chat(STREAM, headers={"Idempotency-Key": "fleet"}), [a, b, a, b]))
            # A new key sent to both replicas at the same moment runs on one of them only.
            with ThreadPoolExecutor(2) as pool:
                racing = list(pool.map(lambda s: s.chat(HELLO, headers={"Idempotency-Key": "race"}), [a, b]))
    finally:
        db_b.dispose()
        db_a.dispose()

    assert on_b.status_code == 200 and on_b.text == got[0] and sse_text(sse_events(got[0])) == REPLY
    assert all(r.text == got[0] and r.headers["idempotent-replayed"] == "true" for r in later)
    assert racing[0].json()["id"] == racing[1].json()["id"]
    assert len(engine_a.generations) + len(engine_b.generations) == 2
    assert ledger(db_a) == [("charged", 1), ("charged", 1)]
