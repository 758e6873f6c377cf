"""The settlement of a chat answer is written after the answer has gone out (issue 14), and never lost.

A real socket (uvicorn in a thread) and the quota backend's ``settle`` held on a gate: the caller gets its
whole answer, with the refund already counted in ``X-RateLimit-Remaining``, while the ledger row is still
``reserved``; released, the row is charged exactly what the headers said. Over SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aimichat.api.chat import api_router, serving
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import REDIS_URL, LiveServer, app_client, make_account, make_key, serve_app, sse_events
from scripted_engine import ScriptedEngine

EMAIL = "later@example.com"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


class HeldSettlements:
    """Wraps a quota backend's ``settle``: each call waits for ``release`` (at most 10 s)."""

    def __init__(self, quota: Any) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self._settle = quota.settle

        def held(*args: Any, **kwargs: Any) -> bool:
            self.started.set()
            self.gate.wait(10)
            return bool(self._settle(*args, **kwargs))

        quota.settle = held


@pytest.fixture
def server(database: Database, tmp_path: Path) -> Iterator[LiveServer]:
    with serve_app(ScriptedEngine(), database, tmp_path) as live:
        make_account(database, EMAIL, tier="metered", daily=1000, cost_rule="per_token", per_1k=1000)
        live.key = make_key(database, EMAIL)
        yield live


def rows(db: Database) -> list[tuple[str, int]]:
    with db.session() as s:
        return [(r.status, r.credits) for r in s.scalars(select(UsageEvent).order_by(UsageEvent.id))]


