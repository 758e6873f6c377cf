"""Reservations their requests never settled are settled by the sweeper (issue 15, finding 2).

A row left ``reserved`` (a replica killed mid-stream, a settlement that could not reach the database)
is settled once it is older than ``AIMICHAT_RESERVATION_TTL``: a per-request price keeps its credit, a
per-token price charges the prompt recorded with the row, and the rest goes back to the account's and
the key's counters, in SQL and in Redis alike. Two sweepers at once settle each row once; the app sweeps
every minute with its clock; ``aimichat reservations sweep`` sweeps by hand. And a settlement that meets
a dropped connection is tried again, never charging twice.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from aimichat.accounts import service as accounts
from aimichat.cli import cli
from aimichat.keys import service as keys
from aimichat.quota import ledger, sweeper
from aimichat.quota.backends import RedisQuota, SqlQuota
from aimichat.quota.ledger import Refusal, Reservation
from aimichat.quota.pricing import Cost
from aimichat.registry import service as registry
from aimichat.store.clock import utcnow
from aimichat.store.db import Database
from aimichat.store.models import KeyCounter, UsageCounter, UsageEvent
from conftest import REDIS_URL, MutableClock, app_client, make_account, migrated
from scripted_engine import ScriptedEngine

NOON = dt.datetime(2024, 1, 18, 12, 0, 0)
TTL = 900
LATER = NOON + dt.timedelta(seconds=TTL + 1)  # when the reservations made at NOON are stale
DAY, MONTH = NOON.date(), NOON.date().replace(day=1)


@pytest.fixture(params=["sql", "redis"])
def counters(request, database, redis_prefix):
    """Where the credit counters live; ``make()`` gives another backend over the same counters."""
    clients: list[redis.Redis] = []

    def make():
        if request.param == "sql":
            return SqlQuota(database)
        clients.append(redis.Redis.from_url(REDIS_URL))
        return RedisQuota(database, clients[-1], prefix=redis_prefix)

    yield make
    for client in clients:
        client.close()


def keyed(database: Database, email: str, **limits: Any):
    """A key of ``email``'s account with ``limits``, as the principal its requests are made as."""
    with database.session() as s:
        created = keys.create_key(s, accounts.get_account(s, email), "k", keys.KeyLimits(**limits))
        s.commit()
    with database.connect() as conn:
        return keys.authenticate(conn, created.secret)


def reserve(quota, principal, cost: Cost, now: dt.datetime = NOON, model: str = "aimichat-1") -> Reservation:
    granted = quota.reserve(principal, cost, request_id="req-" + secrets.token_hex(8), now=now, model=model)
    assert isinstance(granted, Reservation), granted
    return granted


def rows(database: Database) -> dict[int, UsageEvent]:
    with database.session() as s:
        return {r.id: r for r in s.scalars(select(UsageEvent))}


def ledger_figures(database: Database, account_id: int, key_id: int | None = None) -> tuple[int, int]:
    """The ledger's day and month for an account, or for one of its keys."""
    with database.session() as s:
        if key_id is None:
            return ledger.ledger_sum(s, account_id, DAY, DAY), ledger.ledger_sum(s, account_id, MONTH, DAY)
        return ledger.key_ledger_sum(s, key_id, DAY, DAY), ledger.key_ledger_sum(s, key_id, MONTH, DAY)


