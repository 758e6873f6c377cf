"""Per-account fairness (issue 15, finding 5): one account cannot shut another out of the engine.

The rules are tested directly (``AdmissionGate``, ``check_prompt_size``, ``Fairness``) and through a live
server whose engine (a ScriptedEngine) takes one request at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hostile_helpers import with_fairness
from sqlalchemy import text

from aimichat import single_flight
from aimichat.accounts import service as accounts
from aimichat.engines.base import EngineBusy
from aimichat.quota.fairness import (
    AdmissionGate,
    Fairness,
    PromptOverTierLimit,
    TierLimits,
    TierLimitsCache,
    check_prompt_size,
)
from aimichat.store.db import Database
from conftest import LiveServer, build_app, make_account, make_key, migrated
from scripted_engine import ScriptedEngine

# -- the rules ------------------------------------------------------------------------------------


async def _admitted_in_order(gate: AdmissionGate, arrivals: list[str]) -> list[str]:
    """Who got each turn, when ``arrivals`` (account names, in order) all want one while a turn is taken."""
    await gate.enter("first")  # holds the only slot while the others line up
    order: list[str] = []

    async def one(account: str) -> None:
        await gate.enter(account)
        order.append(account)
        await asyncio.sleep(0)
        gate.leave()

    tasks = []
    for account in arrivals:
        tasks.append(asyncio.create_task(one(account)))
        await asyncio.sleep(0)  # each waits before the next arrives
    gate.leave()
    await asyncio.gather(*tasks)
    return order


def test_turns_go_round_robin_between_accounts_not_in_arrival_order() -> None:
    gate = AdmissionGate(slots=1, max_waiting=100, timeout=5)
    order = asyncio.run(_admitted_in_order(gate, ["a"] * 6 + ["b", "c"]))
    assert order == ["a", "b", "c", "a", "a", "a", "a", "a"]  # FIFO would serve b and c last
    assert (gate.running, gate.waiting) == (0, 0)


def test_a_full_waiting_room_sends_back_the_hog_not_the_newcomer() -> None:
    asyncio.run(_full_waiting_room())


async def _full_waiting_room() -> None:
    gate = AdmissionGate(slots=1, max_waiting=3, timeout=5)
    await gate.enter("hog")
    hog = [asyncio.create_task(gate.enter("hog")) for _ in range(3)]
    await asyncio.sleep(0)
    assert gate.waiting == 3
    newcomer = asyncio.create_task(gate.enter("other"))
    await asyncio.sleep(0)
    with pytest.raises(EngineBusy):
        await hog[-1]  # the hog's newest request made room
    with pytest.raises(EngineBusy):  # the account with the most waiting is refused outright
        await gate.enter("hog")
    gate.leave()
    await hog[0]  # the hog was in line first
    gate.leave()
    await newcomer  # then the other account, before the hog's next
    assert not hog[1].done()
    gate.leave()
    await hog[1]
    gate.leave()
    assert (gate.running, gate.waiting) == (0, 0)


def test_a_wait_given_up_or_timed_out_leaves_the_queue() -> None:
    asyncio.run(_given_up())


async def _given_up() -> None:
    gate = AdmissionGate(slots=1, max_waiting=10, timeout=0.05)
    await gate.enter("a")
    with pytest.raises(EngineBusy, match="Timed out"):
        await gate.enter("b")
    gone = asyncio.create_task(gate.enter("c"))
    await asyncio.sleep(0)
    gone.cancel()  # the caller hung up
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert gate.waiting == 0
    gate.leave()
    assert gate.running == 0  # no turn was handed to a request that left


def test_prompt_size_is_the_tiers_limit_and_unlimited_without_one() -> None:
    check_prompt_size(TierLimits(max_prompt_tokens=10), "free", 10)
    check_prompt_size(TierLimits(), "free", 10**6)
    with pytest.raises(PromptOverTierLimit, match=r"\(free\) allows prompts of at most 10 tokens.*use 11"):
        check_prompt_size(TierLimits(max_prompt_tokens=10), "free", 11)


def test_the_tiers_limits_are_read_once_by_the_requests_that_find_them_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 concurrent requests each read the tiers table when its cache expired; now they share one read,
    and one that started before a change made here is not trusted afterwards."""
    monkeypatch.setattr(single_flight, "JOIN_WAIT", 10.0)  # the reads below take 0.1-0.3 s, not 1 ms
    db = migrated(f"sqlite:///{tmp_path / 'tiers.db'}")
    _tier(db, "short", max_prompt_tokens=10)
    reads: list[float] = []
    delays = [0.1, 0.3, 0.05]  # seconds each read takes after its SELECT: the second ends after the third
    second_selected = threading.Event()

    class SlowReads(TierLimitsCache):
        def _read(self) -> dict[str, TierLimits]:
            read = super()._read()
            reads.append(time.monotonic())
            if len(reads) == 2:
                second_selected.set()
            time.sleep(delays[len(reads) - 1])
            return read

    async def scenario() -> None:
        cache = SlowReads(db, seconds=60)
        limits = await asyncio.gather(*(cache.get("short") for _ in range(16)))
        assert len(reads) == 1 and {x.max_prompt_tokens for x in limits} == {10}
        assert (await cache.get("short")).max_prompt_tokens == 10 and len(reads) == 1  # trusted for 60 s
        cache.clear()
        reading = asyncio.ensure_future(cache.get("short"))
        assert await asyncio.to_thread(second_selected.wait, 5)  # it has read: a change is committed here...
        _tier(db, "short", max_prompt_tokens=20)
        cache.clear()
        assert (await cache.get("short")).max_prompt_tokens == 20 and len(reads) == 3  # not the older read's
        assert (await reading).max_prompt_tokens == 20  # ...a request came, then the old read ended: dropped
        assert (await cache.get("short")).max_prompt_tokens == 20 and len(reads) == 3  # the late old read is dropped

    asyncio.run(scenario())


