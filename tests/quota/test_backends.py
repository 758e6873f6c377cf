"""One conformance suite for both quota backends (SQL counters, Redis counters), each over SQLite and
PostgreSQL: exact counts under concurrency, rollover, refunds, per-token settlement."""

from __future__ import annotations

import datetime as dt
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from aimichat.accounts import service as accounts
from aimichat.keys.service import principal_for
from aimichat.quota import ledger
from aimichat.quota.backends import RedisQuota, SqlQuota
from aimichat.quota.ledger import Refusal, Reservation
from aimichat.quota.pricing import Cost
from conftest import REDIS_URL, make_account

NOON = dt.datetime(2024, 1, 18, 12, 0, 0)


@pytest.fixture(params=["sql", "redis"])
def quota(request, database, redis_prefix):
    if request.param == "sql":
        yield SqlQuota(database)
        return
    client = redis.Redis.from_url(REDIS_URL)
    yield RedisQuota(database, client, prefix=redis_prefix)
    client.close()


def principal(database):
    with database.session() as s:
        account = accounts.get_account(s, "user@example.com")
        return principal_for(account)


ONE_CREDIT = Cost(1, 1)


def reserve(quota, p, cost=ONE_CREDIT, now=NOON):
    return quota.reserve(p, cost, request_id="req-" + secrets.token_hex(8), now=now)


def used_today(database, p, day=NOON.date()):  # noqa: B008 (a date is immutable)
    with database.session() as s:
        return ledger.ledger_sum(s, p.account_id, day, day)


def test_exact_under_concurrency(quota, database):
    make_account(database, daily=20)
    p = principal(database)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: reserve(quota, p), range(100)))
    granted = [r for r in results if isinstance(r, Reservation)]
    assert len(granted) == 20
    assert sorted(r.remaining for r in granted) == list(range(20))
    refusals = [r for r in results if isinstance(r, Refusal)]
    assert all(r.used == 20 and r.limit == 20 for r in refusals)
    assert used_today(database, p) == 20


def test_release_and_settle_refund_exactly_once(quota, database):
    make_account(database, daily=3)
    p = principal(database)
    a, b, c = (reserve(quota, p) for _ in range(3))
    assert isinstance(reserve(quota, p), Refusal)
    assert quota.release(a, now=NOON) and not quota.release(a, now=NOON)
    assert quota.settle(b, credits=1, prompt_tokens=3, completion_tokens=4, now=NOON)
    assert not quota.settle(b, credits=1, prompt_tokens=3, completion_tokens=4, now=NOON)
    again = reserve(quota, p)
    assert isinstance(again, Reservation) and again.remaining == 0
    assert isinstance(reserve(quota, p), Refusal)
    del c


def test_per_token_settlement_refunds_the_unused_part(quota, database):
    make_account(database, daily=100, cost_rule="per_token", per_1k=1000)
    p = principal(database)
    r = reserve(quota, p, Cost(want=60, minimum=11))
    assert r.credits == 60
    quota.settle(r, credits=25, prompt_tokens=10, completion_tokens=15, now=NOON)
    assert used_today(database, p) == 25
    r2 = reserve(quota, p, Cost(want=90, minimum=11))
    assert r2.credits == 75 and r2.remaining == 0  # what was left after the refund, clamped


def test_daily_and_monthly_rollover(quota, database):
    make_account(database, daily=2, monthly=3)
    p = principal(database)
    late = dt.datetime(2024, 1, 31, 23, 59, 59)
    assert all(isinstance(reserve(quota, p, now=late), Reservation) for _ in range(2))
    refusal = reserve(quota, p, now=late)
    assert (refusal.message, refusal.reset_at) == ("Daily credit limit reached", dt.datetime(2024, 2, 1))
    feb = dt.datetime(2024, 2, 1)
    assert isinstance(reserve(quota, p, now=feb), Reservation)
    assert isinstance(reserve(quota, p, now=feb), Reservation)
    refusal = reserve(quota, p, now=feb)
    assert refusal.message == "Daily credit limit reached"  # 2 today; the month has 1 left
    nxt = dt.datetime(2024, 2, 2, 8)
    assert isinstance(reserve(quota, p, now=nxt), Reservation)
    refusal = reserve(quota, p, now=nxt)
    assert (refusal.message, refusal.limit, refusal.used) == ("Monthly credit limit reached", 3, 3)
    assert refusal.reset_at == dt.datetime(2024, 3, 1)


def test_redis_counters_lost_are_rebuilt_from_the_ledger(database, redis_prefix):
    client = redis.Redis.from_url(REDIS_URL)
    quota = RedisQuota(database, client, prefix=redis_prefix)
    try:
        make_account(database, daily=5)
        p = principal(database)
        for _ in range(3):
            reserve(quota, p)
        for key in client.scan_iter(f"{quota.prefix}:*"):  # as after a Redis restart without persistence
            client.delete(key)
        granted = [reserve(quota, p) for _ in range(4)]
        assert [isinstance(r, Reservation) for r in granted] == [True, True, False, False]
        assert used_today(database, p) == 5
    finally:
        client.close()


def test_per_token_takes_what_the_month_has_left(quota, database):
    make_account(database, daily=1000, monthly=100, cost_rule="per_token", per_1k=1000)
    p = principal(database)
    first = reserve(quota, p, Cost(want=95, minimum=10))
    assert first.credits == 95
    second = reserve(quota, p, Cost(want=50, minimum=3))
    assert isinstance(second, Reservation) and second.credits == 5
    refusal = reserve(quota, p, Cost(want=50, minimum=3))
    assert (refusal.message, refusal.used) == ("Monthly credit limit reached", 100)
