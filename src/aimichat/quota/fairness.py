"""Fairness between accounts on one replica: the tier's limits and round-robin turns on the engine.

Issue 15 found that one account with 75 requests in flight filled the engine's queue, so another account
got 503 at once, and that one context-filling prompt costs half a minute of CPU for one credit. Three rules
answer it, applied by :class:`Fairness` around the engine a request uses (:meth:`Fairness.bind`):

- **a prompt-size limit per tier** (``tiers.max_prompt_tokens``): a longer prompt is refused with a 400
  (``context_length_exceeded``) once it is counted and before the engine reads it (:func:`check_prompt_size`);
- **a concurrency limit per tier** (``tiers.max_concurrent``): an account may have that many requests
  running or waiting for the engine; one more is refused at once with the spec's 429 (:class:`TooManyConcurrent`);
- **round-robin turns** (:class:`AdmissionGate`): requests that must wait for an engine wait in one queue per
  account, and each free slot goes to the next account in turn, so an account with many waiting requests
  delays another account's request by at most one of its own per slot. When the waiting room is full, a
  newcomer takes the place of the newest request of the account with the most waiting; only an account that
  already has the most waiting is refused (503, ``engine_overloaded``).

All three hold **per replica**: the engine's slots and its queue are this process's, so per-replica counts
are exact where the contention is, cost no store round trip on the request path, and cannot leak a slot
when a replica dies. Behind N replicas an account may run up to N times ``max_concurrent`` in all.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from aimichat.engines.base import (
    JSON,
    ContextLengthExceeded,
    Engine,
    EngineBusy,
    EngineError,
    EngineStats,
    Event,
    Message,
    PreparedPrompt,
    SamplingParams,
)
from aimichat.keys.service import Principal
from aimichat.single_flight import SingleFlight
from aimichat.store.db import Database
from aimichat.store.models import Tier

TIER_CACHE_SECONDS = 2.0  # how long a replica trusts its copy of the tiers' limits (changed elsewhere: the CLI)
CONCURRENCY_RETRY_AFTER = 1  # seconds: a running request of the account may well have finished by then


@dataclass(frozen=True)
class TierLimits:
    """A tier's fairness limits; None: no limit of its own."""

    max_concurrent: int | None = None
    max_prompt_tokens: int | None = None


NO_LIMITS = TierLimits()


