"""The credit ledger: reserve before the engine runs, settle after, release on failure.

Exactness comes from the database, not from this process: a reservation is one conditional
``UPDATE usage_counters SET used = used + :n WHERE ... AND used + :n <= :limit`` whose returned row
tells whether it fitted, so concurrent requests from any key, thread or replica can never oversell.
The ledger row is written in the same transaction, and settlement is guarded by the row's status,
so nothing is charged twice.

The functions on the request path (reserve, settle, release) take a SQLAlchemy Core ``Connection`` and
run statements built once, at import: on this path an ORM session and statements built per call cost
several times the database round trips themselves.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    CTE,
    CompoundSelect,
    Connection,
    Select,
    Update,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from aimichat.keys.service import LAST_USED_RESOLUTION, KeyLimits, Principal, touch_last_used, use_by_key
from aimichat.store.models import ApiKey, KeyCounter, UsageCounter, UsageEvent

from . import key_windows, periods
from .pricing import Cost

_MAX_ATTEMPTS = 8

Period = Literal["day", "month", "key_day", "key_month", "rpm", "tpm"]
Scope = Literal["account", "key"]


@dataclass(frozen=True)
class Window:
    """A per-minute rate limit's figures (OpenAI's ``x-ratelimit-*-requests`` / ``-tokens`` headers)."""

    limit: int
    remaining: int
    reset_at: dt.datetime
    reset_seconds: int  # from the moment the figures were read (OpenAI sends "17s")


@dataclass(frozen=True)
class RateLimit:
    """The figures of the ``X-RateLimit-*`` headers: the allotment that will refuse first (the account's
    day, or the key's cap when that is tighter: ``scope``), what is left of it, when it resets; and the
    key's per-minute windows, when it has rate limits."""

    limit: int
    remaining: int
    reset_at: dt.datetime
    scope: Scope = "account"
    requests: Window | None = None
    tokens: Window | None = None


@dataclass(frozen=True)
class KeyFigures:
    """Where a key's own counters stand after a reservation (None: it has no such limit)."""

    day_used: int | None = None
    daily_cap: int | None = None
    month_used: int | None = None
    monthly_cap: int | None = None
    minute: dt.datetime | None = None  # the window of the per-minute counters below
    at: dt.datetime | None = None  # when they were read
    requests_used: int | None = None
    rpm: int | None = None
    tokens_used: int | None = None
    tpm: int | None = None


def key_figures(
    limits: KeyLimits,
    now: dt.datetime,
    *,
    day: int | None = None,
    month: int | None = None,
    requests: int | None = None,
    tokens: int | None = None,
) -> KeyFigures:
    """A key's figures at ``now`` from what its counters hold; a count is kept only where it has that limit."""

    def kept(used: int | None, limit: int | None) -> int | None:
        return used if limit is not None else None

    return KeyFigures(
        day_used=kept(day, limits.daily_cap),
        daily_cap=limits.daily_cap,
        month_used=kept(month, limits.monthly_cap),
        monthly_cap=limits.monthly_cap,
        minute=periods.minute_start(now),
        at=now,
        requests_used=kept(requests, limits.rpm),
        rpm=limits.rpm,
        tokens_used=kept(tokens, limits.tpm),
        tpm=limits.tpm,
    )


NO_KEY_FIGURES = KeyFigures()


@dataclass(frozen=True)
class Reservation:
    ledger_id: int
    request_id: str
    account_id: int
    credits: int
    day: dt.date
    month: dt.date | None  # None when the tier has no monthly limit
    day_used: int  # after this reservation
    daily_limit: int
    reset_at: dt.datetime
    key_id: int | None = None
    key: KeyFigures = NO_KEY_FIGURES
    tokens: int = 0  # counted against the key's tokens-per-minute window (0 when it has none)
    # Redis only: the generation of each credit counter (account day, month, key day, month) it was taken in.
    generations: tuple[str, ...] = ()

    @property
    def remaining(self) -> int:
        return max(0, self.daily_limit - self.day_used)

    def rate_limit(self, refunded: int = 0, tokens_refunded: int = 0) -> RateLimit:
        """Where things stand with this reservation taken, less what settlement gave back."""
        return _rate_limit(
            self.daily_limit, self.remaining + refunded, self.reset_at, self.key, self.day, refunded, tokens_refunded
        )


def _rate_limit(
    daily_limit: int,
    remaining: int,
    reset_at: dt.datetime,
    key: KeyFigures,
    day: dt.date,
    refunded: int = 0,
    tokens_refunded: int = 0,
) -> RateLimit:
    limit = daily_limit
    scope: Scope = "account"
    caps = [
        (key.daily_cap, key.day_used, reset_at),
        (key.monthly_cap, key.month_used, periods.next_month_reset(periods.as_datetime(day))),
    ]
    for cap, used, resets in caps:
        if cap is not None and used is not None and cap - used + refunded < remaining:
            limit, remaining, reset_at, scope = cap, max(0, cap - used + refunded), resets, "key"
    requests = tokens = None
    if key.minute is not None:
        resets = key.minute + dt.timedelta(minutes=1)
        seconds = periods.seconds_until(resets, key.at or key.minute)
        if key.rpm is not None and key.requests_used is not None:
            requests = Window(key.rpm, max(0, key.rpm - key.requests_used), resets, seconds)
        if key.tpm is not None and key.tokens_used is not None:
            tokens = Window(key.tpm, max(0, key.tpm - key.tokens_used + tokens_refunded), resets, seconds)
    return RateLimit(limit, remaining, reset_at, scope, requests, tokens)


_MESSAGES: dict[str, str] = {
    "day": "Daily credit limit reached",
    "month": "Monthly credit limit reached",
    "key_day": "Key daily credit limit reached",
    "key_month": "Key monthly credit limit reached",
}


@dataclass(frozen=True)
class Refusal:
    """Credits are spent (the account's or the key's cap) or the key's rate limit is reached: everything
    the spec's 429 body and ``Retry-After`` need."""

    period: Period  # what refused (the account's day when several would)
    message: str
    limit: int
    used: int
    reset_at: dt.datetime
    retry_after: int
    daily_limit: int
    day_used: int
    daily_reset_at: dt.datetime

    @property
    def scope(self) -> Scope:
        return "account" if self.period in ("day", "month") else "key"

    @property
    def rate_limit(self) -> RateLimit:
        """The figures of what refused when it is a daily allotment or a key's cap; the account's day otherwise."""
        if self.period in ("key_day", "key_month"):
            return RateLimit(self.limit, max(0, self.limit - self.used), self.reset_at, "key")
        remaining = 0 if self.period == "day" else max(0, self.daily_limit - self.day_used)
        requests = tokens = None
        if self.period == "rpm":
            requests = Window(self.limit, 0, self.reset_at, self.retry_after)
        elif self.period == "tpm":
            tokens = Window(self.limit, max(0, self.limit - self.used), self.reset_at, self.retry_after)
        return RateLimit(self.daily_limit, remaining, self.daily_reset_at, "account", requests, tokens)


# -- reserve -------------------------------------------------------------------------------------


# Bound parameter names must differ from the column names in an UPDATE (SQLAlchemy reserves those).
_COUNTER = (
    (UsageCounter.account_id == bindparam("p_account"))
    & (UsageCounter.period == bindparam("p_period"))
    & (UsageCounter.period_start == bindparam("p_start"))
)
_ADD = (
    update(UsageCounter)
    .where(_COUNTER, UsageCounter.used + bindparam("p_amount") <= bindparam("p_limit"))
    .values(used=UsageCounter.used + bindparam("p_amount"))
    .returning(UsageCounter.used)
)
_SUBTRACT = update(UsageCounter).where(_COUNTER).values(used=UsageCounter.used - bindparam("p_amount"))
_USED = select(UsageCounter.used).where(_COUNTER)


def _counter(account_id: int, period: str, start: dt.date, **more: int | str) -> dict[str, object]:
    return {"p_account": account_id, "p_period": period, "p_start": start, **more}


KEY_KINDS = ("rpm", "tpm", "day", "month")  # the order every path takes a key's counters in (rows lock in it)


def _key_take(kind: str) -> Update:
    """The conditional UPDATE of one of the key's counters, with its own parameter names."""
    window = bindparam(f"p_w_{kind}", type_=KeyCounter.__table__.c.window_start.type)
    current = KeyCounter.window_start >= window
    used_now = case((current, KeyCounter.used), else_=0)
    amount = bindparam(f"p_n_{kind}", type_=KeyCounter.__table__.c.used.type)
    return (
        update(KeyCounter)
        .where(
            KeyCounter.key_id == bindparam("p_key"),
            KeyCounter.kind == literal(kind),
            used_now + amount <= bindparam(f"p_l_{kind}", type_=KeyCounter.__table__.c.used.type),
        )
        .values(used=used_now + amount, window_start=case((current, KeyCounter.window_start), else_=window))
        .returning(KeyCounter.used)
    )


def _reserve_one_statement(kinds: tuple[str, ...] = ()) -> Select[Any]:
    """PostgreSQL's common case as one statement (see :func:`reserve_in_one_statement`): the key's
    counters of ``kinds`` in a chain (each updates only if the one before did), then the account's day,
    the ledger row and the key's last use. With key counters, a link that does not fit would leave the
    ones before it taken: the last column then divides by zero, which aborts the whole statement (so
    nothing is taken) and sends the caller to the full transaction."""
    previous: CTE | None = None
    steps: dict[str, CTE] = {}
    for kind in kinds:
        statement = _key_take(kind)
        if previous is not None:
            statement = statement.where(exists(select(previous.c.used)))
        previous = steps[kind] = statement.cte(f"key_{kind}")
    add = _ADD if previous is None else _ADD.where(exists(select(previous.c.used)))
    day = add.cte("day")
    taken = exists(select(day.c.used))
    t = UsageEvent.__table__.c
    values = {  # typed: PostgreSQL cannot infer the type of a bare parameter in a SELECT list
        "request_id": bindparam("p_request", type_=t.request_id.type),
        "model": bindparam("p_model", type_=t.model.type),
        "account_id": bindparam("p_account", type_=t.account_id.type),
        "api_key_id": bindparam("p_key", type_=t.api_key_id.type),
        "created_at": bindparam("p_now", type_=t.created_at.type),
        "day": bindparam("p_day", type_=t.day.type),
        "reserved_credits": bindparam("p_amount", type_=t.reserved_credits.type),
        "credits": bindparam("p_amount", type_=t.credits.type),
        "prompt_tokens": bindparam("p_prompt", type_=t.prompt_tokens.type),
        "completion_tokens": literal(0, t.completion_tokens.type),
        "status": literal("reserved", t.status.type),
        "estimated": literal(False, t.estimated.type),
        "settled_at": cast(null(), t.settled_at.type),
        "tokens_reserved": bindparam("p_tokens", type_=t.tokens_reserved.type),
    }
    recorded = (
        insert(UsageEvent)
        .from_select(list(values), select(*values.values()).where(taken))
        .returning(UsageEvent.id)
        .cte("recorded")
    )
    touched = (
        update(ApiKey)
        .where(
            ApiKey.id == bindparam("p_key"),
            taken,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < bindparam("p_stale")),
        )
        .values(last_used_at=bindparam("p_now"))
        .returning(ApiKey.id)
        .cte("touched")
    )
    if not kinds:
        return select(day.c.used, recorded.c.id).join_from(day, recorded, true()).add_cte(touched)
    columns = [
        select(day.c.used).scalar_subquery().label("used"),
        select(recorded.c.id).scalar_subquery().label("id"),
        *(select(cte.c.used).scalar_subquery().label(kind) for kind, cte in steps.items()),
        (literal(1) / select(func.count()).select_from(recorded).scalar_subquery()).label("all_taken"),
    ]
    return select(*columns).add_cte(touched)


