"""API keys: the token format, authentication over HTTP, revocation, and that keys never leak.

The HTTP tests run in-process (the app over SQLite and PostgreSQL, answered by the scripted engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event

from aimichat import single_flight
from aimichat.accounts import service as accounts
from aimichat.config import Settings
from aimichat.keys import service as keys
from aimichat.keys import tokens
from aimichat.keys.cache import PrincipalCache
from aimichat.store.db import Database
from conftest import AppClient, app_client, make_account, make_key, serve_app, settled
from scripted_engine import ScriptedEngine

HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


# -- the token format ----------------------------------------------------------------------------


def test_keys_have_the_documented_shape_and_checksum():
    key = tokens.generate_key()
    assert key.startswith("aimichat_") and len(key) == 9 + 32 + 6
    assert key[9:].isalnum()
    assert tokens.is_well_formed(key)
    assert len({tokens.generate_key() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # checksum typo
        lambda k: k[:12] + ("x" if k[12] != "x" else "y") + k[13:],  # body typo
        lambda k: k[:-1],  # truncated
        lambda k: "sk-" + k[9:],  # wrong prefix
        lambda k: k[:20] + "-" + k[21:],  # not base62
        lambda k: "",
        lambda k: k[:-1] + "é",  # a non-ASCII checksum character (compare_digest refuses such a str)
    ],
)
def test_mistyped_keys_fail_the_checksum(mangle):
    assert not tokens.is_well_formed(mangle(tokens.generate_key()))


def test_keys_are_stored_as_sha256_with_a_display_prefix(database):
    make_account(database)
    with database.session() as s:
        created = keys.create_key(s, accounts.get_account(s, "user@example.com"), "ci")
        s.commit()
        stored = keys.get_key(s, created.key.id)
    assert stored.key_hash == tokens.hash_key(created.secret) and created.secret not in stored.key_hash
    assert stored.prefix == created.secret[:13]


# -- authentication over HTTP --------------------------------------------------------------------


@pytest.fixture
def server(server: AppClient) -> AppClient:
    """The shared in-process app, with an account of 1,000 daily credits and its key."""
    make_account(server.db, daily=1000)
    server.key = make_key(server.db)
    return server


def chat(
    server: AppClient, headers: dict[str, str] | None = None, params: dict[str, str] | None = None, body: dict = HELLO
) -> httpx.Response:
    return server.http.post("/v1/chat/completions", json=body, headers=headers or {}, params=params)


def assert_401(r):
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_all_three_ways_to_send_a_key(server):
    assert chat(server, {"Authorization": f"Bearer {server.key}"}).status_code == 200
    assert chat(server, {"X-API-Key": server.key}).status_code == 200
    assert chat(server, params={"api_key": server.key}).status_code == 200


def test_two_different_keys_are_refused_rather_than_one_picked(server):
    """Which of two keys "wins" is not the caller's to guess (issue 15): a 400, whatever their order."""
    other = tokens.generate_key()  # well formed, unknown
    for headers, params in (
        ({"Authorization": f"Bearer {other}", "X-API-Key": server.key}, None),
        ({"X-API-Key": server.key}, {"api_key": other}),
    ):
        answer = chat(server, headers, params=params)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "ambiguous_api_key"
    assert chat(server, {"Authorization": f"Bearer {server.key}", "X-API-Key": server.key}).status_code == 200


def test_missing_malformed_and_unknown_keys_are_401(server):
    assert_401(chat(server))
    assert_401(chat(server, {"Authorization": "Bearer "}))
    assert_401(chat(server, {"Authorization": "Basic dXNlcjpwYXNz"}))
    assert_401(chat(server, {"X-API-Key": "aimichat_your_api_key_here"}))
    assert_401(chat(server, {"X-API-Key": tokens.generate_key()}))


def test_a_bad_checksum_is_refused_without_a_database_query(server):
    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(server.db.sql_engine, "before_cursor_execute", listener)
    try:
        assert_401(chat(server, {"Authorization": f"Bearer {server.key[:-1]}{'A' if server.key[-1] != 'A' else 'B'}"}))
    finally:
        event.remove(server.db.sql_engine, "before_cursor_execute", listener)
    assert statements == []


def test_a_revoked_key_stops_working_at_once(server):
    assert chat(server, {"X-API-Key": server.key}).status_code == 200
    with server.db.session() as s:
        [key] = keys.list_keys(s, accounts.get_account(s, "user@example.com").id)
        keys.revoke_key(s, key.id)
        s.commit()
    assert_401(chat(server, {"X-API-Key": server.key}))