class PromptOverTierLimit(ContextLengthExceeded):
    """A prompt longer than the caller's tier allows: answered as a context-length 400."""

    def __init__(self, prompt_tokens: int, limit: int, tier: str) -> None:
        EngineError.__init__(
            self,
            f"Your plan ({tier}) allows prompts of at most {limit} tokens, but your messages use "
            f"{prompt_tokens} tokens. Shorten the messages.",
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = limit


class TooManyConcurrent(Exception):
    """An account already has as many requests running or waiting as its tier allows (the spec's 429)."""

    def __init__(self, tier: str, limit: int, running: int) -> None:
        self.tier = tier
        self.limit = limit
        self.running = running
        self.retry_after = CONCURRENCY_RETRY_AFTER
        self.message = (
            f"Too many concurrent requests: the {tier} plan runs at most {limit} requests of an account at "
            "once. Wait for one to finish, then retry."
        )
        super().__init__(self.message)


def check_prompt_size(limits: TierLimits, tier: str, prompt_tokens: int) -> None:
    """Refuse a prompt over the tier's limit (PromptOverTierLimit); the model's context bounds the rest."""
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise PromptOverTierLimit(prompt_tokens, limits.max_prompt_tokens, tier)


class TierLimitsCache:
    """The tiers' fairness limits, read in one query and trusted for ``seconds``; ``clear()`` after a commit
    on this replica makes a change made here count at once."""

    def __init__(self, database: Database, seconds: float = TIER_CACHE_SECONDS) -> None:
        self.database = database
        self.seconds = seconds
        self._limits: dict[str, TierLimits] = {}
        self._read_at: float | None = None
        self._cleared = 0  # clear()s so far
        self._limits_cleared = 0  # clear()s before the read that _limits holds started
        self._reads: SingleFlight[None] = SingleFlight()

    async def get(self, tier: str) -> TierLimits:
        if self._read_at is None or time.monotonic() - self._read_at > self.seconds:
            # One read at a time, shared by the requests that come while it runs (each of 32 concurrent
            # clients read the table when it expired): see aimichat.single_flight.
            cleared = self._cleared
            await self._reads.run("tiers", cleared, lambda: self._refresh(cleared))
        return self._limits.get(tier, NO_LIMITS)

    async def _refresh(self, cleared: int) -> None:
        read_at = time.monotonic()
        limits = await run_in_threadpool(self._read)
        if cleared >= self._limits_cleared:  # not older than what is held (reads may end out of order)
            self._limits, self._limits_cleared = limits, cleared
        if cleared == self._cleared:  # else a change made here meanwhile: the next request reads again
            self._read_at = read_at

    def clear(self, *_: object) -> None:
        self._cleared += 1  # first: a read ending meanwhile (on the loop; this may run in a worker thread)
        self._read_at = None  # must not find the count unchanged and trust itself after this line

    def _read(self) -> dict[str, TierLimits]:
        query = select(Tier.name, Tier.max_concurrent, Tier.max_prompt_tokens)
        with self.database.connect(single_statement=True) as conn:
            return {name: TierLimits(concurrent, prompt) for name, concurrent, prompt in conn.execute(query)}


class AdmissionGate:
    """``slots`` turns on one engine, handed out round-robin between accounts.

    A request :meth:`enter`\\ s (at once while a slot is free and nobody waits, else it waits in its account's
    queue) and :meth:`leave`\\ s when its generation ends, which hands the slot to the next account in turn.
    """

    def __init__(self, slots: int, max_waiting: int, timeout: float) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.running = 0
        self.waiting = 0
        # One queue per account; the dict's order is the turn order (an account served goes to the back).
        self._queues: dict[Hashable, deque[asyncio.Future[None]]] = {}

    async def enter(self, account: Hashable) -> None:
        """Wait for a turn; EngineBusy when the waiting room is full for this account or the wait too long."""
        if self.running < self.slots and not self._queues:
            self.running += 1
            return
        self._make_room(account)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(account, deque()).append(turn)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.leave()  # the turn came as the wait was given up: pass it on
            else:
                self._forget(account, turn)
            if isinstance(exc, TimeoutError):
                raise EngineBusy("Timed out waiting for the engine; retry shortly.", retry_after=5) from None
            raise

    def leave(self) -> None:
        self.running -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self.running < self.slots and self._queues:
            account = next(iter(self._queues))
            queue = self._queues.pop(account)
            turn = queue.popleft()
            self.waiting -= 1
            if queue:
                self._queues[account] = queue  # back of the line
            if not turn.done():
                self.running += 1
                turn.set_result(None)

    def _make_room(self, account: Hashable) -> None:
        """Room for one more waiting request of ``account``: refuse it (EngineBusy) if its account already has
        the most waiting, else send the newest request of the account that has the most back."""
        if self.waiting < self.max_waiting:
            return
        mine = len(self._queues.get(account, ()))
        biggest = max(self._queues, key=lambda a: len(self._queues[a]), default=None)
        if biggest is None or len(self._queues[biggest]) <= mine + 1:
            raise EngineBusy("The engine queue is full; retry shortly.", retry_after=2)
        evicted = self._queues[biggest].pop()
        self.waiting -= 1
        evicted.set_exception(EngineBusy("The engine queue is full; retry shortly.", retry_after=2))

    def _forget(self, account: Hashable, turn: asyncio.Future[None]) -> None:
        queue = self._queues.get(account)
        if queue is not None and turn in queue:
            queue.remove(turn)
            self.waiting -= 1
            if not queue:
                del self._queues[account]


def engine_slots(engine: Engine) -> int | None:
    """The requests an engine decodes together (llama.cpp's slots); None for one that queues elsewhere
    (an upstream server): then requests are not held back here, only the concurrency limit applies."""
    return engine.stats().slots


@dataclass
class Fairness:
    """This replica's fairness: the tiers' limits, each account's requests in flight, one gate per engine."""

    tiers: TierLimitsCache
    max_waiting: int = 64
    timeout: float = 60.0
    slots: Callable[[Engine], int | None] = engine_slots
    in_flight: dict[int, int] = field(default_factory=dict)  # account id -> requests running or waiting
    _gates: dict[str, tuple[Engine, AdmissionGate | None]] = field(default_factory=dict)

    async def bind(self, engine: Engine, principal: Principal) -> Engine:
        """``engine`` as ``principal``'s request must use it: within its tier's limits, taking turns."""
        limits = await self.tiers.get(principal.tier_name)
        return FairEngine(engine, self, principal.account_id, principal.tier_name, limits)

    def gate(self, engine: Engine) -> AdmissionGate | None:
        known = self._gates.get(engine.model_id)
        if known is None or known[0] is not engine:  # a model loaded again gets a new gate
            slots = self.slots(engine)
            known = (engine, AdmissionGate(slots, self.max_waiting, self.timeout) if slots else None)
            self._gates[engine.model_id] = known
        return known[1]

    def waiting(self, engine: Engine) -> int:
        """Requests waiting here for a turn on ``engine`` (those it has taken wait in its own queue)."""
        known = self._gates.get(engine.model_id)
        gate = known[1] if known is not None else None
        return gate.waiting if gate is not None else 0

    def check_concurrency(self, account_id: int, tier: str, limits: TierLimits) -> None:
        running = self.in_flight.get(account_id, 0)
        if limits.max_concurrent is not None and running >= limits.max_concurrent:
            raise TooManyConcurrent(tier, limits.max_concurrent, running)


class FairEngine:
    """One request's view of an engine: the same engine, within its account's limits and taking turns."""

    def __init__(self, engine: Engine, fairness: Fairness, account_id: int, tier: str, limits: TierLimits) -> None:
        self.engine = engine
        self.fairness = fairness
        self.account_id = account_id
        self.tier = tier
        self.limits = limits
        self.model_id = engine.model_id

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.close()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def prepare(self, messages: list[Message], tools: Sequence[JSON] = ()) -> PreparedPrompt:
        """Count the prompt; refuse it if it is over the tier's size, or if the account is at its concurrency
        limit already (before any credit is reserved: ``generate`` checks again, for good)."""
        prompt = await (self.engine.prepare(messages, tools) if tools else self.engine.prepare(messages))
        check_prompt_size(self.limits, self.tier, prompt.prompt_tokens)
        self.fairness.check_concurrency(self.account_id, self.tier, self.limits)
        return prompt

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncGenerator[Event, None]:
        fairness, account = self.fairness, self.account_id
        fairness.check_concurrency(account, self.tier, self.limits)  # no await since: the count is exact
        fairness.in_flight[account] = fairness.in_flight.get(account, 0) + 1
        gate = fairness.gate(self.engine)
        try:
            if gate is not None:
                await gate.enter(account)
            try:
                events = self.engine.generate(prompt, params)
                try:
                    async for event in events:
                        yield event
                finally:
                    await events.aclose()
            finally:
                if gate is not None:
                    gate.leave()
        finally:
            left = fairness.in_flight[account] - 1
            if left:
                fairness.in_flight[account] = left
            else:
                del fairness.in_flight[account]
