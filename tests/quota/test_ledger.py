"""The credit ledger called directly, on SQLite and PostgreSQL: exact, never oversold, never double-charged."""

from __future__ import annotations

import datetime as dt
import secrets
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.keys.service import principal_for
from aimichat.quota import key_windows, ledger, pricing
from aimichat.quota.ledger import Refusal, Reservation
from aimichat.quota.pricing import Cost
from aimichat.store.models import UsageCounter, UsageEvent
from conftest import make_account

NOON = dt.datetime(2024, 1, 18, 12, 0, 0)


def principal(database, email="user@example.com"):
    with database.session() as s:
        account = accounts.get_account(s, email)
        return principal_for(account)


ONE_CREDIT = Cost(1, 1)


def reserve(database, p, cost=ONE_CREDIT, now=NOON):
    with database.connect() as conn:
        return ledger.reserve(conn, p, cost, request_id="req-" + secrets.token_hex(8), now=now)


def ledger_total(database, account_id, day):
    with database.session() as s:
        credits = s.scalar(
            select(func.coalesce(func.sum(UsageEvent.credits), 0)).where(
                UsageEvent.account_id == account_id, UsageEvent.day == day
            )
        )
        counter = s.scalar(
            select(UsageCounter.used).where(
                UsageCounter.account_id == account_id, UsageCounter.period == "day", UsageCounter.period_start == day
            )
        )
        return int(credits), counter


def test_reservations_stop_exactly_at_the_daily_limit(database):
    make_account(database, daily=3)
    p = principal(database)
    results = [reserve(database, p) for _ in range(4)]
    assert [type(r) for r in results] == [Reservation] * 3 + [Refusal]
    assert [r.remaining for r in results[:3]] == [2, 1, 0]
    refusal = results[3]
    assert (refusal.message, refusal.limit, refusal.used) == ("Daily credit limit reached", 3, 3)
    assert refusal.reset_at == dt.datetime(2024, 1, 19)
    assert refusal.retry_after == 12 * 3600


def test_concurrent_reservations_are_never_oversold(database):
    make_account(database, daily=20)
    p = principal(database)
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: reserve(database, p), range(100)))
    granted = [r for r in results if isinstance(r, Reservation)]
    assert len(granted) == 20
    assert sorted(r.day_used for r in granted) == list(range(1, 21))
    assert ledger_total(database, p.account_id, NOON.date()) == (20, 20)


def test_settle_is_idempotent_and_release_refunds_everything(database):
    make_account(database, daily=10)
    p = principal(database)
    first, second = reserve(database, p), reserve(database, p)
    with database.connect() as conn:
        assert ledger.settle(conn, first, credits=1, prompt_tokens=5, completion_tokens=7, now=NOON) is True
        assert ledger.settle(conn, first, credits=1, prompt_tokens=5, completion_tokens=7, now=NOON) is False
        assert ledger.release(conn, second, now=NOON) is True
        assert ledger.release(conn, second, now=NOON) is False
    assert ledger_total(database, p.account_id, NOON.date()) == (1, 1)


def test_per_token_reserves_prompt_plus_max_tokens_and_refunds_the_rest(database):
    make_account(database, daily=1000, cost_rule="per_token", per_1k=10)
    p = principal(database)
    price = pricing.tier_price(p.cost_rule, p.credits_per_1k_tokens)
    cost = pricing.request_cost(price, prompt_tokens=150, max_tokens=850)
    assert cost == Cost(want=10, minimum=2)  # ceil(1000*10/1000), ceil(151*10/1000)
    r = reserve(database, p, cost)
    assert r.credits == 10
    charge = pricing.final_charge(price, r.credits, prompt_tokens=150, completion_tokens=51)
    assert charge == 3  # 201 tokens at 10 credits per 1k, rounded up
    with database.connect() as conn:
        ledger.settle(conn, r, credits=charge, prompt_tokens=150, completion_tokens=51, now=NOON)
    assert ledger_total(database, p.account_id, NOON.date()) == (3, 3)


def test_per_token_grants_what_is_left_when_the_full_reservation_does_not_fit(database):
    make_account(database, daily=5, cost_rule="per_token", per_1k=1000)  # one credit per token
    p = principal(database)
    r = reserve(database, p, Cost(want=9, minimum=3))
    assert r.credits == 5 and r.remaining == 0
    price = pricing.tier_price(p.cost_rule, p.credits_per_1k_tokens)
    assert pricing.affordable_completion(price, r.credits, prompt_tokens=0) == 5
    assert isinstance(reserve(database, p, Cost(want=9, minimum=3)), Refusal)


