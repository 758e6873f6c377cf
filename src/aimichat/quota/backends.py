"""Where the credit counters live: SQL (the default) or Redis (for fleets with hot accounts).

Both backends write the same SQL ledger, one row per granted request, and give the same answers;
``tests/quota/test_backends.py`` runs one conformance suite against each. They differ only in where
the atomic "take n credits if they fit" happens:

- ``SqlQuota``: a conditional UPDATE on the account's counter row, in the ledger row's transaction.
- ``RedisQuota``: one Lua script over the day and month counters; the ledger row is then inserted in
  SQL (an INSERT, which does not serialise on a hot row). Counters that Redis lost (a restart, an
  eviction) are re-seeded from the SQL ledger before the next reservation, so nothing is oversold.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Protocol

import redis

from aimichat.keys.service import Principal, last_use_is_stale
from aimichat.store.db import Database

from . import ledger, periods
from .ledger import Refusal, Reservation
from .pricing import Cost

log = logging.getLogger(__name__)


class QuotaBackend(Protocol):
    def reserve(
        self, principal: Principal, cost: Cost, *, request_id: str, now: dt.datetime, model: str | None = None
    ) -> Reservation | Refusal: ...

    def settle(
        self,
        reservation: Reservation,
        *,
        credits: int,
        prompt_tokens: int,
        completion_tokens: int,
        now: dt.datetime,
        estimated: bool = False,
    ) -> bool: ...

    def release(self, reservation: Reservation, *, now: dt.datetime) -> bool: ...


class SqlQuota:
    def __init__(self, database: Database) -> None:
        self.database = database

    def reserve(
        self, principal: Principal, cost: Cost, *, request_id: str, now: dt.datetime, model: str | None = None
    ) -> Reservation | Refusal:
        if not self.database.is_sqlite:  # PostgreSQL: the common case in one round trip
            with self.database.connect(single_statement=True) as conn:
                reservation = ledger.reserve_in_one_statement(
                    conn, principal, cost, request_id=request_id, now=now, model=model
                )
            if reservation is not None:
                return reservation
        with self.database.connect() as conn:
            return ledger.reserve(conn, principal, cost, request_id=request_id, now=now, model=model)

    def settle(
        self,
        reservation: Reservation,
        *,
        credits: int,
        prompt_tokens: int,
        completion_tokens: int,
        now: dt.datetime,
        estimated: bool = False,
    ) -> bool:
        nothing_to_refund = credits >= reservation.credits  # then settling is one guarded UPDATE
        with self.database.connect(single_statement=nothing_to_refund) as conn:
            return ledger.settle(
                conn,
                reservation,
                credits=credits,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                now=now,
                estimated=estimated,
            )

    def release(self, reservation: Reservation, *, now: dt.datetime) -> bool:
        with self.database.connect() as conn:
            return ledger.release(conn, reservation, now=now)


# KEYS: day counter, month counter. ARGV: want, minimum, daily limit, monthly limit (-1: none),
# day expiry, month expiry (unix seconds). Returns {granted, day used, month used}; granted is 0 when
# the allotment is spent, and -1 when a counter is missing (Redis lost it, or the period is new) so the
# caller can seed it from the SQL ledger first.
_RESERVE = """
local want, minimum = tonumber(ARGV[1]), tonumber(ARGV[2])
local daily, monthly = tonumber(ARGV[3]), tonumber(ARGV[4])
local d = redis.call('GET', KEYS[1])
local m = '0'
if monthly >= 0 then m = redis.call('GET', KEYS[2]) end
if not d or not m then return {-1, 0, 0} end
d, m = tonumber(d), tonumber(m)
local available = daily - d
if monthly >= 0 then available = math.min(available, monthly - m) end
if available < minimum then return {0, d, m} end
local amount = math.min(want, available)
d = redis.call('INCRBY', KEYS[1], amount)
if monthly >= 0 then m = redis.call('INCRBY', KEYS[2], amount) end
return {amount, d, m}
"""

# Refund only into a counter that still exists: a re-seeded counter already reflects the ledger.
_REFUND = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('DECRBY', key, ARGV[1]) end
end
return 1
"""


