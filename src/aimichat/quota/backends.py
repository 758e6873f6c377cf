"""Where the credit counters live: SQL (the default) or Redis (for fleets with hot accounts).

Both backends write the same SQL ledger, one row per granted request, and give the same answers;
``tests/quota/test_backends.py`` runs one conformance suite against each. They differ only in where
the atomic "take n credits if they fit" happens:

- ``SqlQuota``: a conditional UPDATE on the account's counter row, in the ledger row's transaction.
- ``RedisQuota``: one Lua script over the day and month counters (and the key's), after the ledger row
  is inserted in SQL (an INSERT, which does not serialise on a hot row).

Redis counters are a cache of the ledger
----------------------------------------

Redis may lose any counter at any moment (a restart without persistence, an eviction, an operator's
FLUSHDB); a lost credit counter is rebuilt from the SQL ledger. A rebuilt counter must count every
grant, including those in flight, and nothing twice, or the allotment is oversold (issue 15: a counter
rebuilt while grants taken in Redis had no ledger row yet sold 66 credits of 50). Four rules:

1. **The row first.** A reservation writes its ledger row (``status='reserved'``, the credits it wants)
   and only then takes the credits in Redis; if Redis refuses, the row is deleted. Every credit Redis
   ever took is therefore in the ledger before it is taken: a rebuild that reads the ledger sees it.
2. **A rebuild holds the counter while it reads.** The reservation script, finding a credit counter
   missing, puts a placeholder in its place (a random token, expiring after 5 s should its replica die)
   and returns; other reservations wait for it (10 s at most, then 503). The replica that put it reads
   the ledger (the period's sum and the ``(id, credits)`` of its rows still ``reserved``, in one
   statement: one snapshot) and installs the counter only if its placeholder is still there: then
   nothing was taken while it read, and all that was taken before is in what it read (1). If the counter
   was lost again meanwhile, the placeholder is gone and the rebuild starts over.
3. **Open rows are marked, apart.** A row the ledger shows ``reserved`` may not be taken yet (its script
   is about to run, or is waiting for this very rebuild) or may have been taken before the loss and be
   settled later. The rebuilt counter cannot tell: it counts the settled rows, and keeps each open row's
   credits apart as a mark (``r:<id>``; their sum ``m``). A limit is checked against the count plus the
   marks. A row's own script drops its mark and takes its credits like any other; its settlement
   replaces the mark with what it charged; its deletion (a refusal) drops it. A settlement that meets a
   placeholder notes the row's new amount (``a:<id>``), for the rebuild to apply if it read the row open.
4. **Generations.** Each rebuild gives its counter a new generation. A settlement refunds directly only
   into the generation its reservation was taken in: a counter rebuilt since read the settled row.

Just after a rebuild, marks are mostly rows about to be decided. For 2 seconds, then, a reservation that
fits but for marks waits for them (100 ms at most, then counts them), and the figures a caller is told
(``X-RateLimit-Remaining``, a refusal's ``used``) leave them out unless they are what refused; later they
count (they are then requests in flight during the loss, or settled since without visiting Redis). So a rebuild
never grants too much, and a burst of requests on a fresh day (the first reservation of a period is a
rebuild too) is told exactly where each stands. Under counters lost over and over (every few ms), open
rows are counted at their reservation while undecided, and some requests are refused that a steady
counter would have granted: never the reverse.

Round trips of a reservation: a grant is 2, as before the fix (the INSERT, then the script; the script
used to come first); a settlement is 1 (the UPDATE), plus the refund script when something is given
back, as before. A refusal is 4 (INSERT, script, DELETE, then a script that drops a mark a rebuild may
have put on the row in between) where it was 1; but after a refusal, a replica checks the principal's
counters first for a second (1 round trip, nothing written), so a client hammering a spent allotment
costs one round trip a request, as before. A per-token reservation clamped to what is left re-sizes its
row before taking it: 2 more. A rebuild is one SQL statement and two scripts. The SQL backend is
unchanged.

A reservation whose script fails without saying whether it took (a timeout) deletes its row and drops
the counters, which are rebuilt, exactly; should that fail too, the counters count a request the ledger
does not: never too few. Rolling out this version replaces replicas that took before they wrote: during
the rollout, a rebuild can still miss the old replicas' grants in flight.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import secrets
import time
from typing import Any, Protocol

import redis

from aimichat.keys.service import NO_LIMITS, Principal, last_use_is_stale
from aimichat.store.db import Database

from . import key_windows, ledger, periods
from .ledger import Refusal, Reservation
from .pricing import Cost

log = logging.getLogger(__name__)


class QuotaBackend(Protocol):
    # Does a settlement that charges exactly what was reserved, and gives no tokens back, change what the
    # next reservation is told? SQL: no, only the row's status changes. Redis: it can, for 2 s after a
    # rebuild: a counter rebuilt while the row was still open keeps it apart as a mark, which a grant's
    # figures leave out while it is young (see the module docstring).
    exact_settlements_matter: bool

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

    def settle_stale(
        self, reservation: Reservation, *, credits: int, prompt_tokens: int, completion_tokens: int, now: dt.datetime
    ) -> bool:
        """Settle a reservation that its request never settled (see :mod:`.sweeper`), from another process
        maybe: charge ``credits`` (``status='released'`` when 0) and give the rest back to the account's
        and the key's credit counters. Exactly once, like :meth:`settle`: False if it was settled already."""
        ...

    def minute_use(self, principal: Principal, now: dt.datetime) -> tuple[int, int]:
        """Requests and tokens the key has used in the current minute (what its RPM and TPM count)."""
        ...