# -- through a live server ------------------------------------------------------------------------


def _tier(db: Database, name: str, **limits: int | None) -> None:
    with db.session() as s:
        accounts.set_tier(s, name, daily_credits=1000)
        accounts.set_tier_limits(s, name, **limits)
        s.commit()


def _serve(db: Database, tmp_path: Path, engine: ScriptedEngine, **fairness: object) -> LiveServer:
    app = build_app(engine, db, tmp_path)
    with_fairness(app, **fairness)
    return LiveServer(app)


def _body(text: str, **more: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 3, **more}


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Database]:
    """Fairness is this replica's business: the database adds nothing here, so SQLite alone."""
    db = migrated(sqlite_url)
    yield db
    db.dispose()


def test_one_account_with_many_queued_requests_cannot_starve_another(sqlite_db: Database, tmp_path: Path) -> None:
    database = sqlite_db
    engine = ScriptedEngine(token_delay=0.05)  # ~100 ms a request, one at a time
    make_account(database, "hog@example.com", daily=10_000)
    make_account(database, "other@example.com", daily=10_000)
    hog, other = make_key(database, "hog@example.com"), make_key(database, "other@example.com")

    async def run(url: str, fairness_gate: object) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def chat(key: str, text: str) -> int:
                r = await client.post(
                    "/v1/chat/completions", json=_body(text), headers={"Authorization": f"Bearer {key}"}
                )
                return r.status_code

            hogs = [asyncio.create_task(chat(hog, f"hog {i}")) for i in range(20)]
            while fairness_gate.waiting < 15:  # type: ignore[attr-defined]
                await asyncio.sleep(0.01)
            assert await chat(other, "other") == 200
            assert set(await asyncio.gather(*hogs)) == {200}
        return [g.messages[-1].content for g in engine.generations]

    with _serve(database, tmp_path, engine, slots=lambda e: 1) as server:
        gate = server.app.state.fairness.gate(engine)
        served = asyncio.run(run(server.url, gate))
    # In arrival order the other account would wait for the 15 or more requests queued before it; taking
    # turns, it waits for the one running when it reached the gate and at most one more (plus any that
    # started while its own request was authenticated and reserved, a few milliseconds).
    assert served.index("other") <= 4, served
    assert len(served) == 21


def test_an_account_over_its_tiers_concurrency_gets_the_specs_429_and_pays_nothing(
    database: Database, tmp_path: Path
) -> None:
    _tier(database, "pair", max_concurrent=2)
    make_account(database, "pair@example.com", tier="pair")
    make_account(database, "free@example.com")
    key, free_key = make_key(database, "pair@example.com"), make_key(database, "free@example.com")
    # Long enough that the two running requests are still running when the third one arrives, even on a
    # loaded CI machine (at 0.5 s and a fixed 0.25 s wait, the third once overtook the second).
    engine = ScriptedEngine(first_token_delay=2.0)

    async def run(url: str, fairness: Fairness) -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def chat(k: str) -> httpx.Response:
                return await client.post(
                    "/v1/chat/completions", json=_body("hi"), headers={"Authorization": f"Bearer {k}"}
                )

            running = [asyncio.create_task(chat(key)) for _ in range(2)]
            while sum(fairness.in_flight.values()) < 2:  # both are with the engine
                await asyncio.sleep(0.01)
            refused = await chat(key)
            free = await chat(free_key)  # another account is not limited by this one's requests
            return await asyncio.gather(*running), refused, free

    with _serve(database, tmp_path, engine) as server:
        done, refused, free = asyncio.run(run(server.url, server.app.state.fairness))
        assert [r.status_code for r in done] == [200, 200] and free.status_code == 200
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        body = refused.json()
        assert set(body) == {"error", "message", "limit", "used", "resetAt"}
        assert (body["error"], body["limit"], body["used"]) == ("Rate limit exceeded", 2, 2)
        assert "at most 2 requests" in body["message"]
        dt.datetime.fromisoformat(body["resetAt"].replace("Z", "+00:00"))
        assert len(engine.generations) == 3  # the refused request never reached the engine
        assert server.chat(_body("again"), key=key).status_code == 200  # the slots came back
    assert server.app.state.fairness.in_flight == {}  # every request gave its place back
    with database.connect() as conn:
        charged = conn.execute(text("SELECT COALESCE(SUM(credits), 0) FROM usage_ledger")).scalar()
    assert charged == 4  # 2 running + 1 afterwards for the pair account, 1 for the free one; none for the 429


def test_a_prompt_over_the_tiers_size_is_a_400_before_the_engine_reads_it(sqlite_db: Database, tmp_path: Path) -> None:
    database = sqlite_db
    _tier(database, "short", max_prompt_tokens=12)
    make_account(database, "short@example.com", tier="short")
    key = make_key(database, "short@example.com")
    engine = ScriptedEngine()
    with _serve(database, tmp_path, engine) as server:
        long = server.chat(_body("word " * 50), key=key)
        assert long.status_code == 400
        error = long.json()["error"]
        assert (error["code"], error["param"], error["type"]) == (
            "context_length_exceeded",
            "messages",
            "invalid_request_error",
        )
        assert "(short) allows prompts of at most 12 tokens" in error["message"]
        assert engine.generations == []
        assert server.chat(_body("just this"), key=key).status_code == 200
        with database.session() as s:  # a change made on this replica counts at once
            accounts.set_tier_limits(s, "short", max_prompt_tokens=None)
            s.commit()
        assert server.chat(_body("word " * 50), key=key).status_code == 200