def wait_for(check: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_the_answer_goes_out_before_its_settlement_is_written(server: LiveServer, stream: bool) -> None:
    assert server.db is not None
    held = HeldSettlements(server.app.state.quota)  # type: ignore[attr-defined]
    try:
        body = {**BODY, "stream": True, "stream_options": {"include_usage": True}} if stream else BODY
        response = server.chat(body)
        assert response.status_code == 200
        if stream:
            events = sse_events(response.text)
            assert events[-1] == "[DONE]"
            remaining = events[-2]["x_ratelimit"]["remaining"]  # type: ignore[index]  # after the refund
        else:
            remaining = int(response.headers["X-RateLimit-Remaining"])  # after the refund
        assert held.started.wait(5)
        [(status, reserved)] = rows(server.db)
        assert status == "reserved" and reserved == 4 + 50  # per_token at 1 credit a token: prompt + max_tokens
    finally:
        held.gate.set()
    charged = 1000 - remaining
    assert 4 < charged < reserved
    wait_for(lambda: rows(server.db)[0][0] == "charged")
    assert rows(server.db) == [("charged", charged)]
    # The next answer's headers agree with the ledger: nothing counted twice, nothing given back twice.
    again = server.chat(BODY)
    wait_for(lambda: all(status == "charged" for status, _ in rows(server.db)))
    assert int(again.headers["X-RateLimit-Remaining"]) == 1000 - sum(c for _, c in rows(server.db))


def test_a_pending_settlement_is_written_before_the_server_stops(database: Database, tmp_path: Path) -> None:
    live = serve_app(ScriptedEngine(), database, tmp_path)
    with live:
        make_account(database, EMAIL, tier="metered", daily=1000, cost_rule="per_token", per_1k=1000)
        live.key = make_key(database, EMAIL)
        held = HeldSettlements(live.app.state.quota)  # type: ignore[attr-defined]
        assert live.chat(BODY).status_code == 200
        assert held.started.wait(5)
        threading.Timer(0.5, held.gate.set).start()  # while the server is shutting down
    # uvicorn's graceful shutdown waits for the request's task, whose last step is the settlement.
    assert [status for status, _ in rows(database)] == ["charged"]


def test_the_accounts_next_request_waits_for_its_pending_settlement(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential requests of one account on one replica see each other's refunds, as before."""
    assert server.db is not None
    monkeypatch.setattr(serving, "UNSETTLED_WAIT", 10.0)  # the held settlement below takes 0.3 s, not 1 ms
    held = HeldSettlements(server.app.state.quota)  # type: ignore[attr-defined]
    second: list[Any] = []
    try:
        first = server.chat(BODY)
        assert first.status_code == 200 and held.started.wait(5)
        thread = threading.Thread(target=lambda: second.append(server.chat(BODY)))
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive()  # its reservation waits for the first answer's settlement...
        assert len(rows(server.db)) == 1  # ...and has not been taken yet
    finally:
        held.gate.set()
    thread.join(10)
    wait_for(lambda: [status for status, _ in rows(server.db)] == ["charged", "charged"])
    [first_charge, _] = [credits for _, credits in rows(server.db)]
    # Taken after the first's refund: what it says is left counts the first's charge only, not its reservation.
    assert int(second[0].headers["X-RateLimit-Remaining"]) == 1000 - first_charge - rows(server.db)[1][1]


def test_a_settlement_worked_out_is_written_when_no_answer_can_be_sent(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer that fails after the charge was worked out (here: it cannot be made into HTTP) still
    writes its settlement, rather than leave the row reserved for the sweeper."""

    def broken(result: Any) -> Any:
        raise RuntimeError("cannot render")

    monkeypatch.setattr(api_router, "chat_response", broken)
    with app_client(ScriptedEngine(), database, tmp_path) as client:
        make_account(database, EMAIL, tier="metered", daily=1000, cost_rule="per_token", per_1k=1000)
        client.key = make_key(database, EMAIL)
        with pytest.raises(RuntimeError, match="cannot render"):
            client.chat(BODY)
    [(status, credits)] = rows(database)
    assert status == "charged" and 4 < credits < 54


def test_a_settlement_that_hangs_holds_the_next_request_back_briefly_only(server: LiveServer) -> None:
    """A store that fails makes a settlement take seconds (timeouts, retries): the account's next request
    waits for it UNSETTLED_WAIT (0.25 s) at most, then goes on within its own bounds."""
    held = HeldSettlements(server.app.state.quota)  # type: ignore[attr-defined]
    try:
        assert server.chat(BODY).status_code == 200 and held.started.wait(5)
        started = time.monotonic()
        assert server.chat(BODY).status_code == 200  # answered while the first settlement still hangs
        assert serving.UNSETTLED_WAIT <= time.monotonic() - started < 2.0
    finally:
        held.gate.set()


@pytest.mark.parametrize("backend", ["sql", "redis"])
def test_a_settlement_that_gives_nothing_back_holds_the_next_request_back_on_redis_only(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_prefix: str, backend: str
) -> None:
    """A per-request price charges what it reserved: on SQL its settlement changes no counter, so the account's
    next request does not wait for it, and its headers are right all the same. On Redis a counter rebuilt
    while the row is open would keep it apart as a mark (QuotaBackend.exact_settlements_matter): it waits,
    as every settlement did. Either way the settlement is in flight for shutdown and the tests' ``settled``."""
    monkeypatch.setattr(serving, "UNSETTLED_WAIT", 1.0)
    redis = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if backend == "redis" else {}
    with serve_app(ScriptedEngine(), database, tmp_path, **redis) as live:
        make_account(database, EMAIL, daily=1000)  # the default tier's cost: 1 credit a request
        live.key = make_key(database, EMAIL)
        held = HeldSettlements(live.app.state.quota)  # type: ignore[attr-defined]
        try:
            assert live.chat(BODY).status_code == 200 and held.started.wait(5)
            started = time.monotonic()
            second = live.chat(BODY)
            waited = time.monotonic() - started
            assert second.status_code == 200 and int(second.headers["X-RateLimit-Remaining"]) == 1000 - 2
            assert waited >= serving.UNSETTLED_WAIT if backend == "redis" else waited < serving.UNSETTLED_WAIT
            assert len(live.app.state.chat.unsettled) >= 1  # type: ignore[attr-defined]
            assert [status for status, _ in rows(database)] == ["reserved", "reserved"]
        finally:
            held.gate.set()
        wait_for(lambda: not len(live.app.state.chat.unsettled))  # type: ignore[attr-defined]
        assert rows(database) == [("charged", 1), ("charged", 1)]