@functools.cache
def _reserve_keyed_statement(kinds: tuple[str, ...]) -> Select[Any]:
    return _reserve_one_statement(kinds)


_RESERVE_ONE = _reserve_one_statement()


def reserve(
    conn: Connection,
    principal: Principal,
    cost: Cost,
    *,
    request_id: str,
    now: dt.datetime,
    model: str | None = None,
    tokens: int = 0,
) -> Reservation | Refusal:
    """Atomically take credits from the account's day (and month) allotment and from the key's own caps
    and per-minute windows, all or none, or say what refused. ``model`` is the public name the request
    asked for, recorded in the ledger; ``tokens`` (prompt + max_tokens) count against the key's TPM."""
    refused: Period | None = None
    for _ in range(_MAX_ATTEMPTS):
        try:
            outcome = _try_reserve(conn, principal, cost, request_id, now, model, tokens)
        except BaseException:
            conn.rollback()
            raise
        if not isinstance(outcome, str):
            return outcome
        refused = outcome
        if refused in ("rpm", "tpm") or cost.minimum >= cost.want:
            break
    return refusal(conn, principal, cost, now, refused or "day", tokens)


def reserve_in_one_statement(
    conn: Connection,
    principal: Principal,
    cost: Cost,
    *,
    request_id: str,
    now: dt.datetime,
    model: str | None = None,
    tokens: int = 0,
) -> Reservation | None:
    """PostgreSQL's common case in one round trip, for a connection in autocommit: the whole cost fits
    the day's existing counter of a tier without a monthly limit (and the key's own counters, when it
    has limits). The conditional UPDATEs, the ledger row and the key's last use are one statement, so
    one atomic transaction. None when that case does not apply (no counter yet, not enough left, a
    race): :func:`reserve` then decides, in full.
    """
    if conn.dialect.name != "postgresql" or principal.monthly_credits is not None:
        return None
    day = periods.day_start(now)
    params: dict[str, object] = {
        **_counter(principal.account_id, "day", day, p_amount=cost.want, p_limit=principal.daily_credits),
        "p_request": request_id,
        "p_model": model,
        "p_key": principal.key_id,
        "p_now": now,
        "p_day": day,
        "p_stale": now - LAST_USED_RESOLUTION,
        "p_tokens": 0,
        "p_prompt": cost.prompt_tokens,
    }
    if not principal.has_key_limits:
        row = conn.execute(_RESERVE_ONE, params).first()
        if row is None:
            return None
        return reservation_of(principal, row.id, cost.want, request_id, now, day_used=row.used)
    return _reserve_keyed(conn, principal, cost, params, now, tokens)


