"""What runs beside the request path: it hears of each settled request and, in a task of its own, checks the
thresholds and sends what is due.

The request path pays for one dictionary lookup: :meth:`AlertWorker.settled` compares what the settled
reservation tells (the account's day counter after it, the key's counters) with what this replica's last
check of that account found (the use at which each allotment's next threshold is crossed). Only a settle
that may have crossed one queues a check, and checks of one account are coalesced. The check itself (a few
indexed queries, the unique INSERT that decides) and every delivery run in the worker's task, off the path.

It hears of refusals too: a request refused because an allotment cannot pay for it means that allotment
is spent, whatever its counter says (a price of 3 stops a 100-credit day at 99), so its 100% alert goes.

Every replica also looks for due deliveries each ``POLL_SECONDS``: retries, and events other replicas or
the CLI queued, so an alert leaves within seconds even if the replica that queued it died. Each delivery
is sent in a task of its own, at most ``SENDERS`` at a time, so a slow receiver holds one sender for its
deadline at worst, never the checks or the other deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from aimichat.keys.service import Principal
from aimichat.mail import Mailer
from aimichat.quota.ledger import Refusal, Reservation
from aimichat.store.clock import Clock
from aimichat.store.db import Database

from . import delivery, service

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
SENDERS = 8  # deliveries in flight at once on one replica
HINT_SECONDS = 30.0  # a threshold changed on another replica is heeded by this one within this time

Slot = tuple[int, str]  # (key id, 0 for the account; "day" | "month")


@dataclass(frozen=True)
class Hint:
    """What the last check of one account found: the use at which each allotment's next threshold is crossed
    (None: every threshold is crossed already)."""

    day: dt.date
    expires: float  # time.monotonic()
    next_at: dict[Slot, int | None]
    month_before_today: int  # the month's use on the days before today (the month = that + today's)

    def could_cross(self, reservation: Reservation) -> bool:
        """May the use ``reservation`` leaves have crossed a threshold not yet crossed at the last check?"""
        if reservation.day != self.day or time.monotonic() >= self.expires:
            return True
        figures = reservation.key
        reached = [
            ((0, "day"), reservation.day_used),
            ((0, "month"), self.month_before_today + reservation.day_used if reservation.month else None),
        ]
        if reservation.key_id:
            if figures.daily_cap is not None:
                reached.append(((reservation.key_id, "day"), figures.day_used))
            if figures.monthly_cap is not None:
                reached.append(((reservation.key_id, "month"), figures.month_used))
        for slot, used in reached:
            if slot[1] == "month" and slot[0] == 0 and used is None:
                continue  # the tier has no monthly allotment
            if slot not in self.next_at or used is None:
                return True  # not checked yet
            threshold = self.next_at[slot]
            if threshold is not None and used >= threshold:
                return True
        return False

    def all_crossed(self, slot: Slot, today: dt.date) -> bool:
        """Had the last check (if still trusted) found every threshold of ``slot`` crossed?"""
        fresh = self.day == today and time.monotonic() < self.expires
        return fresh and slot in self.next_at and self.next_at[slot] is None


def hint_from(check: service.Check, now: dt.datetime, previous: Hint | None) -> Hint:
    next_at: dict[Slot, int | None] = {}
    if previous is not None and previous.day == now.date():
        next_at.update({slot: at for slot, at in previous.next_at.items() if slot[0]})  # keys not checked now
    used = {(a.key_id, a.period): a.used for a in check.allotments}
    for allotment in check.allotments:
        next_at[(allotment.key_id, allotment.period)] = allotment.next_at(check.percents)
    before_today = used.get((0, "month"), 0) - used.get((0, "day"), 0)
    return Hint(now.date(), time.monotonic() + HINT_SECONDS, next_at, max(0, before_today))


class AlertWorker:
    """One per replica (``app.state.alerts``): hears of settles, checks thresholds, sends deliveries."""

    def __init__(
        self,
        database: Database,
        clock: Clock,
        mailer: Callable[[], Mailer | None],
        *,
        timeout: float = 5.0,
        retry_base: float = 5.0,
        allow_private: bool = False,
    ) -> None:
        self.database = database
        self.clock = clock
        self.mailer = mailer
        self.timeout = timeout
        self.retry_base = retry_base
        self.allow_private = allow_private
        self.hints: dict[int, Hint] = {}
        self.pending: dict[int, set[int]] = {}  # account id -> key ids (0: none) settled since the last check
        self.spent: dict[int, set[service.Spent]] = {}  # account id -> allotments a refusal found spent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    # -- heard from the request path (any thread) --

    def settled(self, reservation: Reservation, credits: int) -> None:
        """A request settled, charging ``credits``: queue a check of its account if it may have crossed a
        threshold. Never blocks, never raises."""
        try:
            if credits <= 0:
                return
            hint = self.hints.get(reservation.account_id)
            if hint is not None and not hint.could_cross(reservation):
                return
            self._soon(self._mark, reservation.account_id, reservation.key_id or 0)
        except Exception:  # the request must not fail because of an alert
            log.exception("could not queue the alert check of account %s", reservation.account_id)

    def refused(self, principal: Principal, refusal: Refusal) -> None:
        """A request was refused: when an allotment could not pay for it, queue a check that counts it spent
        (its 100% alert), unless the last check found that allotment's thresholds all crossed. Never blocks,
        never raises."""
        try:
            spent = service.spent_by(principal.key_id, refusal)
            if spent is None:
                return  # a per-minute rate limit: no allotment is spent
            hint = self.hints.get(principal.account_id)
            if hint is not None and hint.all_crossed((spent.key_id, spent.period), self.clock().date()):
                return
            self._soon(self._mark, principal.account_id, spent.key_id, spent)
        except Exception:  # the request must not fail because of an alert
            log.exception("could not queue the alert check of account %s", principal.account_id)

    def wake(self) -> None:
        """Look for due deliveries now (after queueing an event)."""
        if self._wake is not None:
            self._soon(self._wake.set)

    def forget(self, account_id: int) -> None:
        """The account's thresholds changed: check it afresh at its next settle."""
        self.hints.pop(account_id, None)

    def _soon(self, callback: Callable[..., object], *args: object) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _mark(self, account_id: int, key_id: int, spent: service.Spent | None = None) -> None:
        self.pending.setdefault(account_id, set()).add(key_id)
        if spent is not None:
            self.spent.setdefault(account_id, set()).add(spent)
        if self._wake is not None:
            self._wake.set()

    # -- the worker task --

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # Redirects are not followed: a 3xx is a failed delivery (Standard Webhooks), and following one
        # could lead past the address check. No connection is kept: each post goes to an address checked
        # for it, under its own name (SNI), so a kept connection could carry one name's post to another.
        self._client = httpx.AsyncClient(
            timeout=self.timeout,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=SENDERS, max_keepalive_connections=0),
        )
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        # A send cut short here leaves its claim to lapse: another replica (or this one, restarted) retries.
        for task in [self._task, *self._sending]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._client is not None:
            await self._client.aclose()
        self._loop = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that arrives as
            # the event is set, and close() would then wait for this loop for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.run_once()
            except Exception:  # a store outage: the next round tries again
                log.exception("alert worker round failed")

    async def run_once(self) -> None:
        """Check the accounts heard of since the last round, then start sending every due delivery."""
        pending, self.pending = self.pending, {}
        spent, self.spent = self.spent, {}
        for account_id, key_ids in pending.items():
            await asyncio.to_thread(self.check, account_id, key_ids, spent.get(account_id, ()))
        await self.deliver_due()

    def check(self, account_id: int, key_ids: Iterable[int], spent: Iterable[service.Spent] = ()) -> service.Check:
        """Check one account's thresholds now (queueing what it crossed) and remember where it stands."""
        mailer = self.mailer()
        now = self.clock()
        with self.database.session() as session:
            found = service.check_usage(
                session, account_id, key_ids, now, email=mailer is not None and mailer.enabled, spent=spent
            )
            if found.sent:  # a commit clears this replica's key, model and tier caches: only when it wrote
                session.commit()
            else:
                session.rollback()
        self.hints[account_id] = hint_from(found, now, self.hints.get(account_id))
        if found.sent:
            log.info("account %s: %d usage alert(s) queued", account_id, len(found.sent))
        return found

    async def deliver_due(self) -> int:
        """Claim as many due deliveries as there are free senders and start sending them (each in its own
        task: this returns at once); how many were started."""
        started = 0
        while (free := SENDERS - len(self._sending)) > 0:
            claimed = await asyncio.to_thread(self._claim, min(free, delivery.BATCH))
            for one in claimed:
                task = asyncio.create_task(self._deliver(one))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            started += len(claimed)
            if len(claimed) < free:
                break
        return started

    async def _deliver(self, claimed: delivery.Claimed) -> None:
        assert self._client is not None
        try:
            error = await delivery.send(
                claimed,
                self._client,
                self.mailer(),
                timestamp=int(time.time()),
                allow_private=self.allow_private,
                deadline=delivery.deadline_of(claimed, self.timeout),
            )
            await asyncio.to_thread(self._record, claimed, error)
        except Exception:  # a store outage: the claim lapses and the delivery is tried again
            log.exception("alert delivery %s could not be recorded", claimed.id)
        finally:
            if self._wake is not None:
                self._wake.set()  # a sender is free: more may be due

    def _claim(self, limit: int) -> list[delivery.Claimed]:
        with self.database.session() as session:
            claimed = delivery.claim_due(session, self.clock(), limit)
            # A commit tells this replica's caches (keys, models, tier limits) that something changed: the
            # poll, every second, commits only when it claimed something.
            if claimed:
                session.commit()
            else:
                session.rollback()
            return claimed

    def _record(self, claimed: delivery.Claimed, error: str | None) -> None:
        with self.database.session() as session:
            kept = delivery.record(session, claimed, error, self.clock(), self.retry_base)
            session.commit()
        if not kept:
            log.warning("alert delivery %s: not recorded (its claim lapsed, or it was removed)", claimed.id)
        elif error is not None:
            log.warning("alert delivery %s failed: %s", claimed.id, error)
