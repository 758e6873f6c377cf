"""Credits over HTTP: exact 429s, headers on every answer, fair charges.

In-process with the scripted engine, but for a stream the client cuts (a real socket, so the hang-up is
real) and the two-server test (two `aimichat serve` processes sharing PostgreSQL, with the real model).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from aimichat.cli import cli
from aimichat.engines.base import EngineBusy, EngineError
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import (
    REDIS_URL,
    AppClient,
    MutableClock,
    app_client,
    free_port,
    iter_sse,
    make_account,
    make_key,
    migrated,
    new_postgres_database,
    serve_app,
    sse_events,
    sse_text,
    wait_ready,
)
from scripted_engine import ScriptedEngine, endless

HELLO = {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 1}
SPEC_429_KEYS = ["error", "message", "limit", "used", "resetAt"]


def fire_in_process(server: AppClient, keys: list[str], body: dict) -> list[httpx.Response]:
    """Send all requests at once (one per key, each from its own thread) and return every response."""
    with ThreadPoolExecutor(max_workers=len(keys)) as pool:
        return list(pool.map(lambda key: server.chat(body, key), keys))


async def fire(urls_and_keys: list[tuple[str, str]], body: dict) -> list[httpx.Response]:
    """Send all requests at once over real sockets (one per (url, key) pair) and return every response."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                for url, key in urls_and_keys
            )
        )


def ledger_rows(db: Database) -> list[UsageEvent]:
    with db.session() as s:
        return list(s.scalars(select(UsageEvent).order_by(UsageEvent.id)))


def assert_spec_429(r: httpx.Response, limit: int, message="Daily credit limit reached"):
    assert r.status_code == 429
    body = r.json()
    assert list(body) == SPEC_429_KEYS
    assert body["error"] == "Rate limit exceeded" and body["message"] == message
    assert body["limit"] == limit and body["used"] == limit
    reset = dt.datetime.strptime(body["resetAt"], "%Y-%m-%dT%H:%M:%SZ")
    assert r.headers["x-ratelimit-remaining"] == "0" or message.startswith("Monthly")
    return body, reset


def test_100_concurrent_requests_from_two_keys_against_20_credits(server):
    database = server.db
    make_account(database, daily=20)
    k1, k2 = make_key(database, name="one"), make_key(database, name="two")
    responses = fire_in_process(server, [k1 if i % 2 else k2 for i in range(100)], HELLO)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 20 and statuses.count(429) == 80
    for r in responses:
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(r.headers)
        if r.status_code == 429:
            assert_spec_429(r, 20)
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in responses if r.status_code == 200)
    assert remaining == list(range(20))  # every grant saw its own, distinct place in the allotment
    rows = ledger_rows(database)
    assert len(rows) == 20 and all(r.status == "charged" and r.credits == 1 for r in rows)