def _reserve_keyed(
    conn: Connection, principal: Principal, cost: Cost, params: dict[str, object], now: dt.datetime, tokens: int
) -> Reservation | None:
    """The one-statement case for a key with limits of its own (see :func:`_reserve_one_statement`)."""
    limits = principal.limits
    caps = {"rpm": limits.rpm, "tpm": limits.tpm, "day": limits.daily_cap, "month": limits.monthly_cap}
    kinds = tuple(kind for kind in KEY_KINDS if caps[kind] is not None)
    minute = periods.minute_start(now)
    windows = {"rpm": minute, "tpm": minute, "day": _day(now), "month": _month(now)}
    amounts = {"rpm": 1, "tpm": tokens, "day": cost.want, "month": cost.want}
    for kind in kinds:
        params |= {f"p_w_{kind}": windows[kind], f"p_n_{kind}": amounts[kind], f"p_l_{kind}": caps[kind]}
    params["p_tokens"] = tokens if limits.tpm is not None else 0
    try:
        row = conn.execute(_reserve_keyed_statement(kinds), params).mappings().first()
    except DataError:  # a counter did not fit (or has no row yet): the statement took nothing
        return None
    if row is None or row["id"] is None:
        return None
    figures = key_figures(
        limits, now, day=row.get("day"), month=row.get("month"), requests=row.get("rpm"), tokens=row.get("tpm")
    )
    return reservation_of(
        principal, row["id"], cost.want, str(params["p_request"]), now, day_used=row["used"], key=figures,
        tokens=int(params["p_tokens"]),  # type: ignore[call-overload]
    )  # fmt: skip


