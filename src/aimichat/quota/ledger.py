"""The credit ledger: reserve before the engine runs, settle after, release on failure.

Exactness comes from the database, not from this process: a reservation is one conditional
``UPDATE usage_counters SET used = used + :n WHERE ... AND used + :n <= :limit`` whose returned row
tells whether it fitted, so concurrent requests from any key, thread or replica can never oversell.
The ledger row is written in the same transaction, and settlement is guarded by the row's status,
so nothing is charged twice.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from aimichat.keys.service import Principal, touch_last_used
from aimichat.store.models import ApiKey, UsageCounter, UsageEvent

from . import periods

_MAX_ATTEMPTS = 8


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

    @property
    def remaining(self) -> int:
        return max(0, self.daily_limit - self.day_used)


@dataclass(frozen=True)
class Refusal:
    """Credits are spent: everything the spec's 429 body and ``Retry-After`` need."""

    message: str
    limit: int
    used: int
    reset_at: dt.datetime
    retry_after: int
    daily_limit: int
    day_used: int
    daily_reset_at: dt.datetime


@dataclass(frozen=True)
class Cost:
    """What to reserve: ``want`` if it fits, else as much as is left down to ``minimum``."""

    want: int
    minimum: int


def request_cost(principal: Principal, prompt_tokens: int, max_tokens: int) -> Cost:
    if principal.cost_rule == "per_token":
        return Cost(
            want=token_credits(principal, prompt_tokens + max_tokens),
            minimum=token_credits(principal, prompt_tokens + 1),
        )
    return Cost(1, 1)


def token_credits(principal: Principal, tokens: int) -> int:
    return math.ceil(tokens * principal.credits_per_1k_tokens / 1000)


def affordable_tokens(principal: Principal, credits: int) -> int:
    """How many tokens (prompt + completion) ``credits`` pay for under the per-token rule."""
    return credits * 1000 // principal.credits_per_1k_tokens


def final_charge(principal: Principal, reservation: Reservation, prompt_tokens: int, completion_tokens: int) -> int:
    if principal.cost_rule == "per_token":
        return min(reservation.credits, token_credits(principal, prompt_tokens + completion_tokens))
    return reservation.credits


# -- reserve -------------------------------------------------------------------------------------


def reserve(
    db: Session, principal: Principal, cost: Cost, *, request_id: str, now: dt.datetime
) -> Reservation | Refusal:
    """Atomically take credits from the account's day (and month) allotment, or say why not."""
    for _ in range(_MAX_ATTEMPTS):
        try:
            outcome = _try_reserve(db, principal, cost, request_id, now)
        except BaseException:
            db.rollback()
            raise
        if outcome is not _RACED:
            return outcome
    return refusal(db, principal, cost, now)


_RACED = object()  # another request took credits between our read and our update: try again


def _try_reserve(db: Session, principal: Principal, cost: Cost, request_id: str, now: dt.datetime):
    flexible = cost.minimum < cost.want
    # The common case is one statement per counter: the whole cost fits.
    amount = cost.want
    day_used = _take_all(db, principal, now, amount)
    if day_used is None and flexible:
        db.rollback()  # undo a day counter that took it when the month would not
        amount = _affordable(db, principal, periods.day_start(now), periods.month_start(now), cost)
        if amount:
            day_used = _take_all(db, principal, now, amount)
    if day_used is None:
        db.rollback()
        return _RACED if flexible and amount else refusal(db, principal, cost, now)
    reservation = record_reservation(db, principal, amount, request_id=request_id, now=now, day_used=day_used)
    db.commit()
    return reservation


def _take_all(db: Session, principal: Principal, now: dt.datetime, amount: int) -> int | None:
    """Take ``amount`` from the day and, if the tier has one, the month; the day's new total, or None
    if either does not fit (the caller rolls back)."""
    day_used = _take(db, principal.account_id, "day", periods.day_start(now), amount, principal.daily_credits)
    if day_used is None or principal.monthly_credits is None:
        return day_used
    if _take(db, principal.account_id, "month", periods.month_start(now), amount, principal.monthly_credits) is None:
        return None
    return day_used


def record_reservation(
    db: Session, principal: Principal, amount: int, *, request_id: str, now: dt.datetime, day_used: int
) -> Reservation:
    """Write the ledger row of a granted reservation (the caller commits)."""
    ledger_id = db.connection().scalar(  # Core: the ORM layer costs more than the statement here
        insert(UsageEvent)
        .values(
            request_id=request_id,
            account_id=principal.account_id,
            api_key_id=principal.key_id,
            created_at=now,
            day=periods.day_start(now),
            reserved_credits=amount,
            credits=amount,
            prompt_tokens=0,
            completion_tokens=0,
            status="reserved",
            estimated=False,
        )
        .returning(UsageEvent.id)
    )
    touch_last_used(db, principal, now)
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
    )


def _take(db: Session, account_id: int, period: str, start: dt.date, amount: int, limit: int) -> int | None:
    """Add ``amount`` if it fits under ``limit``; the new total, or None if it does not fit."""
    used = _add(db, account_id, period, start, amount, limit)
    if used is None:
        # Maybe the period's first request: create the row (a no-op if a concurrent request just
        # did, in which case PostgreSQL waits for it to commit) and try again against what is there.
        _create_counter(db, account_id, period, start)
        used = _add(db, account_id, period, start, amount, limit)
    return used


def _add(db: Session, account_id: int, period: str, start: dt.date, amount: int, limit: int) -> int | None:
    return db.connection().scalar(  # Core: no ORM session synchronisation on the hot path
        update(UsageCounter)
        .where(
            UsageCounter.account_id == account_id,
            UsageCounter.period == period,
            UsageCounter.period_start == start,
            UsageCounter.used + amount <= limit,
        )
        .values(used=UsageCounter.used + amount)
        .returning(UsageCounter.used)
    )