def _stale_status(credits: int) -> str:
    return "charged" if credits > 0 else "released"


class SqlQuota:
    exact_settlements_matter = False

    def __init__(self, database: Database, *, durable_settlements: bool = False) -> None:
        self.database = database
        self.durable_settlements = durable_settlements  # see ledger.settle's wait_for_flush

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
                wait_for_flush=self.durable_settlements,
            )

    def release(self, reservation: Reservation, *, now: dt.datetime) -> bool:
        with self.database.connect(single_statement=not self.database.is_sqlite) as conn:
            return ledger.release(conn, reservation, now=now)

    def settle_stale(
        self, reservation: Reservation, *, credits: int, prompt_tokens: int, completion_tokens: int, now: dt.datetime
    ) -> bool:
        # The same as a settlement: the row and every refund in one transaction, guarded by its status.
        with self.database.connect() as conn:
            return ledger.settle(
                conn,
                reservation,
                credits=credits,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                now=now,
                estimated=True,
                status=_stale_status(credits),
            )

    def minute_use(self, principal: Principal, now: dt.datetime) -> tuple[int, int]:
        if principal.key_id is None:
            return 0, 0
        minute = periods.minute_start(now)
        with self.database.connect() as conn:
            return (
                key_windows.used(conn, principal.key_id, "rpm", minute),
                key_windows.used(conn, principal.key_id, "tpm", minute),
            )


# -- Redis ---------------------------------------------------------------------------------------
#
# A credit counter is two keys in the account's hash slot: its count (a string, ``…:q:{account}:…``) and
# its bookkeeping (a hash, ``…:qm:{account}:…``): ``g`` its generation, ``s`` the token of a rebuild in
# progress, ``t`` when it was rebuilt, ``r:<ledger id>`` the credits of a row that was open when it was
# rebuilt (a mark) and ``m`` their sum, ``a:<id>`` what such a row was settled to while the rebuild read
# the ledger. What the counter holds is its count plus ``m``. The module docstring says why.