def _try_reserve(
    conn: Connection,
    principal: Principal,
    cost: Cost,
    request_id: str,
    now: dt.datetime,
    model: str | None,
    tokens: int,
) -> Reservation | Period:
    """One attempt: the reservation, or what refused (after a race on a flexible cost: try again)."""
    flexible = cost.minimum < cost.want
    # The common case is one statement per counter: the whole cost fits.
    amount = cost.want
    taken = _take_all(conn, principal, now, amount, tokens)
    if isinstance(taken, str) and flexible and taken not in ("rpm", "tpm"):
        conn.rollback()  # undo counters that took it when a later one would not
        amount = _affordable(conn, principal, now, cost)
        if not amount:
            return taken
        taken = _take_all(conn, principal, now, amount, tokens)
    if isinstance(taken, str):
        conn.rollback()
        return taken
    day_used, key = taken
    reservation = record_reservation(
        conn,
        principal,
        amount,
        request_id=request_id,
        now=now,
        day_used=day_used,
        model=model,
        key=key,
        tokens=tokens,
        prompt_tokens=cost.prompt_tokens,
    )
    conn.commit()
    return reservation


def _take_all(
    conn: Connection, principal: Principal, now: dt.datetime, amount: int, tokens: int
) -> tuple[int, KeyFigures] | Period:
    """Take ``amount`` credits from the account's day and month and the key's caps, one request and
    ``tokens`` from the key's minute; the day's new total and the key's figures, or what did not fit
    (the caller rolls back)."""
    limits = principal.limits
    key_id = principal.key_id if principal.has_key_limits else None
    minute = periods.minute_start(now)
    requests_used = tokens_used = None
    if key_id is not None and limits.rpm is not None:
        requests_used = key_windows.take(conn, key_id, "rpm", minute, 1, limits.rpm)
        if requests_used is None:
            return "rpm"
    if key_id is not None and limits.tpm is not None:
        tokens_used = key_windows.take(conn, key_id, "tpm", minute, tokens, limits.tpm)
        if tokens_used is None:
            return "tpm"
    # The key's own caps before the account's allotments: a key at its cap hears that, not the account's.
    key_day_used = key_month_used = None
    if key_id is not None and limits.daily_cap is not None:
        key_day_used = key_windows.take(conn, key_id, "day", _day(now), amount, limits.daily_cap)
        if key_day_used is None:
            return "key_day"
    if key_id is not None and limits.monthly_cap is not None:
        key_month_used = key_windows.take(conn, key_id, "month", _month(now), amount, limits.monthly_cap)
        if key_month_used is None:
            return "key_month"
    day_used = _take(conn, principal.account_id, "day", periods.day_start(now), amount, principal.daily_credits)
    if day_used is None:
        return "day"
    if principal.monthly_credits is not None:
        month = periods.month_start(now)
        if _take(conn, principal.account_id, "month", month, amount, principal.monthly_credits) is None:
            return "month"
    if key_id is None:
        return day_used, NO_KEY_FIGURES
    figures = key_figures(
        limits, now, day=key_day_used, month=key_month_used, requests=requests_used, tokens=tokens_used
    )
    return day_used, figures


def _day(now: dt.datetime) -> dt.datetime:
    return periods.as_datetime(periods.day_start(now))


def _month(now: dt.datetime) -> dt.datetime:
    return periods.as_datetime(periods.month_start(now))


_RECORD = insert(UsageEvent).returning(UsageEvent.id)


def record_reservation(
    conn: Connection,
    principal: Principal,
    amount: int,
    *,
    request_id: str,
    now: dt.datetime,
    day_used: int,
    model: str | None = None,
    key: KeyFigures = NO_KEY_FIGURES,
    tokens: int = 0,
    prompt_tokens: int = 0,
) -> Reservation:
    """Write the ledger row of a granted reservation (the caller commits)."""
    counted_tokens = tokens if key.tpm is not None else 0
    ledger_id = insert_reservation(
        conn,
        principal,
        amount,
        request_id=request_id,
        now=now,
        model=model,
        tokens=counted_tokens,
        prompt_tokens=prompt_tokens,
    )
    return reservation_of(
        principal, ledger_id, amount, request_id, now, day_used=day_used, key=key, tokens=counted_tokens
    )