@pytest.mark.parametrize("counters", ["postgresql", "redis"])
def test_two_server_processes_sharing_postgresql_never_oversell(tmp_path, counters, redis_prefix):
    url, drop = new_postgres_database()
    db = migrated(url)
    procs = []
    try:
        make_account(db, "fleet@example.com", daily=20)
        key = make_key(db, "fleet@example.com")
        ports = [free_port(), free_port()]
        # redis_prefix is random, not port-based: a port is reused across runs, and a stale counter of an earlier
        # run's account 1 would refuse every request of this one.
        for port in ports:
            env = {
                **os.environ,
                "AIMICHAT_DATABASE_URL": url,
                "AIMICHAT_DATA_DIR": str(tmp_path),
                "AIMICHAT_CONTEXT_LENGTH": "1024",
                # Two replicas on one host split its cores, as deploy.md says: llama.cpp's threads spin while
                # they wait, and two processes of all cores each ran several times slower (requests timed out).
                "AIMICHAT_THREADS": str(max(1, (os.cpu_count() or 1) // 2)),
                # Two slots: still the batched engine, and a start-up that reads the system prompt into 2 slots, not 8.
                "AIMICHAT_PARALLEL": "2",
            }
            if counters == "redis":
                env.update(AIMICHAT_REDIS_URL=REDIS_URL, AIMICHAT_REDIS_PREFIX=redis_prefix)  # shared by both
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "aimichat", "serve", "--port", str(port), "--log-level", "warning"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        wait_ready(urls, procs)
        responses = asyncio.run(fire([(urls[i % 2], key) for i in range(100)], HELLO))
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 20 and statuses.count(429) == 80, [
            r.text for r in responses if r.status_code not in (200, 429)
        ]
        assert len(ledger_rows(db)) == 20
        # A key revoked through the CLI (run here: a process of its own, as far as the replicas can tell) is
        # refused by both replicas within a second.
        revoke = ["keys", "revoke", str(ledger_rows(db)[0].api_key_id)]
        done = CliRunner().invoke(cli, revoke, env={"AIMICHAT_DATABASE_URL": url}, catch_exceptions=False)
        assert done.exit_code == 0, done.output
        revoked_at = time.monotonic()
        for target in urls:
            while (
                httpx.post(
                    f"{target}/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"}, timeout=10
                ).status_code
                != 401
            ):
                assert time.monotonic() - revoked_at < 1.0
                time.sleep(0.05)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
        db.dispose()
        drop()


def test_streams_carry_the_headers_and_the_usage_chunk_carries_remaining_credits(server):
    make_account(server.db, daily=5)
    key = make_key(server.db)
    body = {**HELLO, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    r = server.chat(body, key)
    assert r.headers["x-ratelimit-limit"] == "5" and r.headers["x-ratelimit-remaining"] == "4"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["x_ratelimit"] == {"limit": 5, "remaining": 4, "reset": r.headers["x-ratelimit-reset"]}


def test_rollover_at_midnight_and_retry_after_agrees_with_reset_at(database, tmp_path):
    clock = MutableClock(dt.datetime(2024, 1, 18, 23, 59, 0))
    make_account(database, daily=1)
    key = make_key(database)
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as server, server.client() as c:
        headers = {"Authorization": f"Bearer {key}"}
        ok = c.post("/v1/chat/completions", json=HELLO, headers=headers)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-reset"] == "2024-01-19T00:00:00Z"
        refused = c.post("/v1/chat/completions", json=HELLO, headers=headers)
        body, reset = assert_spec_429(refused, 1)
        assert body["resetAt"] == "2024-01-19T00:00:00Z"
        assert int(refused.headers["retry-after"]) == (reset - clock.now).total_seconds() == 60
        clock.advance(seconds=60)
        assert c.post("/v1/chat/completions", json=HELLO, headers=headers).status_code == 200


def test_monthly_limit_answers_with_its_own_message(database, tmp_path):
    clock = MutableClock(dt.datetime(2024, 1, 31, 10, 0, 0))
    make_account(database, daily=5, monthly=1)
    key = make_key(database)
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as server, server.client() as c:
        headers = {"X-API-Key": key}
        assert c.post("/v1/chat/completions", json=HELLO, headers=headers).status_code == 200
        refused = c.post("/v1/chat/completions", json=HELLO, headers=headers)
        body, _ = assert_spec_429(refused, 1, "Monthly credit limit reached")
        assert body["resetAt"] == "2024-02-01T00:00:00Z"
        assert int(refused.headers["retry-after"]) == 14 * 3600


def test_per_token_charge_equals_the_tokens_used(server):
    database = server.db
    make_account(database, daily=10_000, cost_rule="per_token", per_1k=1000)  # 1 credit per token
    key = make_key(database)
    r = server.chat({**HELLO, "max_tokens": 20}, key)
    usage = r.json()["usage"]
    assert usage["completion_tokens"] < 20 and r.json()["choices"][0]["finish_reason"] == "stop"  # some came back
    assert int(r.headers["x-ratelimit-remaining"]) == 10_000 - usage["total_tokens"]  # the unused reservation came back
    [row] = ledger_rows(database)
    assert row.credits == usage["total_tokens"] and row.reserved_credits == usage["prompt_tokens"] + 20
    assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_per_token_clamps_max_tokens_to_what_the_credits_pay_for(database, tmp_path):
    make_account(database, daily=50, cost_rule="per_token", per_1k=1000)
    key = make_key(database)
    with app_client(ScriptedEngine(endless()), database, tmp_path) as server, server.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                **HELLO,
                "max_tokens": 500,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Write a long essay about rivers."}],
            },
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200
        usage = r.json()["usage"]
        assert usage["total_tokens"] == 50 and r.json()["choices"][0]["finish_reason"] == "length"
        assert r.headers["x-ratelimit-remaining"] == "0"
        assert c.post("/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"}).status_code == 429


