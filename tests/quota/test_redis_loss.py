"""Redis losing its credit counters under traffic never oversells (issue 15, finding 1).

Two replicas (two real HTTP servers) share one PostgreSQL database and one Redis; a thread deletes every
key of the test's Redis prefix every few milliseconds (as a Redis restart without persistence, or an
eviction, would) while 200 mixed requests run: per-request and per-token tiers, keys with caps and
without, streaming and not. Every counter rebuilt from the ledger must count every grant in flight, so
the ledger never holds more than an allotment, and the counters always say what the ledger says.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from typing import Any

import httpx
import redis
from sqlalchemy import func, select

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.quota import ledger
from aimichat.quota.backends import RedisQuota
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import REDIS_URL, MutableClock, iter_sse, make_account, serve_app, settled
from scripted_engine import ScriptedEngine

NOON = dt.datetime(2024, 1, 18, 12, 0, 0)
DAY, MONTH = NOON.date(), NOON.date().replace(day=1)

PER_REQUEST = {"email": "req@example.com", "daily": 50, "monthly": 60}
PER_TOKEN = {"email": "tok@example.com", "daily": 400, "monthly": 500}
CAPS = {"req-capped": (20, 25), "tok-capped": (150, None)}  # a key's (daily_cap, monthly_cap)


def make_key(db: Database, email: str, name: str, daily_cap: int | None = None, monthly_cap: int | None = None):
    with db.session() as s:
        account = accounts.get_account(s, email)
        created = keys.create_key(s, account, name, keys.KeyLimits(daily_cap=daily_cap, monthly_cap=monthly_cap))
        s.commit()
        return account.id, created.key.id, created.secret


class CounterDeleter(threading.Thread):
    """Deletes every key of ``prefix`` every ``interval`` seconds until stopped."""

    # Every 50 ms. At 3 ms a rebuild (a placeholder, the ledger read on PostgreSQL, the seed: 3 ms and more on
    # a busy 2-core machine) was deleted before it could finish, again and again, and requests gave up with
    # 503 after 10 s: one run in four or five failed so here, on the code before issue 14's changes as after;
    # at 10 ms it still did once under CI's load. At 50 ms: 425 keys deleted in 65 rounds during the run.
    def __init__(self, prefix: str, interval: float = 0.050):
        super().__init__(daemon=True)
        self.prefix, self.interval = prefix, interval
        self.stop = threading.Event()
        self.deleted = 0
        self.rounds = 0

    def run(self) -> None:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            while not self.stop.is_set():
                found = list(client.scan_iter(f"{self.prefix}:*", count=1000))
                if found:
                    self.deleted += client.delete(*found)
                self.rounds += 1
                time.sleep(self.interval)
        finally:
            client.close()


def body(i: int, per_token: bool) -> dict[str, Any]:
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 30 if per_token else 3,  # per token: reserves prompt + 30, uses prompt + 14, refunds 16
    }
    if i % 3 == 0:
        request["stream"] = True
        if i % 2 == 0:
            request["stream_options"] = {"include_usage": True}
    return request


async def send(client: httpx.AsyncClient, url: str, key: str, request: dict[str, Any]) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if not request.get("stream"):
        answer = await client.post(f"{url}/v1/chat/completions", json=request, headers=headers)
        return answer.status_code, answer.text
    async with client.stream("POST", f"{url}/v1/chat/completions", json=request, headers=headers) as answer:
        text = "".join([piece async for piece in answer.aiter_text()])
    if answer.status_code == 200:
        assert list(iter_sse([text]))[-1] == "[DONE]"
    return answer.status_code, text


async def fire(plan: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[int, str]]:
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(send(client, url, key, request) for url, key, request in plan))


def sums(db: Database) -> dict[str, Any]:
    """Per account and per key: the day's and month's credits in the ledger, and rows still reserved."""
    with db.session() as s:
        per_account = {
            (a, d): int(c)
            for a, d, c in s.execute(
                select(UsageEvent.account_id, UsageEvent.day, func.sum(UsageEvent.credits)).group_by(
                    UsageEvent.account_id, UsageEvent.day
                )
            )
        }
        per_key = {
            k: int(c)
            for k, c in s.execute(
                select(UsageEvent.api_key_id, func.sum(UsageEvent.credits)).group_by(UsageEvent.api_key_id)
            )
        }
        reserved = s.scalar(select(func.count()).where(UsageEvent.status == "reserved"))
        statuses = dict(s.execute(select(UsageEvent.status, func.count()).group_by(UsageEvent.status)).all())
    return {"account": per_account, "key": per_key, "reserved": reserved, "statuses": statuses}


def test_counters_lost_under_traffic_never_oversell_and_agree_with_the_ledger(reused_postgres, redis_prefix, tmp_path):
    database = reused_postgres.fresh()
    clock = MutableClock(NOON)
    make_account(database, PER_REQUEST["email"], daily=PER_REQUEST["daily"], monthly=PER_REQUEST["monthly"])
    make_account(
        database,
        PER_TOKEN["email"],
        daily=PER_TOKEN["daily"],
        monthly=PER_TOKEN["monthly"],
        cost_rule="per_token",
        per_1k=1000,  # a credit a token
    )
    req_account, req_capped, req_capped_secret = make_key(database, PER_REQUEST["email"], "req-capped", 20, 25)
    _, _, req_free_secret = make_key(database, PER_REQUEST["email"], "req-free")
    tok_account, tok_capped, tok_capped_secret = make_key(database, PER_TOKEN["email"], "tok-capped", 150)
    _, _, tok_free_secret = make_key(database, PER_TOKEN["email"], "tok-free")
    secrets_in_turn = [req_capped_secret, req_free_secret, tok_capped_secret, tok_free_secret]
    counters = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix}
    replicas = [
        serve_app(ScriptedEngine(token_delay=0.001), database, tmp_path / name, clock=clock, **counters)
        for name in "ab"
    ]
    for live in replicas:
        # The replicas' Redis client waits 2 s for an answer, then fails the request closed (503). A test
        # machine busy with other work can stall that long; the test is about lost counters, not that.
        patient = RedisQuota(database, redis.Redis.from_url(REDIS_URL, socket_timeout=30), prefix=redis_prefix)
        live.app.state.quota = live.app.state.chat.quota = patient
    deleter = CounterDeleter(redis_prefix)
    with replicas[0] as first, replicas[1] as second:
        urls = [first.url, second.url]
        plan = [(urls[i % 2], secrets_in_turn[i % 4], body(i, per_token=i % 4 >= 2)) for i in range(200)]
        deleter.start()
        try:
            answers = asyncio.run(fire(plan))
        finally:
            deleter.stop.set()
            deleter.join()
        statuses = [status for status, _ in answers]
        settled(first, second)
        after = sums(database)
        summary = {
            "deleted keys": deleter.deleted,
            "deletion rounds": deleter.rounds,
            "200": statuses.count(200),
            "429": statuses.count(429),
            "ledger": after,
        }
        print(summary)
        # Never above an allotment: the accounts' days and months, the keys' caps.
        req_day, tok_day = after["account"].get((req_account, DAY), 0), after["account"].get((tok_account, DAY), 0)
        assert req_day <= PER_REQUEST["daily"], summary
        assert tok_day <= PER_TOKEN["daily"], summary
        assert after["key"].get(req_capped, 0) <= 20, summary
        assert after["key"].get(tok_capped, 0) <= 150, summary
        with database.session() as s:  # the months (only today in them) and the capped key's month
            assert ledger.ledger_sum(s, req_account, MONTH, DAY) <= PER_REQUEST["monthly"]
            assert ledger.key_ledger_sum(s, req_capped, MONTH, DAY) <= 25
        assert set(statuses) <= {200, 429}, [text for status, text in answers if status not in (200, 429)]
        assert after["reserved"] == 0

        # The counters are the ledger. While counters are lost every few milliseconds, a rebuilt counter
        # also counts the rows of requests not yet decided (it cannot tell them from ones already taken),
        # so some requests are refused that a steady counter would have granted: never too many granted.
        # Once the losses stop, each counter says exactly what the ledger says: as it stands now, and as
        # the allotments are used up one request at a time (each refusal's "used" is a counter).
        quota = RedisQuota(database, redis.Redis.from_url(REDIS_URL), prefix=redis_prefix)
        try:

            def expected() -> dict[tuple[int, int | None], dict[str, int | None]]:
                now = sums(database)
                req, tok = now["account"].get((req_account, DAY), 0), now["account"].get((tok_account, DAY), 0)
                capped_req, capped_tok = now["key"].get(req_capped, 0), now["key"].get(tok_capped, 0)
                return {  # (account, key): what its day and month counters must hold (None: it has none)
                    (req_account, None): {"day": req, "month": req},
                    (req_account, req_capped): {"day": capped_req, "month": capped_req},
                    (tok_account, None): {"day": tok, "month": tok},
                    (tok_account, tok_capped): {"day": capped_tok, "month": None},
                }

            def check(seeded: bool) -> None:
                """Every counter Redis holds equals the ledger (and, once ``seeded``, every one is there)."""
                for (account, key), want in expected().items():
                    held = quota.held_counters(account, key, NOON)
                    for name, value in want.items():
                        if value is None or (held[name] is None and not seeded):
                            continue
                        assert held[name] == value, (account, key, name, held[name], value, summary)

            check(seeded=False)
            refusals = {}
            for n, secret in enumerate(secrets_in_turn):  # capped keys first, then the accounts' free keys
                for _ in range(60):
                    answer = first.chat(body(1, per_token=n >= 2), key=secret)
                    assert answer.status_code in (200, 429), answer.text
                    if answer.status_code == 429:
                        refusals[n] = answer.json()
                        break
                else:
                    raise AssertionError(f"key {n} was never refused")
            settled(first)
            check(seeded=True)
            final = sums(database)
            req_day, tok_day = final["account"][(req_account, DAY)], final["account"][(tok_account, DAY)]
            assert req_day == PER_REQUEST["daily"]  # every credit sold, not one more
            assert PER_TOKEN["daily"] - 6 < tok_day <= PER_TOKEN["daily"]  # less than a minimum (5 + 1) left
            assert refusals[1]["message"] == refusals[3]["message"] == "Daily credit limit reached"
            assert (refusals[1]["used"], refusals[3]["used"]) == (req_day, tok_day)
            for n, key, room in ((0, req_capped, 1), (2, tok_capped, 6)):  # what one more request needs at least
                if refusals[n]["message"] == "Key daily credit limit reached":
                    assert refusals[n]["used"] == final["key"][key] > refusals[n]["limit"] - room
            assert final["reserved"] == 0
        finally:
            quota.redis.close()