# KEYS: 1-4 the credit counters (the account's day and month, the key's day and month), 5-6 the key's
# minute of requests and of tokens, 7-10 the credit counters' hashes.
# ARGV: 1 want, 2 minimum, 3-8 the limit of each counter (-1: none), 9 the request's tokens, 10 the
# minute's TTL, 11 the ledger row's id ('': only check, take nothing), 12 a fresh token and 13 a TTL (ms)
# for a rebuild, 14 '1' to wait rather than refuse for young marks, 15 how long marks are young (seconds).
# All or nothing, in the SQL backend's order: requests, tokens, the key's day and month, the account's
# day and month. Returns {want, 0, the six counters now, the generations of the four credit counters}
# when granted; {0, the index of the counter that refused, what it holds, the account's day}; {-1,
# indexes...} when credit counters are missing (placeholders now hold them: the caller rebuilds them);
# {-2, index} when another rebuild is in progress (wait); {-3, available} when less than want but at least
# minimum is left (nothing taken: the caller re-sizes its row and asks for that); {-4} when it fits but
# for young marks (wait: they are mostly rows about to be taken or refused). A row's own mark is replaced
# by what it takes, whatever the answer. Checking: {1} when it may fit, {-1} when a counter is missing.
# The figures returned leave out young marks: a grant is told where the requests decided so far stand.
_RESERVE = """
local want, minimum = tonumber(ARGV[1]), tonumber(ARGV[2])
local limits = {}
for i = 1, 6 do limits[i] = tonumber(ARGV[i + 2]) end
local tokens, ttl, id, patient = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11], ARGV[14] == '1'
local mark = 'r:' .. id
local now = tonumber(redis.call('TIME')[1])
local used, open, gens, lost, young = {0, 0, 0, 0, 0, 0}, {0, 0, 0, 0}, {'', '', '', ''}, {}, false
for i = 1, 4 do
  if limits[i] >= 0 then
    local meta = redis.call('HMGET', KEYS[i + 6], 's', 'g', 'm', 't', mark)
    if meta[1] then return {-2, i} end
    local value = redis.call('GET', KEYS[i])
    if value and meta[2] then
      used[i], gens[i], open[i] = tonumber(value), meta[2], tonumber(meta[3] or '0')
      if meta[5] and id ~= '' then
        open[i] = open[i] - tonumber(meta[5])
        redis.call('HDEL', KEYS[i + 6], mark)
        if tonumber(meta[5]) ~= 0 then redis.call('HINCRBY', KEYS[i + 6], 'm', -tonumber(meta[5])) end
      end
      if open[i] > 0 and now - tonumber(meta[4] or '0') < tonumber(ARGV[15]) then young = true end
    else
      lost[#lost + 1] = i
    end
  end
end
if #lost > 0 then
  if id == '' then return {-1} end
  for _, i in ipairs(lost) do
    redis.call('DEL', KEYS[i], KEYS[i + 6])
    redis.call('HSET', KEYS[i + 6], 's', ARGV[12])
    redis.call('PEXPIRE', KEYS[i + 6], ARGV[13])
  end
  return {-1, unpack(lost)}
end
for i = 5, 6 do
  if limits[i] >= 0 then used[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
end
local function shown(i, counted)
  if i > 4 or (young and not counted) then return used[i] end
  return used[i] + open[i]
end
if limits[5] >= 0 and used[5] + 1 > limits[5] then return {0, 5, used[5], shown(1)} end
if limits[6] >= 0 and used[6] + tokens > limits[6] then return {0, 6, used[6], shown(1)} end
local sure, counted = want, want
for _, i in ipairs({3, 4, 1, 2}) do
  if limits[i] >= 0 then
    if limits[i] - used[i] < minimum then return {0, i, shown(i), shown(1)} end
    sure = math.min(sure, limits[i] - used[i])
    counted = math.min(counted, limits[i] - used[i] - open[i])
  end
end
if counted < sure then
  if patient and young then
    if id == '' then return {1} end
    return {-4}
  end
  for _, i in ipairs({3, 4, 1, 2}) do
    if limits[i] >= 0 and limits[i] - used[i] - open[i] < minimum then return {0, i, shown(i, true), shown(1, true)} end
  end
end
if id == '' then return {1} end
if counted < want then return {-3, counted} end
for i = 1, 4 do
  if limits[i] >= 0 then used[i] = redis.call('INCRBY', KEYS[i], want) end
end
if limits[5] >= 0 then used[5] = redis.call('INCRBY', KEYS[5], 1); redis.call('EXPIRE', KEYS[5], ttl) end
if limits[6] >= 0 then used[6] = redis.call('INCRBY', KEYS[6], tokens); redis.call('EXPIRE', KEYS[6], ttl) end
return {want, 0, shown(1), shown(2), shown(3), shown(4), used[5], used[6], gens[1], gens[2], gens[3], gens[4]}
"""