def insert_reservation(
    conn: Connection,
    principal: Principal,
    amount: int,
    *,
    request_id: str,
    now: dt.datetime,
    model: str | None = None,
    tokens: int = 0,
    prompt_tokens: int = 0,
) -> int:
    """Write a reservation's ledger row (``status='reserved'``, ``amount`` credits counted) and the key's
    last use; its id. ``tokens``: what it counts against the key's minute; ``prompt_tokens``: the prompt it
    was reserved for (the row's token counts are overwritten at settlement). The caller commits."""
    row = dict(
        request_id=request_id,
        model=model,
        account_id=principal.account_id,
        api_key_id=principal.key_id,
        created_at=now,
        day=periods.day_start(now),
        reserved_credits=amount,
        credits=amount,
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        status="reserved",
        estimated=False,
        settled_at=None,
        tokens_reserved=tokens,
    )
    ledger_id = int(conn.execute(_RECORD, row).scalar_one())
    touch_last_used(conn, principal, now)
    return ledger_id


_OPEN_ROW = (UsageEvent.id == bindparam("p_id")) & (UsageEvent.status == "reserved")
_RESIZE = (
    update(UsageEvent).where(_OPEN_ROW).values(reserved_credits=bindparam("p_amount"), credits=bindparam("p_amount"))
)
_DELETE = delete(UsageEvent).where(_OPEN_ROW)


def resize_reservation(conn: Connection, ledger_id: int, amount: int) -> None:
    """Count ``amount`` credits on a reservation's row that is still open (the caller commits)."""
    conn.execute(_RESIZE, {"p_id": ledger_id, "p_amount": amount})


def delete_reservation(conn: Connection, ledger_id: int) -> None:
    """Remove the row of a reservation that was refused after all (the caller commits)."""
    conn.execute(_DELETE, {"p_id": ledger_id})


@dataclass(frozen=True)
class Held:
    """What a Redis counter is rebuilt from: the credits the ledger counts for an account (or a key) over
    a range of days, and the ``(id, credits)`` of its rows still ``reserved``."""

    total: int
    open_rows: list[tuple[int, int]]


@functools.cache
def _held_statement(by_key: tuple[bool, ...]) -> CompoundSelect[Any]:
    """Sums and open rows of several (owner, days) at once: one statement, so one snapshot (a sum and its
    open rows always agree) and one round trip. Rows are tagged with their owner's place in ``by_key``."""
    parts: list[Select[Any]] = []
    for n, key in enumerate(by_key):
        owner = UsageEvent.api_key_id if key else UsageEvent.account_id
        where = (
            owner == bindparam(f"p_owner_{n}"),
            UsageEvent.day >= bindparam(f"p_first_{n}"),
            UsageEvent.day <= bindparam(f"p_last_{n}"),
        )
        tag = literal(n, UsageEvent.__table__.c.credits.type).label("tag")
        no_id = cast(null(), UsageEvent.__table__.c.id.type).label("id")
        parts.append(select(tag, no_id, func.coalesce(func.sum(UsageEvent.credits), 0)).where(*where))
        parts.append(select(tag, UsageEvent.id, UsageEvent.credits).where(*where, UsageEvent.status == "reserved"))
    return union_all(*parts)


def held_credits(conn: Connection, owners: list[tuple[int, bool, dt.date, dt.date]]) -> list[Held]:
    """For each ``(owner, by_key, first_day, last_day)``: what the ledger counts for the account (or, by
    key, the key) over those days and its reservations not settled yet, all read in one statement."""
    params: dict[str, object] = {}
    for n, (owner, _, first_day, last_day) in enumerate(owners):
        params |= {f"p_owner_{n}": owner, f"p_first_{n}": first_day, f"p_last_{n}": last_day}
    held = [Held(0, []) for _ in owners]
    statement = _held_statement(tuple(by_key for _, by_key, _, _ in owners))
    for tag, ledger_id, credits in conn.execute(statement, params):
        if ledger_id is None:
            held[int(tag)] = Held(int(credits), held[int(tag)].open_rows)
        else:
            held[int(tag)].open_rows.append((int(ledger_id), int(credits)))
    return held


def reservation_of(
    principal: Principal,
    ledger_id: int,
    amount: int,
    request_id: str,
    now: dt.datetime,
    *,
    day_used: int,
    key: KeyFigures = NO_KEY_FIGURES,
    tokens: int = 0,
    generations: tuple[str, ...] = (),
) -> Reservation:
    """The :class:`Reservation` of ``principal``'s row ``ledger_id`` (``amount`` credits), made at ``now``."""
    return Reservation(
        ledger_id=ledger_id,
        request_id=request_id,
        account_id=principal.account_id,
        credits=amount,
        day=periods.day_start(now),
        month=periods.month_start(now) if principal.monthly_credits is not None else None,
        day_used=day_used,
        daily_limit=principal.daily_credits,
        reset_at=periods.next_day_reset(now),
        key_id=principal.key_id if principal.has_key_limits else None,
        key=key,
        tokens=tokens,
        generations=generations,
    )


def _take(conn: Connection, account_id: int, period: str, start: dt.date, amount: int, limit: int) -> int | None:
    """Add ``amount`` if it fits under ``limit``; the new total, or None if it does not fit."""
    used = _add(conn, account_id, period, start, amount, limit)
    if used is None:
        # Maybe the period's first request: create the row (a no-op if a concurrent request just
        # did, in which case PostgreSQL waits for it to commit) and try again against what is there.
        _create_counter(conn, account_id, period, start)
        used = _add(conn, account_id, period, start, amount, limit)
    return used