def assert_counters_are_the_ledger(quota, database: Database, principals) -> None:
    """Every day and month counter, of the accounts and of their capped keys, says what the ledger says
    (Redis counters dropped by a sweep are rebuilt by the reservation a replica would make next)."""
    for p in principals:
        if isinstance(quota, RedisQuota):
            probe = quota.reserve(p, Cost(0, 0), request_id="probe-" + secrets.token_hex(8), now=LATER)
            assert isinstance(probe, Reservation)
            held = [quota.held_counters(p.account_id, None, LATER), quota.held_counters(p.account_id, p.key_id, LATER)]
            got = [(h["day"], h["month"]) for h in held]
        else:
            with database.session() as s:

                def account(period, start, account_id=p.account_id, session=s):
                    return session.scalar(
                        select(UsageCounter.used).where(
                            UsageCounter.account_id == account_id,
                            UsageCounter.period == period,
                            UsageCounter.period_start == start,
                        )
                    )

                def key(kind, key_id=p.key_id, session=s):
                    return session.scalar(
                        select(KeyCounter.used).where(KeyCounter.key_id == key_id, KeyCounter.kind == kind)
                    )

                got = [(account("day", DAY), account("month", MONTH)), (key("day"), key("month"))]
        want = [ledger_figures(database, p.account_id), ledger_figures(database, p.account_id, p.key_id)]
        caps = (p.limits.daily_cap, p.limits.monthly_cap)
        want[1] = tuple(v if cap is not None else None for v, cap in zip(want[1], caps, strict=True))
        got[1] = tuple(v if cap is not None else None for v, cap in zip(got[1], caps, strict=True))
        if p.monthly_credits is None:
            want[0], got[0] = (want[0][0], None), (got[0][0], None)
        assert got == want, (p.account_email, got, want)


def two_accounts(database: Database):
    """A per-request account (10 a day, 20 a month) and a per-token one (a credit a token; its tier pays
    its own price for 'metered'), each with a capped key."""
    make_account(database, "req@example.com", daily=10, monthly=20)
    make_account(database, "tok@example.com", daily=1000, monthly=2000, cost_rule="per_token", per_1k=1000)
    with database.session() as s:
        tier = accounts.get_account(s, "tok@example.com").tier.name
        registry.set_price(s, tier, "metered", prompt_per_1m=2_000_000, completion_per_1m=5_000_000)
        s.commit()
    return keyed(database, "req@example.com", daily_cap=5, monthly_cap=8), keyed(
        database, "tok@example.com", daily_cap=500
    )


def test_a_stale_reservation_is_settled_by_the_rule_and_refunded(counters, database):
    quota = counters()
    per_request, per_token = two_accounts(database)
    kept = [reserve(quota, per_request, Cost(1, 1, prompt_tokens=9)) for _ in range(2)]
    by_tokens = reserve(quota, per_token, Cost(40, 8, prompt_tokens=7))  # 7 + 33 tokens at a credit each
    metered = reserve(quota, per_token, Cost(60, 20, prompt_tokens=7), model="metered")  # 7 at 2 credits each
    unknown = reserve(quota, per_token, Cost(30, 1))  # no prompt recorded: charged nothing
    settled = reserve(quota, per_request, Cost(1, 1, prompt_tokens=9))
    assert quota.settle(settled, credits=1, prompt_tokens=9, completion_tokens=3, now=NOON)
    fresh = reserve(quota, per_token, Cost(40, 8, prompt_tokens=7), now=NOON + dt.timedelta(minutes=10))

    assert sweeper.sweep(database, counters(), NOON + dt.timedelta(seconds=TTL), TTL) == []  # not older yet
    swept = sweeper.sweep(database, counters(), LATER, TTL)

    charged = {s.ledger_id: (s.reserved, s.charged, s.refunded) for s in swept}
    assert charged == {
        kept[0].ledger_id: (1, 1, 0),
        kept[1].ledger_id: (1, 1, 0),
        by_tokens.ledger_id: (40, 7, 33),
        metered.ledger_id: (60, 14, 46),
        unknown.ledger_id: (30, 0, 30),
    }
    after = rows(database)
    for r in swept:
        row = after[r.ledger_id]
        assert (row.credits, row.reserved_credits, row.settled_at, row.estimated) == (
            r.charged,
            r.reserved,
            LATER,
            True,
        )
        assert row.status == ("charged" if r.charged else "released")
    assert after[unknown.ledger_id].status == "released"
    assert after[settled.ledger_id].status == "charged" and after[settled.ledger_id].settled_at == NOON
    assert after[fresh.ledger_id].status == "reserved"  # younger than the TTL: its request may still run
    assert sweeper.sweep(database, counters(), LATER, TTL) == []  # nothing left to settle

    assert_counters_are_the_ledger(quota, database, [per_request, per_token])
    # What was refunded can be used again: the per-token key has 500 - (7 + 14 + 0 + 40) left today.
    left = quota.reserve(per_token, Cost(439, 439), request_id="rest", now=LATER)
    assert isinstance(left, Reservation) and left.credits == 439
    refused = quota.reserve(per_token, Cost(1, 1), request_id="over", now=LATER)
    assert isinstance(refused, Refusal) and (refused.message, refused.used) == ("Key daily credit limit reached", 500)