def test_monthly_limit_is_checked_with_the_daily_one(database):
    make_account(database, daily=10, monthly=12)
    p = principal(database)
    for _ in range(10):
        assert isinstance(reserve(database, p), Reservation)
    next_day = NOON + dt.timedelta(days=1)
    assert isinstance(reserve(database, p, now=next_day), Reservation)
    assert isinstance(reserve(database, p, now=next_day), Reservation)
    refusal = reserve(database, p, now=next_day)
    assert (refusal.message, refusal.limit, refusal.used) == ("Monthly credit limit reached", 12, 12)
    assert refusal.reset_at == dt.datetime(2024, 2, 1)
    assert isinstance(reserve(database, p, now=dt.datetime(2024, 2, 1)), Reservation)


def test_daily_credits_reset_at_midnight_utc(database):
    make_account(database, daily=1)
    p = principal(database)
    late = dt.datetime(2024, 1, 18, 23, 59, 59)
    assert isinstance(reserve(database, p, now=late), Reservation)
    refusal = reserve(database, p, now=late)
    assert refusal.retry_after == 1 and refusal.reset_at == dt.datetime(2024, 1, 19)
    assert isinstance(reserve(database, p, now=dt.datetime(2024, 1, 19, 0, 0, 0)), Reservation)


def test_a_request_spanning_midnight_stays_on_the_day_it_was_reserved(database):
    make_account(database, daily=100, cost_rule="per_token", per_1k=1000)
    p = principal(database)
    r = reserve(database, p, Cost(want=50, minimum=10), now=dt.datetime(2024, 1, 18, 23, 59, 59))
    with database.connect() as conn:
        ledger.settle(
            conn, r, credits=20, prompt_tokens=10, completion_tokens=10, now=dt.datetime(2024, 1, 19, 0, 0, 5)
        )
    assert ledger_total(database, p.account_id, dt.date(2024, 1, 18)) == (20, 20)
    assert ledger_total(database, p.account_id, dt.date(2024, 1, 19)) == (0, None)


def test_month_rollover_on_december_31(database):
    make_account(database, daily=5, monthly=5)
    p = principal(database)
    eve = dt.datetime(2024, 12, 31, 18, 0, 0)
    for _ in range(5):
        reserve(database, p, now=eve)
    refusal = reserve(database, p, now=eve)
    assert refusal.message == "Daily credit limit reached"  # both are spent: the daily one is named
    assert refusal.reset_at == dt.datetime(2025, 1, 1)
    assert isinstance(reserve(database, p, now=dt.datetime(2025, 1, 1)), Reservation)


def test_all_keys_of_an_account_share_one_allotment(database):
    from aimichat.keys import service as keys

    make_account(database, daily=2)
    with database.session() as s:
        account = accounts.get_account(s, "user@example.com")
        k1, k2 = keys.create_key(s, account, "one"), keys.create_key(s, account, "two")
        s.commit()
        p1 = keys.authenticate(s, k1.secret)
        p2 = keys.authenticate(s, k2.secret)
    assert isinstance(reserve(database, p1), Reservation)
    assert isinstance(reserve(database, p2), Reservation)
    assert isinstance(reserve(database, p1), Refusal)
    with database.session() as s:
        summary = ledger.summary(s, p1, NOON)
    assert [k["credits"] for k in summary.per_key_today] == [1, 1]
    assert summary.day_used == 2