def _add(conn: Connection, account_id: int, period: str, start: dt.date, amount: int, limit: int) -> int | None:
    return conn.execute(_ADD, _counter(account_id, period, start, p_amount=amount, p_limit=limit)).scalar()


def _create_counter(conn: Connection, account_id: int, period: str, start: dt.date) -> None:
    """Create the period's counter if missing (race-safe)."""
    upsert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(
        upsert(UsageCounter)
        .values(account_id=account_id, period=period, period_start=start, used=0)
        .on_conflict_do_nothing()
    )


def _affordable(conn: Connection, principal: Principal, now: dt.datetime, cost: Cost) -> int:
    """What is left across the account's allotments and the key's caps, if at least ``cost.minimum``."""
    left = principal.daily_credits - _used(conn, principal.account_id, "day", periods.day_start(now))
    if principal.monthly_credits is not None:
        month = periods.month_start(now)
        left = min(left, principal.monthly_credits - _used(conn, principal.account_id, "month", month))
    limits, key_id = principal.limits, principal.key_id
    if key_id is not None and limits.daily_cap is not None:
        left = min(left, limits.daily_cap - key_windows.used(conn, key_id, "day", _day(now)))
    if key_id is not None and limits.monthly_cap is not None:
        left = min(left, limits.monthly_cap - key_windows.used(conn, key_id, "month", _month(now)))
    return min(cost.want, left) if left >= cost.minimum else 0


def _used(conn: Connection, account_id: int, period: str, start: dt.date) -> int:
    return conn.execute(_USED, _counter(account_id, period, start)).scalar() or 0


def refusal(
    conn: Connection, principal: Principal, cost: Cost, now: dt.datetime, refused: Period = "day", tokens: int = 0
) -> Refusal:
    """Read the counters and say what refused, with its figures."""
    try:
        day_used = _used(conn, principal.account_id, "day", periods.day_start(now))
        month_used = _used(conn, principal.account_id, "month", periods.month_start(now))
        key_used = 0
        if principal.key_id is not None and refused not in ("day", "month"):
            window = {"key_day": _day(now), "key_month": _month(now)}.get(refused, periods.minute_start(now))
            kind = {"key_day": "day", "key_month": "month"}.get(refused, refused)
            key_used = key_windows.used(conn, principal.key_id, kind, window)
    finally:
        conn.rollback()
    if refused in ("day", "month"):
        return refusal_from(principal, cost, now, day_used, month_used)
    return key_refusal(principal, refused, key_used, now, day_used)


def key_refusal(principal: Principal, refused: Period, used: int, now: dt.datetime, day_used: int) -> Refusal:
    """The key's cap or rate limit refused: its figures (any counter backend)."""
    limits = principal.limits
    if refused == "rpm":
        limit, reset = limits.rpm or 0, periods.next_minute(now)
        message = f"Rate limit reached: {limit} requests per minute"
    elif refused == "tpm":
        limit, reset = limits.tpm or 0, periods.next_minute(now)
        message = f"Rate limit reached: {limit} tokens per minute"
    elif refused == "key_month":
        limit, reset, message = limits.monthly_cap or 0, periods.next_month_reset(now), _MESSAGES[refused]
    else:
        limit, reset, message = limits.daily_cap or 0, periods.next_day_reset(now), _MESSAGES["key_day"]
    return Refusal(
        period=refused,
        message=message,
        limit=limit,
        used=used,
        reset_at=reset,
        retry_after=periods.seconds_until(reset, now),
        daily_limit=principal.daily_credits,
        day_used=day_used,
        daily_reset_at=periods.next_day_reset(now),
    )


def refusal_from(principal: Principal, cost: Cost, now: dt.datetime, day_used: int, month_used: int) -> Refusal:
    """Which allotment is spent (the daily one when both are), with its figures; any counter backend."""
    day_reset = periods.next_day_reset(now)
    day_full = day_used + cost.minimum > principal.daily_credits
    period: Period
    if principal.monthly_credits is not None and not day_full:
        period, reset = "month", periods.next_month_reset(now)
        message, limit, used = _MESSAGES["month"], principal.monthly_credits, month_used
    else:
        period, reset = "day", day_reset
        message, limit, used = _MESSAGES["day"], principal.daily_credits, day_used
    return Refusal(
        period=period,
        message=message,
        limit=limit,
        used=used,
        reset_at=reset,
        retry_after=periods.seconds_until(reset, now),
        daily_limit=principal.daily_credits,
        day_used=day_used,
        daily_reset_at=day_reset,
    )


# -- settle / release ----------------------------------------------------------------------------


_SETTLE = (
    update(UsageEvent)
    .where(UsageEvent.id == bindparam("p_id"), UsageEvent.status == "reserved")
    .values(
        credits=bindparam("p_credits"),
        prompt_tokens=bindparam("p_prompt"),
        completion_tokens=bindparam("p_completion"),
        status=bindparam("p_status"),
        estimated=bindparam("p_estimated"),
        settled_at=bindparam("p_now"),
    )
    .returning(UsageEvent.id)
)


