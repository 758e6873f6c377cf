"""Faults under traffic: each costs bounded 503s, /readyz says so within seconds, service comes back by
itself, and the ledger is exact afterwards.

Six clients send mixed requests (streaming and not, a per-request account and a per-token one with a
capped key) back to back to a real HTTP server over PostgreSQL while a fault comes and goes:

- Redis restarts: a TCP proxy in front of it cuts every connection and refuses new ones for 3 s (the
  shared Redis itself cannot be restarted here); with the counters flushed meanwhile (no persistence),
  and kept (persistence);
- PostgreSQL is black-holed with streams in flight: connections stay open, nothing gets through;
- the model's upstream hangs: new streams get their headers and no token, running ones stop mid-answer.

Each time: no answer but 200 and 503 (with ``Retry-After``, in OpenAI's shape; a stream cut mid-answer
ends with an error event), every 503 within the fault's timeout, /readyz 503 within seconds of the fault
and 200 within seconds of its end, every request after that served, and then no row left ``reserved``
(after the sweep, for settlements the fault made impossible) and every counter equal to the ledger.

What other tests prove already is not repeated here: a locked counter row holding up one account alone,
and a silent PostgreSQL's bounds and /readyz without traffic (tests/store/test_timeouts.py); a stopped
PostgreSQL or a paused Redis (tests/store/test_outage.py); Redis counters deleted every 50 ms under 200
concurrent requests across two replicas (tests/quota/test_redis_loss.py); each upstream fault alone
(tests/engines/test_upstream_faults.py).
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from aimichat.accounts import service as accounts
from aimichat.app import create_app
from aimichat.config import Settings
from aimichat.engines.base import EngineError
from aimichat.keys import service as keys
from aimichat.quota import sweeper
from aimichat.quota.backends import SqlQuota
from aimichat.store.clock import utcnow
from aimichat.store.db import Database
from conftest import REDIS_URL, LiveServer, make_account, make_key
from faults.fleet import Answer, Traffic, ask, check_ledger, quota_for, unexpected, wait_readiness
from faults.slow_upstream import SlowUpstream
from scripted_engine import ScriptedEngine
from store.test_timeouts import FAST, ROUND_TRIP, BlackHoleProxy, serve
from tcp_proxy import TCPProxy

OUTAGE = 3.0  # seconds a fault lasts
READY_LOST = 6.0  # /readyz is 503 within this of a fault (store.health: a success is trusted 2 s, a probe 2 s)
READY_BACK = 8.0  # and 200 within this of its end


def two_accounts(db: Database, capped: bool = True) -> list[str]:
    """Keys of a per-request account (with a monthly limit) and of a per-token one (a credit a token, its
    key capped); with ``capped`` False, neither a monthly limit nor a cap."""
    make_account(db, "req@example.com", daily=100_000, monthly=200_000 if capped else None)
    make_account(db, "tok@example.com", daily=1_000_000, cost_rule="per_token", per_1k=1000)
    secrets = []
    caps = {"daily_cap": 500_000} if capped else {}
    for email, limits in (("req@example.com", {}), ("tok@example.com", caps)):
        with db.session() as s:
            secrets.append(keys.create_key(s, accounts.get_account(s, email), "k", keys.KeyLimits(**limits)).secret)
            s.commit()
    return secrets


def outage(traffic: Traffic, start: Any, end: Any) -> tuple[float, float, list[Answer]]:
    """Run a fault for OUTAGE seconds under ``traffic``, checking that /readyz fails within READY_LOST
    and comes back within READY_BACK: when it began, when /readyz came back, and every answer (those of
    ``traffic``, and of newcomers sending during the fault: the requests in flight may all be held up)."""
    time.sleep(1.0)  # traffic flowing
    began = time.monotonic()
    start()
    newcomers = Traffic(traffic.url, traffic.keys, clients=3).__enter__()
    wait_readiness(traffic.url, ready=False, within=READY_LOST)
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - began)))
    end()
    ended = time.monotonic()
    came_back = wait_readiness(traffic.url, ready=True, within=READY_BACK)
    time.sleep(1.5)  # traffic flowing again
    newcomers.__exit__(None, None, None)
    return began, ended + came_back, traffic.answers + newcomers.answers


def assert_bounded(answers: list[Answer], began: float, back: float, bound: float, longest: float) -> None:
    """The rules of a fault: only 200 and 503, each 503 within ``bound`` seconds and some during the
    fault, nothing held up longer than ``longest`` seconds, and everything sent once it was over served
    in full."""
    assert not unexpected(answers, allowed=(200, 503)), unexpected(answers, allowed=(200, 503))[:5]
    refused = [a for a in answers if a.status == 503]
    assert refused, "the fault refused nothing"
    assert max(a.elapsed for a in refused) < bound, _slowest(refused, began)
    assert max(a.elapsed for a in answers) < longest, _slowest(answers, began)
    assert all(began - 2 < a.at < back for a in refused), "a 503 outside the fault"
    after = [a for a in answers if a.at > back]
    assert len(after) >= 6 and all(a.status == 200 and a.complete for a in after), after[:5]


def _slowest(answers: list[Answer], began: float) -> list[str]:
    """The five slowest answers, for a failure's message: when sent (from the fault), time, status, error."""
    slowest = sorted(answers, key=lambda a: a.elapsed)[-5:]
    return [f"at {a.at - began:+.2f} s: {a.elapsed:.2f} s {a.status} {a.error}" for a in slowest]


