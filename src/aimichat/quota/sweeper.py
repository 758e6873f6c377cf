"""Settle reservations that their requests never settled.

A reservation's row stays ``reserved`` when its replica dies mid-request (kill -9, a crash) or cannot
reach the database at settlement time even after retrying. Such a row keeps its credits counted, so
the caller would pay its whole reservation forever. Once a row is older than ``AIMICHAT_RESERVATION_TTL``
(900 s by default; it must exceed the longest request, or a request still running is settled under its
feet and its own settlement then changes nothing), the sweeper settles it by one rule:

    charge = min(reserved, price(prompt_tokens, completion_tokens))

at the price the account's tier pays for the row's model when swept (the tier's own cost rule where it
has no price for the model). The row's ``prompt_tokens`` is the prompt the reservation was made for
(written with the row; an upper bound where the engine only estimates it), and its ``completion_tokens``
is what the ledger knows was delivered: nothing, as completions are counted at settlement. So:

- a ``per_request`` price keeps its credit(s): the request ran, and that is its price;
- a per-token price charges the prompt, and refunds the rest of the reservation (a row written before
  prompts were recorded, with none, is charged nothing).

The rest goes back to the account's day and month and to the key's caps, on either counter backend
(:meth:`~.backends.QuotaBackend.settle_stale`); the row ends ``charged`` (``released`` when nothing is
charged) with ``estimated`` set. Each row is settled once: the settlement is the usual UPDATE guarded
by ``status = 'reserved'``, so two sweepers (or a sweeper and a late settlement) never both refund it.
On PostgreSQL a sweep also takes an advisory lock, so one replica sweeps at a time while the others skip.

Every replica runs :func:`sweep_every` from its lifespan (each minute, with the app's clock);
``aimichat reservations sweep`` runs one sweep by hand.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import bindparam, func, select, text

from aimichat.registry.catalog import make_price
from aimichat.store.clock import Clock
from aimichat.store.db import Database
from aimichat.store.models import Account, ApiKey, ModelPrice, Tier, UsageEvent

from . import ledger, periods, pricing
from .backends import QuotaBackend
from .ledger import KeyFigures, Reservation

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 60.0  # seconds between two sweeps of a replica
BATCH = 500  # rows read at a time
_LOCK = 0x61696D6973776570  # the advisory lock of sweeps on PostgreSQL ("aimiswep")

_STALE = (
    select(
        UsageEvent.id,
        UsageEvent.request_id,
        UsageEvent.account_id,
        UsageEvent.api_key_id,
        UsageEvent.day,
        UsageEvent.created_at,
        UsageEvent.model,
        UsageEvent.credits,
        UsageEvent.prompt_tokens,
        UsageEvent.completion_tokens,
        Tier.daily_credits,
        Tier.monthly_credits,
        Tier.cost_rule,
        Tier.credits_per_1k_tokens,
        ModelPrice.tier_id.label("priced"),
        ModelPrice.per_request,
        ModelPrice.prompt_per_1m,
        ModelPrice.completion_per_1m,
        ApiKey.daily_cap,
        ApiKey.monthly_cap,
    )
    .join(Account, Account.id == UsageEvent.account_id)
    .join(Tier, Tier.id == Account.tier_id)
    .outerjoin(
        ModelPrice,
        (ModelPrice.tier_id == Tier.id) & (ModelPrice.model == func.coalesce(UsageEvent.model, ledger.LEGACY_MODEL)),
    )
    .outerjoin(ApiKey, ApiKey.id == UsageEvent.api_key_id)
    .where(
        UsageEvent.status == "reserved",
        UsageEvent.created_at < bindparam("p_cutoff"),
        UsageEvent.id > bindparam("p_after"),
    )
    .order_by(UsageEvent.id)
    .limit(bindparam("p_batch"))
)


@dataclass(frozen=True)
class Swept:
    """A reservation the sweeper settled."""

    ledger_id: int
    request_id: str
    account_id: int
    key_id: int | None
    model: str | None
    created_at: dt.datetime
    reserved: int
    charged: int

    @property
    def refunded(self) -> int:
        return self.reserved - self.charged

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.ledger_id,
            "request_id": self.request_id,
            "account_id": self.account_id,
            "key_id": self.key_id,
            "model": self.model,
            "created_at": self.created_at.isoformat(),
            "reserved": self.reserved,
            "charged": self.charged,
            "refunded": self.refunded,
        }


def charge_for(row: Any) -> int:
    """What a stale reservation is charged (the rule in the module docstring)."""
    if row.priced is not None:
        price = make_price(row.per_request, row.prompt_per_1m, row.completion_per_1m)
    else:
        price = pricing.tier_price(row.cost_rule, row.credits_per_1k_tokens)
    return pricing.final_charge(price, int(row.credits), int(row.prompt_tokens), int(row.completion_tokens))


def _reservation(row: Any) -> Reservation:
    """The row as the reservation it was, enough to settle it and give back to its counters (no minute
    window: a reservation older than any TTL was made in a minute long gone)."""
    return Reservation(
        ledger_id=int(row.id),
        request_id=str(row.request_id),
        account_id=int(row.account_id),
        credits=int(row.credits),
        day=row.day,
        month=row.day.replace(day=1) if row.monthly_credits is not None else None,
        day_used=0,
        daily_limit=int(row.daily_credits),
        reset_at=periods.next_day_reset(periods.as_datetime(row.day)),
        key_id=row.api_key_id,
        key=KeyFigures(daily_cap=row.daily_cap, monthly_cap=row.monthly_cap),
    )


@contextmanager
def _one_sweeper(database: Database) -> Iterator[bool]:
    """On PostgreSQL, the sweeps' advisory lock if free (False: another replica is sweeping). SQLite
    serialises writers anyway; the settlement's guard is what settles each row once, everywhere."""
    if database.is_sqlite:
        yield True
        return
    with database.connect(single_statement=True) as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK}).scalar())
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK})


