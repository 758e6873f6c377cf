"""Retries with an ``Idempotency-Key``: run a request once, replay its answer to the retries.

:class:`Retries` (one per app, ``app.state.retries``) is the service; ``api.idempotency.idempotent`` is
how a route uses it. The rules, in order:

- the key is 1 to 255 characters (else 400 ``invalid_idempotency_key``);
- a key not seen (or expired) is claimed: the request runs, as an :class:`Attempt`;
- a key used with another body or operation: 422 ``idempotency_key_reused``;
- a key whose answer is kept: that answer (:class:`~.records.Stored`), with no new charge;
- a key whose request is still running: wait for it (polling the database, which every replica
  shares) up to ``wait`` seconds, then 409 ``idempotency_key_in_progress``. A first attempt that is
  released meanwhile (it failed) lets the waiting retry claim the key and run.

An attempt ends :meth:`Attempt.keep` (its answer is replayed to retries for ``ttl``) or
:meth:`Attempt.release` (nothing kept: a retry runs anew). :meth:`Attempt.recorded` does either at the
end of a stream of server-sent events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import anyio
from starlette.concurrency import run_in_threadpool

from aimichat.api.errors import APIError
from aimichat.store.clock import Clock
from aimichat.store.db import Database
from aimichat.store.errors import STORE_UNAVAILABLE

from . import records
from .records import Claimed, Mismatch, Running, Stored

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
POLL_SECONDS = 0.2  # how often a waiting retry reads the row
CLEAN_INTERVAL = 600.0  # seconds between two deletions of expired rows by a replica
SSE_DONE = b"data: [DONE]\n\n"


def check_key(values: Sequence[str]) -> str | None:
    """The ``Idempotency-Key`` among a request's header values; None when it sent none."""
    if not values:
        return None
    if len(set(values)) > 1:
        raise _bad_key("More than one Idempotency-Key header was sent: send exactly one.")
    key = values[0]
    if not key.strip():
        raise _bad_key("The Idempotency-Key header is empty: send 1 to 255 characters, e.g. a UUID.")
    if len(key) > MAX_KEY_LENGTH:
        raise _bad_key(f"The Idempotency-Key header is longer than {MAX_KEY_LENGTH} characters.")
    return key


def account_owner(account_id: int) -> str:
    """The owner of an account's keys: a key is the account's, whichever of its API keys sends it."""
    return f"account:{account_id}"


def sse_complete(events: Sequence[bytes]) -> bool:
    """Did a stream of server-sent events end as a whole answer: ``[DONE]`` last, and no error event
    (the chat stream sends ``{"error": …}`` then ``[DONE]`` when the model fails mid-stream)?"""
    if not events or events[-1] != SSE_DONE:
        return False
    # Only events that may be errors are parsed (the text of a chunk has its quotes escaped).
    return not any(b'"error"' in event and "error" in _sse_payload(event) for event in events[:-1])