def test_a_key_revoked_by_another_process_is_refused_within_the_cache_time(server):
    """A replica trusts a lookup for key_cache_seconds (0.5 s by default); the CLI or another replica
    revokes through a database connection of its own, which this process cannot see."""
    assert chat(server, {"X-API-Key": server.key}).status_code == 200
    elsewhere = Database(server.db.url)
    try:
        with elsewhere.session() as s:
            [key] = keys.list_keys(s, accounts.get_account(s, "user@example.com").id)
            keys.revoke_key(s, key.id)
            s.commit()
    finally:
        elsewhere.dispose()
    revoked_at = time.monotonic()
    while chat(server, {"X-API-Key": server.key}).status_code != 401:
        assert time.monotonic() - revoked_at < Settings().key_cache_seconds + 0.2
    assert_401(chat(server, {"X-API-Key": server.key}))


def test_a_known_key_skips_the_database_lookup(server):
    assert chat(server, {"X-API-Key": server.key}).status_code == 200
    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(server.db.sql_engine, "before_cursor_execute", listener)
    try:
        assert chat(server, {"X-API-Key": server.key}).status_code == 200
    finally:
        event.remove(server.db.sql_engine, "before_cursor_execute", listener)
    assert statements and not any("api_keys.key_hash" in sql for sql in statements)  # only the credit ledger ran


def test_the_principal_cache_expires_and_never_keeps_a_lookup_older_than_a_change():
    now = [0.0]
    cache = PrincipalCache(0.5, clock=lambda: now[0])
    principal = object()
    assert cache.get("d") is None
    cache.put("d", principal, cache.generation)
    now[0] = 0.49
    assert cache.get("d") is principal
    now[0] = 0.5
    assert cache.get("d") is None
    started = cache.generation  # a lookup starts, then a revocation commits before it is stored
    cache.clear()
    cache.put("d", principal, started)
    assert cache.get("d") is None
    off = PrincipalCache(0)
    off.put("d", principal, off.generation)
    assert off.get("d") is None


def test_requests_that_miss_the_cache_together_look_their_key_up_once(database, tmp_path, monkeypatch):
    """16 concurrent requests of one key whose cache entry expired: one lookup, not 16 (issue 14's profile)."""
    monkeypatch.setattr(single_flight, "JOIN_WAIT", 10.0)  # the lookup below takes 0.3 s, not 1 ms
    make_account(database, daily=1000)
    key = make_key(database)
    lookups = []

    def slow_lookup(_conn, _cursor, statement, *_args):
        if "api_keys.key_hash" in statement:
            lookups.append(statement)
            time.sleep(0.3)  # a slow database: every request arrives while the first lookup runs

    with serve_app(ScriptedEngine(), database, tmp_path) as live:
        event.listen(database.sql_engine, "before_cursor_execute", slow_lookup)
        try:

            async def burst() -> list[int]:
                async with httpx.AsyncClient(base_url=live.url, timeout=30, headers={"X-API-Key": key}) as client:
                    answers = await asyncio.gather(
                        *(client.post("/v1/chat/completions", json=HELLO) for _ in range(16))
                    )
                return [r.status_code for r in answers]

            assert asyncio.run(burst()) == [200] * 16
            assert len(lookups) == 1
            live.app.state.principals.clear()  # a change made here (a revocation, say): the next request looks again
            assert chat(live, {"X-API-Key": key}).status_code == 200
            assert len(lookups) == 2
        finally:
            event.remove(database.sql_engine, "before_cursor_execute", slow_lookup)
        settled(live)


def test_a_lookup_is_shared_by_the_requests_that_miss_while_it_runs_but_never_across_a_change():
    async def scenario() -> None:
        cache = PrincipalCache(0.5)
        found: list[object] = []  # what each lookup found: a new object each time
        release = asyncio.Event()

        async def lookup():
            found.append(object())
            mine = found[-1]
            await release.wait()
            return mine

        first = asyncio.ensure_future(cache.load("d", lookup))
        second = asyncio.ensure_future(cache.load("d", lookup))
        await asyncio.sleep(0)
        second.cancel()  # a waiter that gives up leaves the lookup to the others
        cache.clear()  # a change committed while the lookup runs (a new tier, say): later requests do not join it
        third = asyncio.ensure_future(cache.load("d", lookup))
        fourth = asyncio.ensure_future(cache.load("d", lookup))
        await asyncio.sleep(0.01)  # every load has reached its lookup
        release.set()
        assert await first is found[0]
        assert await third is found[1] and await fourth is found[1]  # the lookup that started after the change
        assert len(found) == 2
        assert cache.get("d") is found[1]  # the first one's, older than the change, was not stored

        async def broken():
            found.append(None)
            raise OSError("database down")

        cache.clear()
        failures = await asyncio.gather(cache.load("d", broken), cache.load("d", broken), return_exceptions=True)
        # A failure is not shared: the second request, which came while the first's lookup ran, tried itself.
        assert all(isinstance(f, OSError) for f in failures) and found[2:] == [None, None]
        assert await cache.load("d", lookup) is found[-1] and len(found) == 5  # nor kept

    asyncio.run(scenario())


