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

from aimichat.keys.service import NO_LIMITS, Principal, last_use_is_stale
from aimichat.store.db import Database

from . import key_windows, ledger, periods
from .ledger import Refusal, Reservation
from .pricing import Cost

log = logging.getLogger(__name__)


class QuotaBackend(Protocol):
    def reserve(
        self,
        principal: Principal,
        cost: Cost,
        *,
        request_id: str,
        now: dt.datetime,
        model: str | None = None,
        tokens: int = 0,
    ) -> Reservation | Refusal:
        """Take ``cost`` from the account and the key's caps, one request and ``tokens`` from the key's
        minute (when it has such limits), all or none; or say what refused."""
        ...

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

    def minute_use(self, principal: Principal, now: dt.datetime) -> tuple[int, int]:
        """Requests and tokens the key has used in the current minute (what its RPM and TPM count)."""
        ...


class SqlQuota:
    def __init__(self, database: Database) -> None:
        self.database = database

    def reserve(
        self,
        principal: Principal,
        cost: Cost,
        *,
        request_id: str,
        now: dt.datetime,
        model: str | None = None,
        tokens: int = 0,
    ) -> Reservation | Refusal:
        if not self.database.is_sqlite:  # PostgreSQL: the common case in one round trip
            with self.database.connect(single_statement=True) as conn:
                reservation = ledger.reserve_in_one_statement(
                    conn, principal, cost, request_id=request_id, now=now, model=model, tokens=tokens
                )
            if reservation is not None:
                return reservation
        with self.database.connect() as conn:
            return ledger.reserve(conn, principal, cost, request_id=request_id, now=now, model=model, tokens=tokens)

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
        # Nothing to give back, or PostgreSQL (which settles and refunds in one statement): one statement.
        nothing_to_refund = credits >= reservation.credits and not reservation.tokens
        nothing_to_refund = nothing_to_refund or not self.database.is_sqlite
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
        with self.database.connect(single_statement=not self.database.is_sqlite) as conn:
            return ledger.release(conn, reservation, now=now)

    def minute_use(self, principal: Principal, now: dt.datetime) -> tuple[int, int]:
        if principal.key_id is None:
            return 0, 0
        minute = periods.minute_start(now)
        with self.database.connect() as conn:
            return (
                key_windows.used(conn, principal.key_id, "rpm", minute),
                key_windows.used(conn, principal.key_id, "tpm", minute),
            )


# KEYS: the account's day and month, the key's day, month, minute of requests and minute of tokens.
# ARGV: want, minimum, then the limit of each counter (-1: none), the request's tokens, the minute's TTL.
# All or nothing: nothing is taken unless everything fits. Returns {granted, refuser, used...}: granted
# > 0 with the new totals {day, month, key day, key month, requests, tokens}; 0 with the index (1-6)
# of the counter that refused and what it holds; -1 when a credit counter is missing (Redis lost it,
# or the period is new) so the caller can seed it from the SQL ledger first. The checks run in the SQL
# backend's order: requests, tokens, the key's day and month, the account's day and month.
_RESERVE = """
local want, minimum = tonumber(ARGV[1]), tonumber(ARGV[2])
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
                tonumber(ARGV[7]), tonumber(ARGV[8])}
local tokens, ttl = tonumber(ARGV[9]), tonumber(ARGV[10])
local used = {0, 0, 0, 0, 0, 0}
for i = 1, 4 do
  if limits[i] >= 0 then
    local v = redis.call('GET', KEYS[i])
    if not v then return {-1, i, 0} end
    used[i] = tonumber(v)
  end
end
for i = 5, 6 do
  if limits[i] >= 0 then used[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
end
if limits[5] >= 0 and used[5] + 1 > limits[5] then return {0, 5, used[5], used[1]} end
if limits[6] >= 0 and used[6] + tokens > limits[6] then return {0, 6, used[6], used[1]} end
local available = want
for _, i in ipairs({3, 4, 1, 2}) do
  if limits[i] >= 0 then
    if limits[i] - used[i] < minimum then return {0, i, used[i], used[1]} end
    available = math.min(available, limits[i] - used[i])
  end
end
for i = 1, 4 do
  if limits[i] >= 0 then used[i] = redis.call('INCRBY', KEYS[i], available) end
end
if limits[5] >= 0 then used[5] = redis.call('INCRBY', KEYS[5], 1); redis.call('EXPIRE', KEYS[5], ttl) end
if limits[6] >= 0 then used[6] = redis.call('INCRBY', KEYS[6], tokens); redis.call('EXPIRE', KEYS[6], ttl) end
return {available, 0, used[1], used[2], used[3], used[4], used[5], used[6]}
"""

