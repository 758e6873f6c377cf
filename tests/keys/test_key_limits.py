"""Per-key limits inside the account's pool: caps, rate limits, expiry, scopes, rotation with grace.

Real HTTP servers over SQLite, PostgreSQL and PostgreSQL + Redis; two replicas (and, for the caps, two
`aimichat serve` processes) share the counters. Time is the injected clock.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.store.models import UsageCounter, UsageEvent
from fixtures import (
    REDIS_URL,
    LiveServer,
    MutableClock,
    app_client,
    free_port,
    make_account,
    serve_app,
    settled,
    wait_ready,
)
from scripted_engine import ScriptedEngine

HI = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
NOON = dt.datetime(2026, 11, 30, 12, 0, 5)


def key_for(db, email: str = "user@example.com", name: str = "k", **limits) -> tuple[int, str]:
    with db.session() as s:
        created = keys.create_key(s, accounts.get_account(s, email), name, keys.KeyLimits(**limits))
        s.commit()
        return created.key.id, created.secret


def chat(server, key: str, body: dict = HI, headers: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **(headers or {})}
    return server.http.post("/v1/chat/completions", json=body, headers=headers)


@pytest.fixture(params=["sql", "redis"])
def counters(request, redis_prefix) -> dict:
    """Where the credit counters live: the SQL database, or Redis."""
    return {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if request.param == "redis" else {}


def test_a_capped_key_gets_its_cap_and_no_more_across_two_replicas(database, tmp_path, counters):
    clock = MutableClock(NOON)
    make_account(database, daily=20)
    _, capped = key_for(database, name="capped", daily_cap=5)
    _, free = key_for(database, name="free")
    replicas = [serve_app(ScriptedEngine(), database, tmp_path / n, clock=clock, **counters) for n in "ab"]
    with replicas[0] as first, replicas[1] as second:

        def call(i: int) -> tuple[str, int, dict]:
            server, key = (first, second)[i % 2], (capped, free)[(i // 2) % 2]
            answer = chat(server, key)
            return ("capped" if key == capped else "free"), answer.status_code, answer.json()

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(100)))
    granted = {name: sum(1 for n, status, _ in results if n == name and status == 200) for name in ("capped", "free")}
    assert granted == {"capped": 5, "free": 15}
    refused_capped = [body for n, status, body in results if n == "capped" and status == 429]
    assert len(refused_capped) == 45
    assert {b["message"] for b in refused_capped} == {"Key daily credit limit reached"}
    assert {(b["limit"], b["used"]) for b in refused_capped} == {(5, 5)}
    with database.session() as s:
        total = s.scalar(select(func.sum(UsageEvent.credits)))
        counter = s.scalar(select(UsageCounter.used).where(UsageCounter.period == "day"))
    assert total == 20
    if not counters:
        assert counter == 20


def test_requests_per_minute_are_exact_across_replicas_and_come_back_next_minute(database, tmp_path, counters):
    clock = MutableClock(NOON)
    make_account(database, daily=1000)
    _, key = key_for(database, rpm=10)
    replicas = [serve_app(ScriptedEngine(), database, tmp_path / n, clock=clock, **counters) for n in "ab"]
    with replicas[0] as first, replicas[1] as second:
        with ThreadPoolExecutor(15) as pool:
            answers = list(pool.map(lambda i: chat((first, second)[i % 2], key), range(30)))
        assert sorted(a.status_code for a in answers) == [200] * 10 + [429] * 20
        refused = [a for a in answers if a.status_code == 429]
        assert {a.json()["message"] for a in refused} == {"Rate limit reached: 10 requests per minute"}
        assert all(1 <= int(a.headers["Retry-After"]) <= 60 for a in refused)
        assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
        ok = next(a for a in answers if a.status_code == 200)
        assert ok.headers["x-ratelimit-limit-requests"] == "10"
        clock.advance(minutes=1)
        again = chat(first, key)
        assert again.status_code == 200 and again.headers["x-ratelimit-remaining-requests"] == "9"


def test_tokens_per_minute_reserve_the_budget_and_give_back_what_was_not_used(database, tmp_path, counters):
    clock = MutableClock(NOON)
    make_account(database, daily=1000)
    _, key = key_for(database, tpm=100)
    with serve_app(ScriptedEngine(reply="one two"), database, tmp_path, clock=clock, **counters) as server:
        too_big = chat(server, key, {**HI, "max_tokens": 200})
        assert too_big.status_code == 429
        assert too_big.json()["message"] == "Rate limit reached: 100 tokens per minute"
        answer = chat(server, key, {**HI, "max_tokens": 50})  # reserves prompt + 50, uses prompt + 2
        assert answer.status_code == 200
        used = answer.json()["usage"]["total_tokens"]
        assert answer.headers["x-ratelimit-remaining-tokens"] == str(100 - used)
        settled(server)
        standing = server.http.get("/v1/key", headers={"X-API-Key": key}).json()
        assert standing["tokens_per_minute"]["used"] == used


def test_the_tighter_allotment_is_in_the_headers(server):
    make_account(server.db, daily=100)
    _, capped = key_for(server.db, daily_cap=3)
    _, free = key_for(server.db, name="free")
    answer = chat(server, capped)
    assert answer.headers["X-RateLimit-Scope"] == "key"
    assert (answer.headers["X-RateLimit-Limit"], answer.headers["X-RateLimit-Remaining"]) == ("3", "2")
    answer = chat(server, free)
    assert answer.headers["X-RateLimit-Scope"] == "account"
    assert (answer.headers["X-RateLimit-Limit"], answer.headers["X-RateLimit-Remaining"]) == ("100", "98")
    assert "x-ratelimit-limit-requests" not in answer.headers


def test_an_expired_key_says_so(database, tmp_path):
    clock = MutableClock(NOON)
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as client:
        make_account(database)
        _, key = key_for(database, expires_at=NOON + dt.timedelta(hours=1))
        assert chat(client, key).status_code == 200
        clock.advance(hours=1)
        refused = chat(client, key)
        assert refused.status_code == 401
        error = refused.json()["error"]
        assert error["code"] == "invalid_api_key" and "expired at 2026-11-30T13:00:05Z" in error["message"]


def test_scopes_refuse_other_networks_and_other_models(server):
    make_account(server.db)
    _, office = key_for(server.db, ips=("10.0.0.0/8",))
    refused = chat(server, office)  # from 127.0.0.1
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "key_scope_denied"
    assert "127.0.0.1" in refused.json()["error"]["message"]
    via_proxy = chat(server, office, headers={"X-Forwarded-For": "10.1.2.3"})  # 127.0.0.1 is a trusted proxy
    assert via_proxy.status_code == 200
    _, narrow = key_for(server.db, name="narrow", models=("some-other-model",))
    denied = chat(server, narrow, {**HI, "model": "aimichat-1"})
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "key_scope_denied" and denied.json()["error"]["param"] == "model"
    assert server.http.get("/v1/models", headers={"X-API-Key": narrow}).json()["data"] == []


def test_rotation_with_grace_keeps_usage_and_caps_then_retires_the_old_secret(database, tmp_path):
    clock = MutableClock(NOON)
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as client:
        make_account(database, daily=100)
        key_id, old = key_for(database, daily_cap=3)
        assert chat(client, old).status_code == 200
        with database.session() as s:
            new = keys.rotate_key(s, key_id, grace=dt.timedelta(hours=1), now=NOON).secret
            s.commit()
        assert chat(client, new).status_code == 200
        assert chat(client, old).status_code == 200  # within the grace period
        refused = chat(client, new)  # the cap counts the old secret's use too
        assert refused.status_code == 429 and refused.json()["message"] == "Key daily credit limit reached"
        standing = client.http.get("/v1/key", headers={"X-API-Key": new}).json()
        assert standing["id"] == key_id and standing["daily_cap"] == {
            "limit": 3,
            "used": 3,
            "remaining": 0,
            "resetAt": "2026-12-01T00:00:00Z",
        }
        clock.advance(hours=1)
        assert chat(client, old).status_code == 401
        assert client.http.get("/v1/key", headers={"X-API-Key": new}).status_code == 200


def test_a_tier_caps_the_number_of_active_keys(database):
    make_account(database, daily=10, tier="small")
    with database.session() as s:
        accounts.set_tier_limits(s, "small", max_keys=1)
        s.commit()
    key_id, _ = key_for(database)
    with pytest.raises(ValueError, match="allows 1 active keys"):
        key_for(database, name="second")
    with database.session() as s:
        keys.revoke_key(s, key_id)
        s.commit()
    key_for(database, name="second")


def test_tier_defaults_apply_to_keys_without_their_own(database, tmp_path):
    make_account(database, daily=100, tier="metered")
    with database.session() as s:
        accounts.set_tier_limits(s, "metered", rpm=2)
        s.commit()
    _, key = key_for(database)
    _, own = key_for(database, name="own", rpm=5)
    with app_client(ScriptedEngine(), database, tmp_path, clock=MutableClock(NOON)) as client:
        assert [chat(client, key).status_code for _ in range(3)] == [200, 200, 429]
        assert [chat(client, own).status_code for _ in range(5)] == [200] * 5
        standing = client.http.get("/v1/key", headers={"X-API-Key": own}).json()
        assert standing["requests_per_minute"]["limit"] == 5 and standing["requests_per_minute"]["remaining"] == 0


@pytest.mark.parametrize("counters", ["sql", "redis"])
def test_caps_hold_across_two_server_processes(tmp_path, counters, redis_prefix):
    """Two `aimichat serve` processes in front of one upstream, over PostgreSQL (and Redis)."""
    from aimichat.app import prepare_database
    from aimichat.config import Settings
    from aimichat.store.db import Database
    from engines.faulty_upstream import FaultyUpstream
    from fixtures import new_postgres_database

    url, drop = new_postgres_database()
    db = Database(url)
    try:
        prepare_database(db, Settings(data_dir=tmp_path, database_url=url))
        make_account(db, daily=20)
        _, capped = key_for(db, name="capped", daily_cap=5)
        _, free = key_for(db, name="free")
        with LiveServer(FaultyUpstream()) as upstream:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("AIMICHAT_")},
                "AIMICHAT_DATA_DIR": str(tmp_path),
                "AIMICHAT_DATABASE_URL": url,
                "AIMICHAT_ENGINE": "upstream",
                "AIMICHAT_UPSTREAM_URL": upstream.url + "/v1",
            }
            if counters == "redis":
                env |= {"AIMICHAT_REDIS_URL": REDIS_URL, "AIMICHAT_REDIS_PREFIX": redis_prefix}
            ports = [free_port(), free_port()]
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "aimichat", "serve", "--port", str(port), "--log-level", "warning"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for port in ports
            ]
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            try:
                wait_ready(urls, procs)

                def call(i: int) -> tuple[str, int, str]:
                    key = (capped, free)[(i // 2) % 2]
                    answer = httpx.post(
                        urls[i % 2] + "/v1/chat/completions",
                        json=HI,
                        headers={"Authorization": f"Bearer {key}"},
                        timeout=30,
                    )
                    message = answer.json().get("message", "") if answer.status_code == 429 else ""
                    return ("capped" if key == capped else "free"), answer.status_code, message

                with ThreadPoolExecutor(16) as pool:
                    results = list(pool.map(call, range(100)))
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                for proc in procs:
                    proc.wait(timeout=60)
        granted = {n: sum(1 for name, status, _ in results if name == n and status == 200) for n in ("capped", "free")}
        assert granted == {"capped": 5, "free": 15}
        assert {m for name, status, m in results if name == "capped" and status == 429} == {
            "Key daily credit limit reached"
        }
        with db.session() as s:
            assert s.scalar(select(func.sum(UsageEvent.credits))) == 20
    finally:
        db.dispose()
        drop()
