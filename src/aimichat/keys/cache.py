"""A short-lived, per-process cache of key lookups: most requests skip the database for who is calling.

Entries live ``ttl`` seconds (at most one), so a key revoked, an account disabled or a tier changed in
another process (another replica, the CLI) takes effect everywhere within that time. Changes made
through this process's own web pages take effect at once: the app clears the cache whenever one of
its ORM sessions commits (see ``aimichat.app``). Only live keys are cached: a key created a moment
ago is never refused because of an earlier miss.

A miss is looked up once however many requests of the key arrive meanwhile (:meth:`PrincipalCache.load`,
:mod:`aimichat.single_flight` says how that never changes what a request is told).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aimichat.single_flight import SingleFlight

from .service import Principal


class PrincipalCache:
    def __init__(self, ttl: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Principal]] = {}  # key digest -> (expiry, principal)
        self.generation = 0  # bumped by clear(): a lookup that started before a change must not be stored
        self._lookups: SingleFlight[Principal | None] = SingleFlight()  # by key digest

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Store a lookup that started at ``generation``, unless the cache was cleared since."""
        if self.ttl <= 0 or generation != self.generation:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # all would expire within a second anyway
        self._entries[digest] = (self._clock() + self.ttl, principal)

    async def load(self, digest: str, lookup: Callable[[], Awaitable[Principal | None]]) -> Principal | None:
        """The cached principal of ``digest``, else what ``lookup()`` finds (stored when live); requests that
        miss while a lookup of the key runs share it (see :mod:`aimichat.single_flight`)."""
        principal = self.get(digest)
        if principal is not None:
            return principal
        if self.ttl <= 0:  # no cache: every request looks its key up, as configured
            return await lookup()
        generation = self.generation

        async def look_up() -> Principal | None:
            found = await lookup()
            if found is not None:
                self.put(digest, found, generation)
            return found

        return await self._lookups.run(digest, generation, look_up)

    def clear(self, *_ignored: object) -> None:
        self.generation += 1
        self._entries.clear()