def test_a_request_that_comes_while_a_lookup_is_stuck_looks_its_key_up_itself():
    """A lookup stuck on a store that stopped answering is not shared past JOIN_WAIT: a request that came
    after the store came back gets its own answer, not the stuck lookup's failure (as without sharing)."""

    async def scenario() -> None:
        cache = PrincipalCache(0.5)
        store_back = asyncio.Event()
        principal = object()

        async def stuck():
            await store_back.wait()
            raise OSError("connection timed out")  # what the stuck lookup finally says

        async def healthy():
            return principal

        first = asyncio.ensure_future(cache.load("d", stuck))
        await asyncio.sleep(0)
        started = time.monotonic()
        assert await cache.load("d", healthy) is principal  # it waited JOIN_WAIT, then looked up itself
        assert single_flight.JOIN_WAIT <= time.monotonic() - started < 1.0
        assert cache.get("d") is principal
        store_back.set()
        with pytest.raises(OSError):
            await first  # the request that started the stuck lookup gets its failure
        assert not len(cache._lookups)

    asyncio.run(scenario())


def test_a_disabled_account_is_403(server):
    with server.db.session() as s:
        accounts.set_disabled(s, "user@example.com")
        s.commit()
    r = chat(server, {"X-API-Key": server.key})
    assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled"


def test_keys_give_talk_mode_only(server):
    r = chat(server, {"X-API-Key": server.key}, body={**HELLO, "mode": "image"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "mode_not_allowed"
    assert chat(server, {"X-API-Key": server.key}, body={**HELLO, "mode": "talk"}).status_code == 200
    for path in ("/v1/embeddings", "/v1/images/generations", "/v1/audio/speech"):
        r = server.http.post(path, json={}, headers={"X-API-Key": server.key})
        assert r.status_code == 403 and r.json()["error"]["code"] == "mode_not_allowed", path


def test_last_used_is_recorded_at_most_once_a_minute(server):
    for _ in range(3):
        assert chat(server, {"X-API-Key": server.key}).status_code == 200
    with server.db.session() as s:
        [key] = keys.list_keys(s, accounts.get_account(s, "user@example.com").id)
        assert key.last_used_at is not None


def test_a_query_string_key_never_reaches_the_access_log(server, caplog):
    with caplog.at_level(logging.INFO, logger="aimichat.access"):
        assert chat(server, params={"api_key": server.key, "x": "1"}).status_code == 200
        assert_401(chat(server, params={"api_key": server.key[:-2] + "zz"}))
        encoded = server.http.post(f"/v1/chat/completions?api%5Fkey={server.key}", json=HELLO)
        assert encoded.status_code == 200  # the app decodes the name, so the log must too
    lines = [r.getMessage() for r in caplog.records if r.name == "aimichat.access"]
    assert len(lines) == 3 and all("api_key=[REDACTED]" in line for line in lines)
    assert not any(server.key[9:20] in line for line in caplog.text.splitlines())


def test_the_query_string_key_can_be_turned_off(database, tmp_path):
    make_account(database)
    key = make_key(database)
    with app_client(ScriptedEngine(), database, tmp_path, allow_query_key=False) as live:
        assert_401(chat(live, params={"api_key": key}))
        assert chat(live, {"X-API-Key": key}).status_code == 200


def test_the_database_file_holds_no_plaintext_key(sqlite_url, tmp_path):
    db = Database(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path) as live:
        make_account(db)
        key = make_key(db)
        assert chat(live, {"X-API-Key": key}).status_code == 200
    db.dispose()
    files = list(Path(sqlite_url.split(":///")[1]).parent.glob("aimichat.db*"))
    assert files
    for path in files:
        data = path.read_bytes()
        assert key.encode() not in data and key[9:41].encode() not in data