def settle(
    conn: Connection,
    reservation: Reservation,
    *,
    credits: int,
    prompt_tokens: int,
    completion_tokens: int,
    now: dt.datetime,
    estimated: bool = False,
    status: str = "charged",
    refund_counters: bool = True,
    wait_for_flush: bool = True,
) -> bool:
    """Fix the final charge (never above the reservation) and refund the rest, to the account's and
    the key's counters (the key's tokens-per-minute too: what was reserved beyond the tokens used).
    Idempotent. ``refund_counters=False`` leaves the SQL counters alone, for a backend that keeps them
    elsewhere.

    ``wait_for_flush=False`` (PostgreSQL): the commit returns before its WAL reaches the disk
    (``synchronous_commit`` off for this transaction alone, set inside the statement: no extra round trip).
    The flush costs 0.5-3.6 ms here (``pgbench``, one-row UPDATE: 2.6-3.6 ms on, 0.06-0.11 ms off, with the
    machine busy), the largest part of a request's own cost. Only a crash of the PostgreSQL server or its
    host can lose such a commit (the last ~0.6 s of them: three ``wal_writer_delay``); the row then stays
    reserved with its credits counted, and the sweeper settles it by its rule. Nothing is ever counted as
    free: the reservation, which grants the credits, always waits for its flush."""
    credits = max(0, min(credits, reservation.credits))
    params = dict(
        p_id=reservation.ledger_id,
        p_credits=credits,
        p_prompt=prompt_tokens,
        p_completion=completion_tokens,
        p_status=status,
        p_estimated=estimated,
        p_now=now,
    )
    refund = reservation.credits - credits
    if conn.dialect.name == "postgresql":
        tokens_back = unused_tokens(reservation, prompt_tokens + completion_tokens) if refund_counters else 0
        return _settle_in_one_statement(
            conn, reservation, params, refund if refund_counters else 0, tokens_back, wait_for_flush
        )
    try:
        changed = conn.execute(_SETTLE, params).scalar() is not None
        if changed and refund and refund_counters:
            _refund(conn, reservation.account_id, "day", reservation.day, refund)
            if reservation.month is not None:
                _refund(conn, reservation.account_id, "month", reservation.month, refund)
        if changed and refund_counters and reservation.key_id is not None:
            refund_key(conn, reservation, refund, unused_tokens(reservation, prompt_tokens + completion_tokens))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return bool(changed)


def _settle_in_one_statement(
    conn: Connection,
    reservation: Reservation,
    params: dict[str, object],
    refund: int,
    tokens_back: int,
    wait_for_flush: bool = True,
) -> bool:
    """PostgreSQL: the ledger row and every refund (the account's day and month, the key's caps and its
    minute of tokens) in one statement, atomic on its own: one round trip, in autocommit or not."""
    key, key_id = reservation.key, reservation.key_id
    day = periods.as_datetime(reservation.day)
    # Rows are refunded in the order a reservation takes them (the key's minute of tokens, day and month,
    # then the account's day and month): in any other order two requests of one account, one reserving and
    # one settling, can each hold a row the other waits for, and PostgreSQL aborts one as a deadlock.
    targets: list[str] = []
    if key_id is not None:
        params["p_key"] = key_id
        if tokens_back and key.minute is not None:
            targets.append("key_tpm")
            params |= {"p_w_tpm": key.minute, "p_back_tpm": tokens_back}
        if refund and key.daily_cap is not None:
            targets.append("key_day")
            params |= {"p_w_day": day, "p_back_day": refund}
        if refund and key.monthly_cap is not None:
            targets.append("key_month")
            params |= {"p_w_month": day.replace(day=1), "p_back_month": refund}
    if refund:
        targets.append("day")
        params |= {"p_account": reservation.account_id, "p_refund": refund, "p_start_day": reservation.day}
        if reservation.month is not None:
            targets.append("month")
            params["p_start_month"] = reservation.month
    try:
        changed = bool(conn.execute(_settle_statement(tuple(targets), wait_for_flush), params).scalar())
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return changed


@functools.cache
def _settle_statement(targets: tuple[str, ...], wait_for_flush: bool = True) -> Select[Any]:
    settled = _SETTLE.cte("settled")
    done = exists(select(settled.c.id))
    refunds: list[CTE] = []
    # PostgreSQL runs the sub-statements of one WITH in no set order; each refund waiting for a count of the
    # one before it (always true, but evaluated first) makes them take their row locks in ``targets`` order.
    after: Any = done
    for target in targets:
        statement: Update
        if target in ("day", "month"):
            statement = (
                update(UsageCounter)
                .where(
                    UsageCounter.account_id == bindparam("p_account"),
                    UsageCounter.period == literal(target),
                    UsageCounter.period_start
                    == bindparam(f"p_start_{target}", type_=UsageCounter.__table__.c.period_start.type),
                )
                .values(used=UsageCounter.used - bindparam("p_refund"))
            )
        else:
            kind = target.removeprefix("key_")
            statement = (
                update(KeyCounter)
                .where(
                    KeyCounter.key_id == bindparam("p_key"),
                    KeyCounter.kind == literal(kind),
                    KeyCounter.window_start == bindparam(f"p_w_{kind}", type_=KeyCounter.__table__.c.window_start.type),
                )
                .values(used=KeyCounter.used - bindparam(f"p_back_{kind}"))
            )
        refund = statement.where(after).returning(literal(1).label("one")).cte(f"refund_{target}")
        refunds.append(refund)
        after = and_(done, select(func.count()).select_from(refund).scalar_subquery() >= 0)
    query = select(func.count()).select_from(settled)
    if not wait_for_flush:  # SET LOCAL, as a function: it holds until this statement's transaction commits
        query = query.add_columns(func.set_config("synchronous_commit", "off", True))
    for cte in refunds:
        query = query.add_cte(cte)
    return query