def test_a_stream_cut_by_the_client_is_charged_for_what_was_sent(database, tmp_path):
    make_account(database, daily=10_000, cost_rule="per_token", per_1k=1000)
    key = make_key(database)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400, "stream": True}
    engine = ScriptedEngine(endless(), token_delay=0.02)  # 8 s for all 400: a hang-up must stop it well before
    with serve_app(engine, database, tmp_path) as server, server.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            events = iter_sse(r.iter_text())
            got = list(itertools.islice(events, 10))
            events.close()
        deadline = time.monotonic() + 5
        while ledger_rows(database)[0].status == "reserved" and time.monotonic() < deadline:
            time.sleep(0.02)
    generation = engine.generations[0]
    assert generation.outcome == "closed" and generation.tokens < 40, "the hang-up stopped the generation"
    [row] = ledger_rows(database)
    assert row.status == "charged"
    assert len(got) - 1 <= row.completion_tokens <= generation.tokens  # deltas received (the first event is the role)
    assert row.credits == row.prompt_tokens + row.completion_tokens < row.reserved_credits


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "error, code, retry_after",
    [
        (EngineError("injected failure"), "engine_error", "1"),
        (EngineBusy("queue full", retry_after=7), "engine_overloaded", "7"),
    ],
)
def test_an_engine_failure_before_output_is_charged_nothing(database, tmp_path, stream, error, code, retry_after):
    make_account(database, daily=10)
    key = make_key(database)
    with app_client(ScriptedEngine(error=error), database, tmp_path) as server:
        r = server.chat({**HELLO, "stream": stream}, key)
        assert r.status_code == 503 and r.headers["retry-after"] == retry_after
        assert r.json()["error"]["code"] == code
        assert r.headers["x-ratelimit-remaining"] == "10"  # the reservation came back
    [row] = ledger_rows(database)
    assert (row.status, row.credits) == ("released", 0)


def test_an_engine_failure_mid_stream_ends_with_an_error_event_and_charges_what_was_sent(database, tmp_path):
    make_account(database, daily=1000, cost_rule="per_token", per_1k=1000)
    key = make_key(database)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 100, "stream": True}
    with app_client(ScriptedEngine(endless(), fail_after=5), database, tmp_path) as server:
        r = server.chat(body, key)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert sse_text(events) == "one two three four five"  # what came before the failure
    [row] = ledger_rows(database)
    assert row.status == "charged" and row.completion_tokens == 5


def test_usage_endpoint_reports_today_month_and_keys_and_costs_nothing(server):
    database = server.db
    make_account(database, daily=10, monthly=100)
    k1, k2 = make_key(database, name="laptop"), make_key(database, name="server")
    with server.client() as c:
        for key in (k1, k1, k2):
            assert (
                c.post("/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"}).status_code
                == 200
            )
        usage = c.get("/v1/usage", headers={"Authorization": f"Bearer {k1}"}).json()
        again = c.get("/v1/usage", headers={"Authorization": f"Bearer {k1}"}).json()
    assert usage == again
    assert usage["daily"]["used"] == 3 and usage["daily"]["remaining"] == 7 and usage["daily"]["limit"] == 10
    assert usage["monthly"]["used"] == 3 and usage["monthly"]["limit"] == 100
    assert [(k["name"], k["credits"]) for k in usage["keys_today"]] == [("laptop", 2), ("server", 1)]


def test_a_stream_cut_before_any_text_is_charged_nothing(database, tmp_path):
    """As a non-streaming answer whose caller hung up: nothing received, nothing paid (issue 15, finding 9)."""
    import socket

    make_account(database, daily=10_000, cost_rule="per_token", per_1k=1000)
    key = make_key(database)
    engine = ScriptedEngine(endless(), first_token_delay=0.6, token_delay=0.05)
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "stream": True}).encode()
    with serve_app(engine, database, tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.2)  # reserved and waiting for the first token: hang up now
        deadline = time.monotonic() + 5
        while (
            not ledger_rows(database) or ledger_rows(database)[0].status == "reserved"
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
    [row] = ledger_rows(database)
    assert row.status == "released" and row.credits == 0, (row.status, row.credits)


@pytest.mark.parametrize("stream", [False, True])
def test_a_caller_who_hangs_up_while_queued_leaves_the_queue_and_pays_nothing(database, tmp_path, stream):
    """Issue 15, finding 5: requests whose clients were gone were still processed once a slot was free."""
    import socket

    make_account(database, daily=10_000, cost_rule="per_token", per_1k=1000)
    key = make_key(database)
    engine = ScriptedEngine(endless(), first_token_delay=3.0, token_delay=0.05)  # as if queued behind others
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50, "stream": stream}).encode()
    with serve_app(engine, database, tmp_path) as server:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while (
            not ledger_rows(database) or ledger_rows(database)[0].status == "reserved"
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        settled_after = time.monotonic() - started
    [row] = ledger_rows(database)
    assert row.status == "released" and row.credits == 0
    assert settled_after < 2.0, "it left the queue when its caller hung up, not when its turn came"
    assert engine.generations == [] or engine.generations[0].tokens == 0