def test_every_reservation_path_writes_the_same_row_and_the_keys_last_use(database):
    """On PostgreSQL a reservation that fits an existing counter is one statement; others take the full path."""
    from aimichat.keys import service as keys
    from aimichat.quota.backends import SqlQuota
    from aimichat.store.models import ApiKey

    make_account(database, daily=10)
    with database.session() as s:
        created = keys.create_key(s, accounts.get_account(s, "user@example.com"), "k")
        s.commit()

    def reserve_as_key(request_id: str, now: dt.datetime) -> Reservation:
        with database.connect() as conn:
            p = keys.authenticate(conn, created.secret)
        return SqlQuota(database).reserve(p, Cost(1, 1), request_id=request_id, now=now)

    def last_used() -> dt.datetime:
        with database.session() as s:
            return s.get(ApiKey, created.key.id).last_used_at

    first = reserve_as_key("first", NOON)  # the day's first: creates the counter
    assert last_used() == NOON
    second = reserve_as_key("second", NOON + dt.timedelta(seconds=30))  # fits the counter
    assert last_used() == NOON  # at most one write a minute
    third = reserve_as_key("third", NOON + dt.timedelta(minutes=2))
    assert last_used() == NOON + dt.timedelta(minutes=2)
    assert [r.day_used for r in (first, second, third)] == [1, 2, 3] and third.remaining == 7
    with database.session() as s:
        rows = s.scalars(select(UsageEvent).order_by(UsageEvent.id)).all()
    assert [r.id for r in rows] == [first.ledger_id, second.ledger_id, third.ledger_id]
    shape = {
        (
            r.account_id,
            r.api_key_id,
            r.day,
            r.reserved_credits,
            r.credits,
            r.prompt_tokens,
            r.completion_tokens,
            r.status,
            r.estimated,
            r.settled_at,
        )
        for r in rows
    }
    assert shape == {(first.account_id, created.key.id, NOON.date(), 1, 1, 0, 0, "reserved", False, None)}
    assert [(r.request_id, r.created_at) for r in rows] == [
        ("first", NOON),
        ("second", NOON + dt.timedelta(seconds=30)),
        ("third", NOON + dt.timedelta(minutes=2)),
    ]
    assert ledger_total(database, first.account_id, NOON.date()) == (3, 3)


def test_postgresql_one_statement_takes_a_limited_keys_counters_all_or_nothing(reused_postgres):
    """The fast path (PostgreSQL's) covers a key with caps and rates: one statement takes every counter,
    and a counter that does not fit aborts it with nothing taken (the full transaction then says what
    refused)."""
    database = reused_postgres.fresh()
    make_account(database, daily=100)
    with database.session() as s:
        created = keys.create_key(
            s, accounts.get_account(s, "user@example.com"), "k", keys.KeyLimits(daily_cap=3, rpm=50, tpm=1000)
        )
        s.commit()
    with database.connect() as conn:
        p = keys.authenticate(conn, created.secret)
    first = reserve(database, p)  # the full transaction creates the key's counter rows
    assert isinstance(first, Reservation)

    def fast(now: dt.datetime = NOON, tokens: int = 10):
        with database.connect(single_statement=True) as conn:
            return ledger.reserve_in_one_statement(
                conn, p, ONE_CREDIT, request_id=secrets.token_hex(8), now=now, tokens=tokens
            )

    second = fast()
    assert isinstance(second, Reservation)
    assert (second.key.day_used, second.key.requests_used, second.key.tokens_used, second.day_used) == (2, 2, 10, 2)
    assert fast(tokens=5000) is None  # over the tokens per minute: nothing taken
    third = fast()
    assert (third.key.day_used, third.key.requests_used, third.key.tokens_used, third.day_used) == (3, 3, 20, 3)
    assert fast() is None  # over the key's daily cap: its minute counters are not taken either
    with database.connect() as conn:
        minute = NOON.replace(second=0, microsecond=0)
        assert key_windows.used(conn, created.key.id, "rpm", minute) == 3
        assert key_windows.used(conn, created.key.id, "tpm", minute) == 20
    assert ledger_total(database, p.account_id, NOON.date()) == (3, 3)
    refused = reserve(database, p)
    assert isinstance(refused, Refusal) and refused.message == "Key daily credit limit reached"
    database.dispose()


def test_postgresql_a_settlement_need_not_wait_for_its_flush_and_the_connection_keeps_waiting(reused_postgres):
    """``wait_for_flush=False`` turns ``synchronous_commit`` off for the settlement's own transaction (inside
    its one statement), never for the pooled connection: the reservation that next uses it still waits."""
    database = reused_postgres.fresh()
    make_account(database, daily=10)
    p = principal(database)
    first, second = reserve(database, p), reserve(database, p)
    with database.connect(single_statement=True) as conn:
        assert ledger.settle(
            conn, first, credits=1, prompt_tokens=5, completion_tokens=0, now=NOON, wait_for_flush=False
        )
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        assert not ledger.settle(
            conn, first, credits=1, prompt_tokens=5, completion_tokens=0, now=NOON, wait_for_flush=False
        )
    with database.connect() as conn:  # in a transaction of its own, as the sweeper settles
        assert ledger.settle(
            conn, second, credits=0, prompt_tokens=5, completion_tokens=0, now=NOON, wait_for_flush=False
        )
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    assert ledger_total(database, p.account_id, NOON.date()) == (1, 1)
    relaxed = str(ledger._settle_statement((), False).compile(dialect=conn.dialect))
    assert "set_config" in relaxed and "set_config" not in str(ledger._settle_statement((), True))