def sweep_what_the_fault_left(db: Database) -> list[sweeper.Swept]:
    """Settle what the fault kept from being settled (the traffic has stopped: nothing is running), as
    ``aimichat reservations sweep`` does after the TTL."""
    return sweeper.sweep(db, SqlQuota(db), utcnow() + dt.timedelta(seconds=2), 1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("flushed", [True, False], ids=["counters-flushed", "counters-kept"])
def test_a_redis_restart_under_traffic(reused_postgres, tmp_path, redis_prefix, flushed):
    db = reused_postgres.fresh()
    secrets = two_accounts(db)
    real = redis.Redis.from_url(REDIS_URL)
    where = real.connection_pool.connection_kwargs
    proxy = TCPProxy(where.get("host", "127.0.0.1"), where.get("port", 6379)).start()
    via_proxy = f"redis://127.0.0.1:{proxy.port}/{where.get('db', 0)}"
    engine = ScriptedEngine(token_delay=0.02)

    def restart() -> None:
        proxy.stop()  # every connection cut, new ones refused
        if flushed:
            for key in real.scan_iter(f"{redis_prefix}:*"):
                real.delete(key)

    try:
        with (
            serve(db.url, tmp_path, engine, redis_url=via_proxy, redis_prefix=redis_prefix) as server,
            Traffic(server.url, secrets) as traffic,
        ):
            began, back, answers = outage(traffic, restart, proxy.start)
        # A 503 comes when Redis refuses a connection (at once) or times out (socket timeout, 2 s).
        assert_bounded(answers, began, back, bound=3.0, longest=OUTAGE + 3.0)
        sweep_what_the_fault_left(db)
        check = check_ledger(db, quota_for(db, REDIS_URL, redis_prefix), secrets)
        assert check.reserved == 0 and check.exact, check.mismatches
    finally:
        proxy.stop()
        real.close()


@pytest.mark.timeout(90)
def test_postgresql_black_holed_with_streams_in_flight(reused_postgres, tmp_path):
    db = reused_postgres.fresh()
    secrets = two_accounts(db)
    real = make_url(db.url)
    proxy = BlackHoleProxy(real.host or "127.0.0.1", real.port or 5432).start()
    via_proxy = real.set(port=proxy.port).render_as_string(hide_password=False)
    engine = ScriptedEngine(token_delay=0.05)  # 16 tokens: streams of ~0.75 s, many in flight when it goes
    try:
        with serve(via_proxy, tmp_path, engine) as server, Traffic(server.url, secrets, max_tokens=16) as traffic:
            began, back, answers = outage(traffic, proxy.black_hole, proxy.forward)
        # A database call gives up after the statement and connect timeouts: a new request's 503 within
        # that (and a second call's connect timeout); a settlement is tried again, so a request in flight
        # may wait out the outage (or three tries, and the sweeper settles it).
        bound = ROUND_TRIP + FAST["database_connect_timeout"] + 1
        assert_bounded(answers, began, back, bound=bound, longest=3 * ROUND_TRIP + 2)
        swept = sweep_what_the_fault_left(db)
        assert all(s.charged <= s.reserved for s in swept)
        check = check_ledger(db, SqlQuota(db), secrets)
        assert check.reserved == 0 and check.exact, check.mismatches
    finally:
        proxy.stop()


@pytest.mark.timeout(90)
def test_an_upstream_that_hangs_under_traffic(reused_postgres, tmp_path):
    db = reused_postgres.fresh()
    secrets = two_accounts(db, capped=False)  # (refunds under a monthly limit or a cap deadlock: see below)
    upstream = SlowUpstream(tokens=8, token_delay=0.02)
    with LiveServer(upstream) as up:
        cfg = Settings(
            data_dir=tmp_path,
            database_url=db.url,
            engine="upstream",
            upstream_url=up.url + "/v1",
            upstream_first_token_timeout=1.0,
            upstream_token_timeout=1.0,
            upstream_breaker_failures=3,
            upstream_breaker_cooldown=2.0,
        )
        with LiveServer(create_app(cfg, database=db)) as server, Traffic(server.url, secrets) as traffic:
            began, back, answers = outage(traffic, upstream.hang, upstream.resume)
    # No first token within 1 s: 503 (tried once more first); a tripped breaker: 503 at once.
    wait = cfg.upstream_first_token_timeout
    assert_bounded(answers, began, back, bound=2 * wait + 1, longest=2 * wait + 1)
    assert {a.error for a in answers if a.status == 503} <= {"engine_error", "engine_overloaded"}
    cut = [a for a in answers if a.status == 200 and not a.complete]
    assert all(a.stream and a.error and a.elapsed < 5 for a in cut), cut[:5]  # an error event, not a hang
    check = check_ledger(db, SqlQuota(db), secrets)
    assert check.reserved == 0 and check.exact, check.mismatches


@pytest.mark.timeout(90)
def test_concurrent_refunds_of_one_account_never_deadlock(reused_postgres, tmp_path):
    """Requests refunded at settlement (every other one fails before its first token, and is given all its
    credits back) while others of the same account (a monthly limit too) reserve: every one of 60
    requests from 10 clients at once is served or gets the engine's own error, never a 503 of the store."""
    db = reused_postgres.fresh()
    make_account(db, daily=1_000_000, monthly=2_000_000, cost_rule="per_token", per_1k=1000)
    secret = make_key(db)
    turns = iter(range(1_000_000))

    def reply(messages: Any) -> list[str]:
        if next(turns) % 2:
            raise EngineError("injected failure")
        return ["a", "short", "answer"]

    with serve(db.url, tmp_path, ScriptedEngine(reply=reply)) as server, ThreadPoolExecutor(10) as pool:

        def one(i: int) -> Answer:
            with httpx.Client(timeout=30) as client:
                return ask(client, server.url, secret, stream=bool(i % 2), max_tokens=50)

        answers = list(pool.map(one, range(60)))
    assert [a for a in answers if a.error == "store_unavailable"] == []
    check = check_ledger(db, SqlQuota(db), [secret])
    assert check.reserved == 0 and check.exact, check.mismatches