def _create_counter(db: Session, account_id: int, period: str, start: dt.date) -> None:
    """Create the period's counter if missing (race-safe)."""
    upsert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    db.execute(
        upsert(UsageCounter).values(account_id=account_id, period=period, period_start=start, used=0).on_conflict_do_nothing()
    )


def _affordable(db: Session, principal: Principal, day: dt.date, month: dt.date, cost: Cost) -> int:
    left = principal.daily_credits - _used(db, principal.account_id, "day", day)
    if principal.monthly_credits is not None:
        left = min(left, principal.monthly_credits - _used(db, principal.account_id, "month", month))
    return min(cost.want, left) if left >= cost.minimum else 0


def _used(db: Session, account_id: int, period: str, start: dt.date) -> int:
    used = db.scalar(
        select(UsageCounter.used).where(
            UsageCounter.account_id == account_id,
            UsageCounter.period == period,
            UsageCounter.period_start == start,
        )
    )
    return used or 0


def refusal(db: Session, principal: Principal, cost: Cost, now: dt.datetime) -> Refusal:
    """Read the counters and say which allotment is spent."""
    try:
        day_used = _used(db, principal.account_id, "day", periods.day_start(now))
        month_used = _used(db, principal.account_id, "month", periods.month_start(now))
    finally:
        db.rollback()
    return refusal_from(principal, cost, now, day_used, month_used)


def refusal_from(principal: Principal, cost: Cost, now: dt.datetime, day_used: int, month_used: int) -> Refusal:
    """Which allotment is spent (the daily one when both are), with its figures; any counter backend."""
    day_reset = periods.next_day_reset(now)
    day_full = day_used + cost.minimum > principal.daily_credits
    if principal.monthly_credits is not None and not day_full:
        reset = periods.next_month_reset(now)
        message, limit, used = "Monthly credit limit reached", principal.monthly_credits, month_used
    else:
        reset = day_reset
        message, limit, used = "Daily credit limit reached", principal.daily_credits, day_used
    return Refusal(
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


def settle(
    db: Session,
    reservation: Reservation,
    *,
    credits: int,
    prompt_tokens: int,
    completion_tokens: int,
    now: dt.datetime,
    estimated: bool = False,
    status: str = "charged",
    refund_counters: bool = True,
) -> bool:
    """Fix the final charge (never above the reservation) and refund the rest. Idempotent.

    ``refund_counters=False`` leaves the SQL counters alone, for a backend that keeps them elsewhere.
    """
    credits = max(0, min(credits, reservation.credits))
    try:
        changed = db.connection().scalar(
            update(UsageEvent)
            .where(UsageEvent.id == reservation.ledger_id, UsageEvent.status == "reserved")
            .values(
                credits=credits,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                status=status,
                estimated=estimated,
                settled_at=now,
            )
            .returning(UsageEvent.id)
        ) is not None
        refund = reservation.credits - credits
        if changed and refund and refund_counters:
            _refund(db, reservation.account_id, "day", reservation.day, refund)
            if reservation.month is not None:
                _refund(db, reservation.account_id, "month", reservation.month, refund)
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return bool(changed)


def release(db: Session, reservation: Reservation, *, now: dt.datetime, refund_counters: bool = True) -> bool:
    """The engine produced nothing: give every reserved credit back."""
    return settle(db, reservation, credits=0, prompt_tokens=0, completion_tokens=0, now=now,
                  status="released", refund_counters=refund_counters)


def _refund(db: Session, account_id: int, period: str, start: dt.date, amount: int) -> None:
    db.connection().execute(
        update(UsageCounter)
        .where(
            UsageCounter.account_id == account_id,
            UsageCounter.period == period,
            UsageCounter.period_start == start,
        )
        .values(used=UsageCounter.used - amount)
    )


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageSummary:
    day_used: int
    daily_limit: int
    day_reset: dt.datetime
    month_used: int
    monthly_limit: int | None
    month_reset: dt.datetime
    per_key_today: list[dict]


def summary(db: Session, principal: Principal, now: dt.datetime) -> UsageSummary:
    day, month = periods.day_start(now), periods.month_start(now)
    per_key = db.execute(
        select(ApiKey.id, ApiKey.name, ApiKey.prefix, func.coalesce(func.sum(UsageEvent.credits), 0), func.count(UsageEvent.id))
        .join(UsageEvent, (UsageEvent.api_key_id == ApiKey.id) & (UsageEvent.day == day), isouter=True)
        .where(ApiKey.account_id == principal.account_id)
        .group_by(ApiKey.id, ApiKey.name, ApiKey.prefix)
        .order_by(ApiKey.id)
    ).all()
    return UsageSummary(
        day_used=ledger_sum(db, principal.account_id, day, day),
        daily_limit=principal.daily_credits,
        day_reset=periods.next_day_reset(now),
        month_used=ledger_sum(db, principal.account_id, month, day),
        monthly_limit=principal.monthly_credits,
        month_reset=periods.next_month_reset(now),
        per_key_today=[
            {"id": r[0], "name": r[1], "prefix": r[2], "credits": int(r[3]), "requests": int(r[4])} for r in per_key
        ],
    )


def ledger_sum(db: Session, account_id: int, first_day: dt.date, last_day: dt.date) -> int:
    """Credits counted in the ledger (the truth) for an account over a range of days."""
    total = db.scalar(
        select(func.coalesce(func.sum(UsageEvent.credits), 0)).where(
            UsageEvent.account_id == account_id, UsageEvent.day >= first_day, UsageEvent.day <= last_day
        )
    )
    return int(total or 0)