def release(conn: Connection, reservation: Reservation, *, now: dt.datetime, refund_counters: bool = True) -> bool:
    """The engine produced nothing: give every reserved credit back."""
    return settle(
        conn,
        reservation,
        credits=0,
        prompt_tokens=0,
        completion_tokens=0,
        now=now,
        status="released",
        refund_counters=refund_counters,
    )


def _refund(conn: Connection, account_id: int, period: str, start: dt.date, amount: int) -> None:
    conn.execute(_SUBTRACT, _counter(account_id, period, start, p_amount=amount))


def unused_tokens(reservation: Reservation, used: int) -> int:
    """Tokens counted against the key's minute beyond what the request used (0 without a TPM limit)."""
    return max(0, reservation.tokens - used) if reservation.tokens else 0


def refund_key(conn: Connection, reservation: Reservation, credits: int, tokens: int) -> None:
    """Give back to the key's own counters (in the windows the reservation was made in)."""
    key, key_id = reservation.key, reservation.key_id
    if key_id is None:
        return
    day = periods.as_datetime(reservation.day)
    if credits and key.daily_cap is not None:
        key_windows.give_back(conn, key_id, "day", day, credits)
    if credits and key.monthly_cap is not None:
        key_windows.give_back(conn, key_id, "month", day.replace(day=1), credits)
    if tokens and key.minute is not None:
        key_windows.give_back(conn, key_id, "tpm", key.minute, tokens)


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageSummary:
    day_used: int
    daily_limit: int
    day_reset: dt.datetime
    month_used: int
    monthly_limit: int | None
    month_reset: dt.datetime
    per_key_today: list[dict[str, Any]]
    per_model_today: list[dict[str, Any]]

    @property
    def rate_limit(self) -> RateLimit:
        return RateLimit(self.daily_limit, max(0, self.daily_limit - self.day_used), self.day_reset)


def summary(session: Session, principal: Principal, now: dt.datetime) -> UsageSummary:
    day, month = periods.day_start(now), periods.month_start(now)
    return UsageSummary(
        day_used=ledger_sum(session, principal.account_id, day, day),
        daily_limit=principal.daily_credits,
        day_reset=periods.next_day_reset(now),
        month_used=ledger_sum(session, principal.account_id, month, day),
        monthly_limit=principal.monthly_credits,
        month_reset=periods.next_month_reset(now),
        per_key_today=[
            {"id": use.id, "name": use.name, "prefix": use.prefix, "credits": use.credits, "requests": use.requests}
            for use in use_by_key(session, principal.account_id, day)
        ],
        per_model_today=use_by_model(session, principal.account_id, day, day),
    )


LEGACY_MODEL = "aimichat-1"  # ledger rows written before the registry existed name no model: it was this one


def use_by_model(session: Session, account_id: int, first_day: dt.date, last_day: dt.date) -> list[dict[str, Any]]:
    """Requests, credits and tokens of an account by model over a range of days, most credits first."""
    model = func.coalesce(UsageEvent.model, LEGACY_MODEL)
    rows = session.execute(
        select(
            model,
            func.count(UsageEvent.id),
            func.coalesce(func.sum(UsageEvent.credits), 0),
            func.coalesce(func.sum(UsageEvent.prompt_tokens), 0),
            func.coalesce(func.sum(UsageEvent.completion_tokens), 0),
        )
        .where(UsageEvent.account_id == account_id, UsageEvent.day >= first_day, UsageEvent.day <= last_day)
        .group_by(model)
    ).all()
    result = [
        {
            "model": name,
            "requests": int(requests),
            "credits": int(credits),
            "prompt_tokens": int(prompt),
            "completion_tokens": int(completion),
        }
        for name, requests, credits, prompt, completion in rows
    ]
    return sorted(result, key=lambda item: (-item["credits"], item["model"]))


def key_ledger_sum(session: Session, key_id: int, first_day: dt.date, last_day: dt.date) -> int:
    """Credits counted in the ledger for one key over a range of days (what its caps are checked against)."""
    total = session.scalar(
        select(func.coalesce(func.sum(UsageEvent.credits), 0)).where(
            UsageEvent.api_key_id == key_id, UsageEvent.day >= first_day, UsageEvent.day <= last_day
        )
    )
    return int(total or 0)


def ledger_sum(session: Session, account_id: int, first_day: dt.date, last_day: dt.date) -> int:
    """Credits counted in the ledger (the truth) for an account over a range of days."""
    total = session.scalar(
        select(func.coalesce(func.sum(UsageEvent.credits), 0)).where(
            UsageEvent.account_id == account_id, UsageEvent.day >= first_day, UsageEvent.day <= last_day
        )
    )
    return int(total or 0)