@pytest.mark.parametrize("exclusive", [True, False], ids=["locked", "rows-guard-only"])
def test_two_sweepers_at_once_settle_each_row_once(counters, database, exclusive):
    quota = counters()
    per_request, per_token = two_accounts(database)
    stale = [reserve(quota, per_request, Cost(1, 1, prompt_tokens=4)) for _ in range(5)]
    stale += [reserve(quota, per_token, Cost(50, 6, prompt_tokens=5)) for _ in range(9)]
    sweepers = [counters(), counters()]
    start = threading.Barrier(2)

    def run(backend):
        start.wait()
        return sweeper.sweep(database, backend, LATER, TTL, exclusive=exclusive)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(run, sweepers)
    ids = [s.ledger_id for s in first + second]
    assert sorted(ids) == sorted(r.ledger_id for r in stale)  # every row once, by one sweeper or the other
    with database.session() as s:
        assert s.scalar(select(func.count()).where(UsageEvent.status == "reserved")) == 0
    assert ledger_figures(database, per_request.account_id) == (5, 5)  # per request: kept
    assert ledger_figures(database, per_token.account_id) == (9 * 5, 9 * 5)  # per token: the prompts
    assert_counters_are_the_ledger(quota, database, [per_request, per_token])


@pytest.mark.parametrize("with_redis", [False, True], ids=["sql", "redis"])
def test_the_app_sweeps_every_interval_with_its_clock(database, tmp_path, monkeypatch, redis_prefix, with_redis):
    monkeypatch.setattr(sweeper, "SWEEP_INTERVAL", 0.05)
    clock = MutableClock(NOON)
    make_account(database, daily=100, cost_rule="per_token", per_1k=1000)
    settings = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if with_redis else {}
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock, **settings) as client:
        with database.session() as s:
            principal = keys.principal_for(accounts.get_account(s, "user@example.com"))
        stale = reserve(client.app.state.quota, principal, Cost(40, 8, prompt_tokens=6))  # as a replica killed
        time.sleep(0.3)
        assert rows(database)[stale.ledger_id].status == "reserved"  # not older than the TTL (900 s) yet
        clock.advance(seconds=TTL + 1)
        deadline = time.monotonic() + 10
        while rows(database)[stale.ledger_id].status == "reserved" and time.monotonic() < deadline:
            time.sleep(0.05)
    row = rows(database)[stale.ledger_id]
    assert (row.status, row.credits, row.settled_at) == ("charged", 6, NOON + dt.timedelta(seconds=TTL + 1))
    if with_redis:  # the counters were dropped: the next reservation rebuilds them from the ledger, 6 used
        again = reserve(client.app.state.quota, principal, Cost(94, 94), now=clock.now)
        assert again.day_used == 100 and again.remaining == 0