# KEYS: (counter, its hash) pairs being rebuilt. ARGV: 1 the rebuild's token, then for each pair: its TTL
# (seconds), the ledger's sum, the number n of rows still open, n (id, credits) pairs. Installs each
# counter whose placeholder is still this rebuild's: the settled rows counted, the open ones marked;
# returns {1 or 0} per pair (0: lost again, start over).
_SEED = """
local token, at, done = ARGV[1], 2, {}
local now = redis.call('TIME')[1]
for k = 1, #KEYS / 2 do
  local counter, meta = KEYS[2 * k - 1], KEYS[2 * k]
  local ttl, total, n = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local first = at + 3
  at = first + 2 * n
  done[k] = 0
  if redis.call('HGET', meta, 's') == token then
    local marks, open = {}, 0
    for j = first, first + 2 * n - 1, 2 do
      local credits, settled = tonumber(ARGV[j + 1]), redis.call('HGET', meta, 'a:' .. ARGV[j])
      if settled then
        total = total - credits + tonumber(settled)
      else
        total = total - credits
        open = open + credits
        marks[#marks + 1] = 'r:' .. ARGV[j]
        marks[#marks + 1] = credits
      end
    end
    redis.call('DEL', meta)
    redis.call('SET', counter, total, 'EX', ttl)
    redis.call('HSET', meta, 'g', token, 'm', open, 't', now)
    for j = 1, #marks, 200 do
      redis.call('HSET', meta, unpack(marks, j, math.min(j + 199, #marks)))
    end
    redis.call('EXPIRE', meta, ttl)
    done[k] = 1
  end
end
return done
"""

# KEYS: 1-4 the credit counters, 5-8 their hashes, 9 the key's minute of tokens. ARGV: 1 the row's id;
# for each credit counter i, at 3i-1, 3i, 3i+1: the generation it was taken in ('': the counter does not
# apply; '-': nothing was taken), what was taken, what the row holds now; 14 tokens to give back.
# A counter being rebuilt notes what the row holds now (the rebuild applies it if it read the row open);
# one that marked the row counts what it holds now instead; the generation the row was taken in
# refunds directly; a counter rebuilt since (or missing) read the ledger after the row changed.
_REFUND = """
local mark, note = 'r:' .. ARGV[1], 'a:' .. ARGV[1]
for i = 1, 4 do
  local gen, taken, final = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  if gen ~= '' then
    local meta = redis.call('HMGET', KEYS[i + 4], 's', 'g', mark)
    if meta[1] then
      redis.call('HSET', KEYS[i + 4], note, final)
    elseif meta[2] and redis.call('EXISTS', KEYS[i]) == 1 then
      if meta[3] then
        redis.call('HDEL', KEYS[i + 4], mark)
        if tonumber(meta[3]) ~= 0 then redis.call('HINCRBY', KEYS[i + 4], 'm', -tonumber(meta[3])) end
        if final ~= 0 then redis.call('INCRBY', KEYS[i], final) end
      elseif meta[2] == gen and final ~= taken then
        redis.call('INCRBY', KEYS[i], final - taken)
      end
    end
  end
end
local tokens = tonumber(ARGV[14])
if tokens > 0 and redis.call('EXISTS', KEYS[9]) == 1 then redis.call('DECRBY', KEYS[9], tokens) end
return 1
"""