class RedisQuota:
    def __init__(self, database: Database, client: redis.Redis, prefix: str = "aimichat") -> None:
        self.database = database
        self.redis = client
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE)
        self._refund = client.register_script(_REFUND)

    @classmethod
    def from_url(cls, database: Database, url: str, prefix: str = "aimichat") -> RedisQuota:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10)
        return cls(database, client, prefix)

    def _keys(self, account_id: int, now: dt.datetime) -> tuple[str, str]:
        tag = f"{self.prefix}:q:{{{account_id}}}"  # one hash slot per account (Redis Cluster)
        return f"{tag}:d:{now:%Y-%m-%d}", f"{tag}:m:{now:%Y-%m}"

    def reserve(
        self, principal: Principal, cost: Cost, *, request_id: str, now: dt.datetime, model: str | None = None
    ) -> Reservation | Refusal:
        keys = self._keys(principal.account_id, now)
        monthly = -1 if principal.monthly_credits is None else principal.monthly_credits
        args = [cost.want, cost.minimum, principal.daily_credits, monthly]
        for _ in range(3):
            granted, day_used, month_used = self._reserve(keys=keys, args=args)
            if granted != -1:
                break
            self._seed(principal, keys, now)
        else:
            raise redis.exceptions.ConnectionError("Redis keeps losing the credit counters (maxmemory eviction?)")
        if granted == 0:
            return ledger.refusal_from(principal, cost, now, day_used, month_used)
        try:
            # Usually the ledger row alone: one INSERT, in autocommit on PostgreSQL.
            with self.database.connect(single_statement=not last_use_is_stale(principal, now)) as conn:
                reservation = ledger.record_reservation(
                    conn, principal, granted, request_id=request_id, now=now, day_used=day_used, model=model
                )
                conn.commit()
        except BaseException:
            self._refund(keys=self._period_keys(principal, keys), args=[granted])  # not recorded, so not taken
            raise
        return reservation

    def _period_keys(self, principal: Principal, keys: tuple[str, str]) -> list[str]:
        return list(keys) if principal.monthly_credits is not None else [keys[0]]

    def _seed(self, principal: Principal, keys: tuple[str, str], now: dt.datetime) -> None:
        """Start missing counters from the ledger; SET NX, so concurrent seeders agree."""
        day, month = periods.day_start(now), periods.month_start(now)
        with self.database.session() as session:
            day_used = ledger.ledger_sum(session, principal.account_id, day, day)
            month_used = ledger.ledger_sum(session, principal.account_id, month, day)
        pipe = self.redis.pipeline()
        # Kept an hour past the period's end, so late refunds of its requests still find it.
        pipe.set(keys[0], day_used, nx=True, ex=periods.seconds_until(periods.next_day_reset(now), now) + 3600)
        if principal.monthly_credits is not None:
            pipe.set(keys[1], month_used, nx=True, ex=periods.seconds_until(periods.next_month_reset(now), now) + 3600)
        pipe.execute()

    def settle(
        self,
        reservation: Reservation,
        *,
        credits: int,
        prompt_tokens: int,
        completion_tokens: int,
        now: dt.datetime,
        estimated: bool = False,
    ) -> bool:
        with self.database.connect(single_statement=True) as conn:  # the counters are in Redis: one UPDATE here
            changed = ledger.settle(
                conn,
                reservation,
                credits=credits,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                now=now,
                estimated=estimated,
                refund_counters=False,
            )
        refund = reservation.credits - max(0, min(credits, reservation.credits))
        if changed and refund:
            self._refund_reservation(reservation, refund)
        return changed

    def release(self, reservation: Reservation, *, now: dt.datetime) -> bool:
        with self.database.connect(single_statement=True) as conn:
            changed = ledger.release(conn, reservation, now=now, refund_counters=False)
        if changed:
            self._refund_reservation(reservation, reservation.credits)
        return changed

    def _refund_reservation(self, reservation: Reservation, amount: int) -> None:
        moment = dt.datetime.combine(reservation.day, dt.time())
        day_key, month_key = self._keys(reservation.account_id, moment)
        keys = [day_key] + ([month_key] if reservation.month is not None else [])
        try:
            self._refund(keys=keys, args=[amount])
        except redis.exceptions.RedisError:
            # The ledger already says what is owed; drop the counters so the next reservation
            # re-seeds them from it, rather than leave the refund lost for the rest of the period.
            log.warning("refund of %d credits to Redis failed; dropping the counters to re-seed them", amount)
            self.redis.delete(*keys)