def sweep(
    database: Database, quota: QuotaBackend, now: dt.datetime, ttl: float, *, exclusive: bool = True
) -> list[Swept]:
    """Settle every reservation still open that was made more than ``ttl`` seconds before ``now``; what
    this sweep settled (rows another sweeper or a late settlement got first are left out).
    ``exclusive=False`` skips the advisory lock (the rows' guard alone then keeps it exact)."""
    cutoff = now - dt.timedelta(seconds=ttl)
    swept: list[Swept] = []
    with _one_sweeper(database) if exclusive else _no_lock() as mine:
        if not mine:
            return swept
        after = 0
        while True:
            with database.connect(single_statement=True) as conn:
                rows = conn.execute(_STALE, {"p_cutoff": cutoff, "p_after": after, "p_batch": BATCH}).all()
            for row in rows:
                charge = charge_for(row)
                settled = quota.settle_stale(
                    _reservation(row),
                    credits=charge,
                    prompt_tokens=int(row.prompt_tokens),
                    completion_tokens=int(row.completion_tokens),
                    now=now,
                )
                if settled:
                    swept.append(
                        Swept(
                            int(row.id),
                            str(row.request_id),
                            int(row.account_id),
                            row.api_key_id,
                            row.model,
                            row.created_at,
                            int(row.credits),
                            min(charge, int(row.credits)),
                        )
                    )
            if len(rows) < BATCH:
                break
            after = int(rows[-1].id)
    if swept:
        log.warning(
            "settled %d stale reservation(s) older than %ds: %d credits charged, %d refunded",
            len(swept),
            ttl,
            sum(s.charged for s in swept),
            sum(s.refunded for s in swept),
        )
    return swept


@contextmanager
def _no_lock() -> Iterator[bool]:
    yield True


async def sweep_every(
    interval: float, database: Database, quota: Callable[[], QuotaBackend], clock: Clock, ttl: float
) -> None:
    """Sweep every ``interval`` seconds, forever (a replica's background task; cancel it to stop). A sweep
    that fails is logged and tried again at the next interval."""
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(lambda: sweep(database, quota(), clock(), ttl))
        except Exception:
            log.exception("sweeping stale reservations failed; trying again in %ss", interval)