_REFUSERS: dict[int, ledger.Period] = {1: "day", 2: "month", 3: "key_day", 4: "key_month", 5: "rpm", 6: "tpm"}
_MINUTE_TTL = 120  # seconds a minute window is kept: past its end, for late refunds
_REBUILD_TTL_MS = 5000  # a rebuild's placeholder outlives a replica that died while rebuilding by this much
_REBUILD_WAIT = 10.0  # seconds a reservation waits for counters being rebuilt before it gives up (503)
_YOUNG_MARKS = 2  # seconds after a rebuild during which its marks are mostly rows about to be decided
_MARKS_WAIT = 0.1  # seconds a reservation that fits but for young marks waits for them to be decided
_CHECK_AFTER_REFUSAL = 1.0  # seconds a principal's reservations are checked first after a refusal
_NOT_TAKEN = "-"  # the generation of a row that was never taken (a refusal): no generation matches it


def _is_refusal(result: list[Any]) -> bool:
    """Is this answer of the reservation script a refusal ({0, the counter that refused, ...})? A grant of
    nothing (a free request) is {0, 0, ...}."""
    return int(result[0]) == 0 and int(result[1]) > 0


class _Counters:
    """The Redis keys of one reservation, all in the account's hash slot (Redis Cluster)."""

    __slots__ = ("credit", "meta", "minute")

    def __init__(self, prefix: str, account_id: int, now: dt.datetime, key_id: int | None) -> None:
        minute = periods.minute_start(now)
        names = [f"{{{account_id}}}:d:{now:%Y-%m-%d}", f"{{{account_id}}}:m:{now:%Y-%m}"]
        names += [f"{{{account_id}}}:k{key_id}:d:{now:%Y-%m-%d}", f"{{{account_id}}}:k{key_id}:m:{now:%Y-%m}"]
        self.credit = [f"{prefix}:q:{name}" for name in names]
        self.meta = [f"{prefix}:qm:{name}" for name in names]
        key = f"{prefix}:q:{{{account_id}}}:k{key_id}"
        self.minute = [f"{key}:rpm:{minute:%Y-%m-%dT%H:%M}", f"{key}:tpm:{minute:%Y-%m-%dT%H:%M}"]

    @property
    def reserve_keys(self) -> list[str]:
        return [*self.credit, *self.minute, *self.meta]

    @property
    def refund_keys(self) -> list[str]:
        return [*self.credit, *self.meta, self.minute[1]]