@dataclass
class Retries:
    """The idempotency service of one app: the database every replica shares, the app's clock, and
    how long answers are kept (``ttl``), retries wait (``wait``) and a running claim is trusted (``lease``:
    the longest a request may run, ``AIMICHAT_RESERVATION_TTL``)."""

    database: Database
    clock: Clock
    ttl: float = 86400.0
    wait: float = 60.0
    lease: float = 900.0

    async def begin(self, owner: str, key: str, operation: str, body: bytes) -> Attempt | Stored:
        """Claim ``key`` for a request, or the answer kept for it (waiting while it runs elsewhere).

        ``owner`` scopes keys (:func:`account_owner`); ``operation`` names what the request does
        (``"POST /v1/chat/completions"``): the same key for another operation or ``body`` is refused.
        Raises :class:`~aimichat.api.errors.APIError` 422 or 409.
        """
        deadline = time.monotonic() + self.wait
        while True:
            # Shielded: once the database holds our claim we must know it, or nobody would release it.
            with anyio.CancelScope(shield=True):
                claim = await run_in_threadpool(
                    records.claim,
                    self.database,
                    owner,
                    key,
                    operation,
                    body,
                    self.clock(),
                    ttl=dt.timedelta(seconds=self.ttl),
                    lease=dt.timedelta(seconds=self.lease),
                )
            if isinstance(claim, Claimed):
                return Attempt(self, claim)
            if isinstance(claim, Stored):
                return claim
            if isinstance(claim, Mismatch):
                raise APIError(
                    422,
                    "This Idempotency-Key was already used with a different request body; use a new key "
                    "for a new request.",
                    code="idempotency_key_reused",
                    type="invalid_request_error",
                )
            assert isinstance(claim, Running)
            if time.monotonic() + POLL_SECONDS > deadline:
                raise APIError(
                    409,
                    "A request with this Idempotency-Key is still running; retry once it has finished.",
                    code="idempotency_key_in_progress",
                    type="invalid_request_error",
                    retry_after=1,
                )
            await asyncio.sleep(POLL_SECONDS)

    async def clean_every(self, interval: float = CLEAN_INTERVAL) -> None:
        """Delete expired rows every ``interval`` seconds, forever (a replica's background task; cancel it
        to stop). A round that fails is logged and tried again at the next interval."""
        while True:
            await asyncio.sleep(interval)
            try:
                deleted = await anyio.to_thread.run_sync(lambda: records.clean(self.database, self.clock()))
                if deleted:
                    log.info("deleted %d expired idempotency record(s)", deleted)
            except Exception:
                log.exception("deleting expired idempotency records failed; trying again in %ss", interval)


class Attempt:
    """A claimed request: it ends kept (its answer replayed to retries) or released, exactly once."""

    def __init__(self, retries: Retries, claimed: Claimed) -> None:
        self.retries = retries
        self.claimed = claimed
        self.closed = False

    async def keep(self, stored: Stored) -> None:
        """Keep ``stored`` for the retries. A database that cannot be reached now is logged, not raised:
        the caller still gets its answer; the row stays claimed until the lease runs out."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            try:
                kept = await run_in_threadpool(records.keep, self.retries.database, self.claimed, stored)
            except STORE_UNAVAILABLE:
                log.warning("could not keep the answer of idempotency record %d", self.claimed.record_id)
                return
        if not kept:
            log.warning("idempotency record %d was taken over before its answer was kept", self.claimed.record_id)

    async def release(self) -> None:
        """Give the key up, so that a retry runs anew (the request failed, or its caller hung up)."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            try:
                await run_in_threadpool(records.release, self.retries.database, self.claimed)
            except STORE_UNAVAILABLE:
                log.warning("could not release idempotency record %d", self.claimed.record_id)

    async def recorded(
        self,
        events: AsyncIterable[bytes],
        status: int,
        headers: dict[str, str],
        complete: Callable[[Sequence[bytes]], bool] = sse_complete,
    ) -> AsyncIterator[bytes]:
        """``events`` as they are sent, recorded: a stream that ends ``complete`` is kept (with ``status``
        and ``headers``); one cut short, or that failed, is released. An event stream is kept before its
        ``[DONE]`` goes out: a caller that has read the whole answer finds it kept, even if it hangs up
        at once."""
        sent: list[bytes] = []
        try:
            async for event in events:
                sent.append(event)
                if event == SSE_DONE and complete(sent):
                    await self.keep(Stored(status, headers, b"".join(sent)))
                yield event
            if complete(sent):
                await self.keep(Stored(status, headers, b"".join(sent)))
        finally:
            # Closed here, not left to the garbage collector: the chat stream settles its credits as it closes.
            close = getattr(events, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
            if not self.closed:
                await self.release()


def _bad_key(message: str) -> APIError:
    return APIError(400, message, code="invalid_idempotency_key", param="Idempotency-Key")


def _sse_payload(event: bytes) -> dict[str, object]:
    try:
        payload = json.loads(event.removeprefix(b"data: "))
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}