# Refund ARGV[i] into KEYS[i], only into a counter that still exists: a re-seeded counter already
# reflects the ledger, and a minute window that expired no longer counts.
_REFUND = """
for i, key in ipairs(KEYS) do
  if tonumber(ARGV[i]) > 0 and redis.call('EXISTS', key) == 1 then redis.call('DECRBY', key, ARGV[i]) end
end
return 1
"""

_REFUSERS: dict[int, ledger.Period] = {1: "day", 2: "month", 3: "key_day", 4: "key_month", 5: "rpm", 6: "tpm"}
_MINUTE_TTL = 120  # seconds a minute window is kept: past its end, for late refunds


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

    def _keys(self, account_id: int, now: dt.datetime, key_id: int | None = None) -> list[str]:
        """The six counters of a reservation, all in the account's hash slot (Redis Cluster)."""
        tag = f"{self.prefix}:q:{{{account_id}}}"
        key = f"{tag}:k{key_id}"
        minute = periods.minute_start(now)
        return [
            f"{tag}:d:{now:%Y-%m-%d}",
            f"{tag}:m:{now:%Y-%m}",
            f"{key}:d:{now:%Y-%m-%d}",
            f"{key}:m:{now:%Y-%m}",
            f"{key}:rpm:{minute:%Y-%m-%dT%H:%M}",
            f"{key}:tpm:{minute:%Y-%m-%dT%H:%M}",
        ]

    def reserve(
        self,
        principal: Principal,
        cost: Cost,
        *,
        request_id: str,
        now: dt.datetime,
        model: str | None = None,
        tokens: int = 0,
    ) -> Reservation | Refusal:
        keyed = principal.has_key_limits
        limits = principal.limits if keyed else NO_LIMITS
        keys = self._keys(principal.account_id, now, principal.key_id)
        caps = [principal.daily_credits, principal.monthly_credits, limits.daily_cap, limits.monthly_cap]
        caps += [limits.rpm, limits.tpm]
        args = [cost.want, cost.minimum, *(-1 if c is None else c for c in caps), tokens, _MINUTE_TTL]
        for _ in range(3):
            result = self._reserve(keys=keys, args=args)
            if result[0] != -1:
                break
            self._seed(principal, keys, now)
        else:
            raise redis.exceptions.ConnectionError("Redis keeps losing the credit counters (maxmemory eviction?)")
        granted = int(result[0])
        if granted == 0:
            return self._refusal(principal, cost, now, result)
        used = [int(v) for v in result[2:]]
        figures = ledger.NO_KEY_FIGURES
        if keyed:
            figures = ledger.KeyFigures(
                day_used=used[2] if limits.daily_cap is not None else None,
                daily_cap=limits.daily_cap,
                month_used=used[3] if limits.monthly_cap is not None else None,
                monthly_cap=limits.monthly_cap,
                minute=periods.minute_start(now),
                at=now,
                requests_used=used[4] if limits.rpm is not None else None,
                rpm=limits.rpm,
                tokens_used=used[5] if limits.tpm is not None else None,
                tpm=limits.tpm,
            )
        try:
            # Usually the ledger row alone: one INSERT, in autocommit on PostgreSQL.
            with self.database.connect(single_statement=not last_use_is_stale(principal, now)) as conn:
                reservation = ledger.record_reservation(
                    conn,
                    principal,
                    granted,
                    request_id=request_id,
                    now=now,
                    day_used=used[0],
                    model=model,
                    key=figures,
                    tokens=tokens,
                )
                conn.commit()
        except BaseException:
            # Not recorded, so not taken: give back all the Lua script took.
            amounts = [granted, granted, granted, granted, 1, tokens]
            self._refund(keys=keys, args=[a if c is not None else 0 for a, c in zip(amounts, caps, strict=True)])
            raise
        return reservation

    def _refusal(self, principal: Principal, cost: Cost, now: dt.datetime, result: list[int]) -> Refusal:
        refused = _REFUSERS[int(result[1])]
        if refused in ("day", "month"):
            day_used = int(result[2]) if refused == "day" else int(result[3])
            month_used = int(result[2]) if refused == "month" else 0
            return ledger.refusal_from(principal, cost, now, day_used, month_used)
        day_used = int(result[3]) if len(result) > 3 else 0
        return ledger.key_refusal(principal, refused, int(result[2]), now, day_used)

    def _seed(self, principal: Principal, keys: list[str], now: dt.datetime) -> None:
        """Start missing credit counters from the ledger; SET NX, so concurrent seeders agree."""
        day, month = periods.day_start(now), periods.month_start(now)
        limits, key_id = principal.limits, principal.key_id
        with self.database.session() as session:
            values = [
                ledger.ledger_sum(session, principal.account_id, day, day),
                ledger.ledger_sum(session, principal.account_id, month, day),
            ]
            if key_id is not None and (limits.daily_cap is not None or limits.monthly_cap is not None):
                values += [
                    ledger.key_ledger_sum(session, key_id, day, day),
                    ledger.key_ledger_sum(session, key_id, month, day),
                ]
        # Kept an hour past the period's end, so late refunds of its requests still find it.
        day_ttl = periods.seconds_until(periods.next_day_reset(now), now) + 3600
        month_ttl = periods.seconds_until(periods.next_month_reset(now), now) + 3600
        pipe = self.redis.pipeline()
        for key, value, ttl in zip(keys[:4], values, [day_ttl, month_ttl, day_ttl, month_ttl], strict=False):
            pipe.set(key, value, nx=True, ex=ttl)
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
        if changed:
            self._refund_reservation(
                reservation, refund, ledger.unused_tokens(reservation, prompt_tokens + completion_tokens)
            )
        return changed

    def release(self, reservation: Reservation, *, now: dt.datetime) -> bool:
        with self.database.connect(single_statement=True) as conn:
            changed = ledger.release(conn, reservation, now=now, refund_counters=False)
        if changed:
            self._refund_reservation(reservation, reservation.credits, reservation.tokens)
        return changed

    def minute_use(self, principal: Principal, now: dt.datetime) -> tuple[int, int]:
        if principal.key_id is None:
            return 0, 0
        keys = self._keys(principal.account_id, now, principal.key_id)
        requests, tokens = self.redis.mget(keys[4], keys[5])
        return int(requests or 0), int(tokens or 0)

    def _refund_reservation(self, reservation: Reservation, amount: int, tokens: int = 0) -> None:
        moment = periods.as_datetime(reservation.day)
        figures = reservation.key
        if figures.minute is not None:
            moment = figures.minute  # same day; the minute names the tokens' window
        keys = self._keys(reservation.account_id, moment, reservation.key_id)
        amounts = [
            amount,
            amount if reservation.month is not None else 0,
            amount if figures.daily_cap is not None else 0,
            amount if figures.monthly_cap is not None else 0,
            0,
            tokens if figures.tpm is not None else 0,
        ]
        if not any(amounts):
            return
        try:
            self._refund(keys=keys, args=amounts)
        except redis.exceptions.RedisError:
            # The ledger already says what is owed; drop the credit counters so the next reservation
            # re-seeds them from it, rather than leave the refund lost for the rest of the period.
            log.warning("refund of %d credits to Redis failed; dropping the counters to re-seed them", amount)
            self.redis.delete(*keys[:4])