class RedisQuota:
    exact_settlements_matter = True

    def __init__(
        self, database: Database, client: redis.Redis, prefix: str = "aimichat", *, durable_settlements: bool = False
    ) -> None:
        self.database = database
        self.redis = client
        self.prefix = prefix
        self.durable_settlements = durable_settlements  # see ledger.settle's wait_for_flush
        self._reserve = client.register_script(_RESERVE)
        self._seed_script = client.register_script(_SEED)
        self._refund = client.register_script(_REFUND)
        self._refused: dict[tuple[int, int | None], float] = {}  # principal -> until when to check first

    @classmethod
    def from_url(
        cls, database: Database, url: str, prefix: str = "aimichat", *, durable_settlements: bool = False
    ) -> RedisQuota:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10)
        return cls(database, client, prefix, durable_settlements=durable_settlements)

    def _counters(self, account_id: int, now: dt.datetime, key_id: int | None = None) -> _Counters:
        return _Counters(self.prefix, account_id, now, key_id)

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
        counters = self._counters(principal.account_id, now, principal.key_id)
        caps = [principal.daily_credits, principal.monthly_credits, limits.daily_cap, limits.monthly_cap]
        caps += [limits.rpm, limits.tpm]
        args: list[Any] = [cost.want, cost.minimum, *(-1 if c is None else c for c in caps), tokens, _MINUTE_TTL]
        who = (principal.account_id, principal.key_id)
        if self._refused.get(who, 0.0) > time.monotonic():
            # This principal was just refused: check first, so a client hammering a spent allotment costs
            # one round trip a request and writes nothing.
            checked = self._reserve(
                keys=counters.reserve_keys, args=[*args, "", "", _REBUILD_TTL_MS, "1", _YOUNG_MARKS]
            )
            if _is_refusal(checked):
                return self._refusal(principal, cost, now, checked)
        counted_tokens = tokens if limits.tpm is not None else 0
        # 1. The ledger row: from now on a rebuild of the counters counts this reservation.
        with self.database.connect(single_statement=not last_use_is_stale(principal, now)) as conn:
            ledger_id = ledger.insert_reservation(
                conn,
                principal,
                cost.want,
                request_id=request_id,
                now=now,
                model=model,
                tokens=counted_tokens,
                prompt_tokens=cost.prompt_tokens,
            )
            conn.commit()
        # 2. The credits, in Redis.
        try:
            result = self._take(principal, counters, args, ledger_id, now)
        except BaseException:
            self._abandon(ledger_id, counters)
            raise
        if _is_refusal(result):
            self._unrecord(ledger_id, counters, caps)
            self._note_refusal(who)
            return self._refusal(principal, cost, now, result)
        self._refused.pop(who, None)
        granted = int(result[0])
        used = [int(v) for v in result[2:8]]
        generations = tuple(g.decode() if isinstance(g, bytes) else str(g) for g in result[8:12])
        figures = ledger.NO_KEY_FIGURES
        if keyed:
            figures = ledger.key_figures(limits, now, day=used[2], month=used[3], requests=used[4], tokens=used[5])
        return ledger.reservation_of(
            principal,
            ledger_id,
            granted,
            request_id,
            now,
            day_used=used[0],
            key=figures,
            tokens=counted_tokens,
            generations=generations,
        )

    def _take(
        self, principal: Principal, counters: _Counters, args: list[Any], ledger_id: int, now: dt.datetime
    ) -> list[Any]:
        """Run the reservation script for the row ``ledger_id`` until it grants or refuses: rebuild the
        counters it finds missing, wait for rebuilds in progress elsewhere, re-size a clamped row."""
        deadline = time.monotonic() + _REBUILD_WAIT
        marks_deadline: float | None = None  # until when to wait for young marks, once met
        patient = "1"
        pause = 0.002
        while True:
            token = secrets.token_hex(8)
            result: list[Any] = self._reserve(
                keys=counters.reserve_keys, args=[*args, ledger_id, token, _REBUILD_TTL_MS, patient, _YOUNG_MARKS]
            )
            code = int(result[0])
            if code >= 0:
                return result
            if code == -3:  # less is left than wanted: count that on the row first, then take it
                args = [int(result[1]), *args[1:]]
                with self.database.connect(single_statement=True) as conn:
                    ledger.resize_reservation(conn, ledger_id, args[0])
                    conn.commit()
                continue
            if code == -4:  # it fits but for rows a rebuild could not tell apart: wait a little for them
                marks_deadline = marks_deadline or time.monotonic() + _MARKS_WAIT
                if time.monotonic() >= marks_deadline:
                    patient = "0"  # then count them, as the ledger does
                    continue
            elif time.monotonic() > deadline:
                raise redis.exceptions.ConnectionError("the credit counters could not be rebuilt in time")
            elif code == -1:
                self._rebuild(principal, counters, now, token, [int(i) for i in result[1:]])
                continue
            time.sleep(pause * random.uniform(0.5, 1.5))  # jittered: waiters do not all come back at once
            pause = min(pause * 2, 0.05)

    def _rebuild(
        self, principal: Principal, counters: _Counters, now: dt.datetime, token: str, indexes: list[int]
    ) -> None:
        """Rebuild the credit counters ``indexes`` (1-4), which hold this token's placeholders, from the
        ledger: its sum and its open rows, read after the placeholders were put in (see the docstring)."""
        day, month = periods.day_start(now), periods.month_start(now)
        day_ttl = periods.seconds_until(periods.next_day_reset(now), now) + 3600  # an hour past the period's
        month_ttl = periods.seconds_until(periods.next_month_reset(now), now) + 3600  # end, for late refunds
        owners = {1: (principal.account_id, False), 2: (principal.account_id, False)}
        if principal.key_id is not None:
            owners |= {3: (principal.key_id, True), 4: (principal.key_id, True)}
        spans = {1: (day, day_ttl), 2: (month, month_ttl), 3: (day, day_ttl), 4: (month, month_ttl)}
        with self.database.connect(single_statement=True) as conn:
            held = ledger.held_credits(conn, [(*owners[i], spans[i][0], day) for i in indexes])
            conn.rollback()
        keys: list[str] = []
        args: list[Any] = [token]
        for index, figures in zip(indexes, held, strict=True):
            keys += [counters.credit[index - 1], counters.meta[index - 1]]
            args += [spans[index][1], figures.total, len(figures.open_rows)]
            args += [value for row in figures.open_rows for value in row]
        self._seed_script(keys=keys, args=args)

    def _unrecord(self, ledger_id: int, counters: _Counters, caps: list[int | None]) -> None:
        """Refused: delete the row, then give back any mark a rebuild put on it meanwhile."""
        with self.database.connect(single_statement=True) as conn:
            ledger.delete_reservation(conn, ledger_id)
            conn.commit()
        args: list[Any] = [ledger_id]
        for cap in caps[:4]:
            args += ["" if cap is None else _NOT_TAKEN, 0, 0]
        self._refund(keys=counters.refund_keys, args=[*args, 0])

    def _abandon(self, ledger_id: int, counters: _Counters) -> None:
        """The script failed (maybe after taking, maybe not): delete the row and the credit counters, which
        are then rebuilt from the ledger, exactly. Should that fail too, the counters count a request the
        ledger does not (never too few)."""
        try:
            with self.database.connect(single_statement=True) as conn:
                ledger.delete_reservation(conn, ledger_id)
                conn.commit()
        except Exception:
            log.exception("could not delete the row of reservation %d", ledger_id)
        self._drop(counters.credit, f"reservation {ledger_id}")

    def _note_refusal(self, who: tuple[int, int | None]) -> None:
        now = time.monotonic()
        if len(self._refused) > 10_000:
            self._refused = {k: until for k, until in self._refused.items() if until > now}
        self._refused[who] = now + _CHECK_AFTER_REFUSAL

    def _refusal(self, principal: Principal, cost: Cost, now: dt.datetime, result: list[Any]) -> Refusal:
        refused = _REFUSERS[int(result[1])]
        if refused in ("day", "month"):
            day_used = int(result[2]) if refused == "day" else int(result[3])
            month_used = int(result[2]) if refused == "month" else 0
            return ledger.refusal_from(principal, cost, now, day_used, month_used)
        day_used = int(result[3]) if len(result) > 3 else 0
        return ledger.key_refusal(principal, refused, int(result[2]), now, day_used)

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
        try:
            with self.database.connect(single_statement=True) as conn:  # the counters are in Redis: one UPDATE
                changed = ledger.settle(
                    conn,
                    reservation,
                    credits=credits,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    now=now,
                    estimated=estimated,
                    refund_counters=False,
                    wait_for_flush=self.durable_settlements,
                )
        except Exception:
            self._drop_counters(reservation)  # the row may be settled without its refund: rebuild from it
            raise
        if changed:
            final = max(0, min(credits, reservation.credits))
            self._refund_reservation(
                reservation, final, ledger.unused_tokens(reservation, prompt_tokens + completion_tokens)
            )
        return changed

    def release(self, reservation: Reservation, *, now: dt.datetime) -> bool:
        try:
            with self.database.connect(single_statement=True) as conn:
                changed = ledger.release(conn, reservation, now=now, refund_counters=False)
        except Exception:
            self._drop_counters(reservation)
            raise
        if changed:
            self._refund_reservation(reservation, 0, reservation.tokens)
        return changed

    def settle_stale(
        self, reservation: Reservation, *, credits: int, prompt_tokens: int, completion_tokens: int, now: dt.datetime
    ) -> bool:
        with self.database.connect(single_statement=True) as conn:
            changed = ledger.settle(
                conn,
                reservation,
                credits=credits,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                now=now,
                estimated=True,
                status=_stale_status(credits),
                refund_counters=False,
            )
        if changed:
            # This process does not know the generations the row was taken in (nor whether it was taken at
            # all, when its replica died in between): drop the credit counters, which are rebuilt from the
            # ledger, exactly, by the next reservation. Sweeps are rare; a rebuild is one query a counter.
            self._drop_counters(reservation, quietly=False)
        return changed

    def _drop_counters(self, reservation: Reservation, *, quietly: bool = True) -> None:
        """Delete a reservation's credit counters: the next reservation rebuilds them from the ledger."""
        moment = periods.as_datetime(reservation.day)
        keys = self._counters(reservation.account_id, moment, reservation.key_id).credit
        self._drop(keys, f"reservation {reservation.ledger_id}", quietly=quietly)

    def _drop(self, keys: list[str], what: str, *, quietly: bool = True) -> None:
        """Delete credit counters (to be rebuilt from the ledger) because Redis just failed: once more after
        a dropped connection, not after a timeout (a request failing already would wait another 2 s). A
        counter left standing counts too much, never too little."""
        for attempt in range(2):
            try:
                self.redis.delete(*keys)
                return
            except redis.exceptions.RedisError as exc:
                if attempt == 0 and not isinstance(exc, redis.exceptions.TimeoutError):
                    time.sleep(0.05)
                    continue
                if not quietly:
                    raise
                log.warning("could not drop the credit counters of %s: they may count too much", what)
                return

    def minute_use(self, principal: Principal, now: dt.datetime) -> tuple[int, int]:
        if principal.key_id is None:
            return 0, 0
        counters = self._counters(principal.account_id, now, principal.key_id)
        requests, tokens = self.redis.mget(counters.minute)
        return int(requests or 0), int(tokens or 0)

    def held_counters(self, account_id: int, key_id: int | None, now: dt.datetime) -> dict[str, int | None]:
        """What the day's and month's credit counters of the account (or of its key ``key_id``) hold now
        (their count and their marks); None for one that is missing or being rebuilt."""
        counters = self._counters(account_id, now, key_id)
        indexes = (0, 1) if key_id is None else (2, 3)
        pipe = self.redis.pipeline(transaction=True)
        for i in indexes:
            pipe.get(counters.credit[i])
            pipe.hmget(counters.meta[i], "g", "m")
        day, (day_gen, day_open), month, (month_gen, month_open) = pipe.execute()
        return {
            "day": int(day) + int(day_open or 0) if day is not None and day_gen is not None else None,
            "month": int(month) + int(month_open or 0) if month is not None and month_gen is not None else None,
        }

    def _refund_reservation(self, reservation: Reservation, final: int, tokens: int = 0) -> None:
        figures = reservation.key
        if final == reservation.credits and not (tokens and figures.tpm is not None):
            return  # what was taken stands, and whatever a rebuild counted for the row is the same
        moment = periods.as_datetime(reservation.day)
        if figures.minute is not None:
            moment = figures.minute  # same day; the minute names the tokens' window
        counters = self._counters(reservation.account_id, moment, reservation.key_id)
        applies = [True, reservation.month is not None, figures.daily_cap is not None, figures.monthly_cap is not None]
        generations = reservation.generations or (_NOT_TAKEN,) * 4
        args: list[Any] = [reservation.ledger_id]
        for i in range(4):
            args += [(generations[i] or _NOT_TAKEN) if applies[i] else "", reservation.credits, final]
        args.append(tokens if figures.tpm is not None else 0)
        try:
            self._refund(keys=counters.refund_keys, args=args)
        except redis.exceptions.RedisError:
            # The ledger already says what is owed; drop the credit counters so the next reservation
            # rebuilds them from it, rather than leave the refund lost for the rest of the period.
            log.warning("refund of reservation %d to Redis failed; dropping its counters", reservation.ledger_id)
            self._drop_counters(reservation, quietly=False)