@pytest.mark.parametrize("with_redis", [False, True], ids=["sql", "redis"])
def test_reservations_sweep_command_prints_what_it_settled(tmp_path, monkeypatch, redis_prefix, with_redis):
    url = f"sqlite:///{tmp_path / 'aimichat.db'}"
    database = migrated(url)
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    quota = SqlQuota(database)
    if with_redis:
        monkeypatch.setenv("AIMICHAT_REDIS_URL", REDIS_URL)
        monkeypatch.setenv("AIMICHAT_REDIS_PREFIX", redis_prefix)
        quota = RedisQuota(database, redis.Redis.from_url(REDIS_URL), prefix=redis_prefix)
    make_account(database, daily=100, cost_rule="per_token", per_1k=1000)
    with database.session() as s:
        principal = keys.principal_for(accounts.get_account(s, "user@example.com"))
    an_hour_ago = utcnow() - dt.timedelta(hours=1)
    old = reserve(quota, principal, Cost(40, 8, prompt_tokens=6), now=an_hour_ago)
    recent = reserve(quota, principal, Cost(40, 8, prompt_tokens=6), now=utcnow() - dt.timedelta(seconds=5))
    runner = CliRunner()

    result = runner.invoke(cli, ["reservations", "sweep"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["ID", "REQUEST", "ACCOUNT"]
    assert lines[1].split()[:2] == [str(old.ledger_id), old.request_id]
    assert lines[-1] == "settled 1 reservation(s): 6 credits charged, 34 refunded"
    assert runner.invoke(cli, ["reservations", "sweep"]).output == "no open reservation older than 900s\n"
    swept = json.loads(runner.invoke(cli, ["reservations", "sweep", "--ttl", "1", "--json"]).output)
    assert [(s["id"], s["charged"], s["refunded"]) for s in swept] == [(recent.ledger_id, 6, 34)]
    assert {r.status for r in rows(database).values()} == {"charged"}
    if with_redis:
        quota.redis.close()
    database.dispose()


class Flaky:
    """A quota backend whose settlements fail with a dropped connection ``failures`` times: before
    reaching the database, or (``after``) once the settlement is done, as when its answer is lost."""

    def __init__(self, quota, failures: int, after: bool = False):
        self.quota, self.failures, self.after = quota, failures, after
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.quota, name)

    def settle(self, reservation, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            if self.after:
                self.quota.settle(reservation, **kwargs)
            raise OperationalError("UPDATE usage_ledger ...", {}, ConnectionResetError("connection dropped"))
        return self.quota.settle(reservation, **kwargs)


@pytest.mark.parametrize(
    ("failures", "after", "settled"),
    [(2, False, True), (1, True, True), (3, False, False)],
    ids=["retried", "answer-lost", "given-up"],
)
def test_a_settlement_that_meets_a_dropped_connection_is_retried_never_twice(
    database, tmp_path, failures, after, settled
):
    clock = MutableClock(NOON)
    make_account(database, daily=100, cost_rule="per_token", per_1k=1000)
    with database.session() as s:
        principal = keys.principal_for(accounts.get_account(s, "user@example.com"))
    with app_client(ScriptedEngine(reply="one two three"), database, tmp_path, clock=clock) as client:
        with database.session() as s:
            secret = keys.create_key(s, accounts.get_account(s, "user@example.com"), "k").secret
            s.commit()
        flaky = client.app.state.chat.quota = Flaky(client.app.state.quota, failures, after)
        answer = client.chat({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}, key=secret)
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
    assert flaky.calls == min(failures + 1, 3)
    [row] = rows(database).values()
    figures = ledger_figures(database, principal.account_id)
    with database.session() as s:
        counter = s.scalar(select(UsageCounter.used).where(UsageCounter.period == "day"))
    prompt, reserved = usage["prompt_tokens"], usage["prompt_tokens"] + 20
    assert row.reserved_credits == reserved
    if settled:
        assert (row.status, row.credits) == ("charged", usage["total_tokens"])
        assert figures == (usage["total_tokens"],) * 2 and counter == usage["total_tokens"]  # refunded once
    else:  # three tries failed: the row stands, counted, until the sweeper settles it
        assert (row.status, row.credits, row.prompt_tokens) == ("reserved", reserved, prompt) and counter == reserved
        [swept] = sweeper.sweep(database, SqlQuota(database), LATER, TTL)
        assert (swept.charged, swept.refunded) == (prompt, 20)  # the prompt, recorded with the row
        with database.session() as s:
            assert s.scalar(select(UsageCounter.used).where(UsageCounter.period == "day")) == prompt
