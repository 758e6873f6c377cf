"""A short-lived, per-process cache of key lookups: most requests skip the database for who is calling.

Entries live ``ttl`` seconds (at most one), so a key revoked, an account disabled or a tier changed in
another process (another replica, the CLI) takes effect everywhere within that time. Changes made
through this process's own web pages take effect at once: the app clears the cache whenever one of
its ORM sessions commits (see ``aimichat.app``). Only live keys are cached: a key created a moment
ago is never refused because of an earlier miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .service import Principal


class PrincipalCache:
    def __init__(self, ttl: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, Principal]] = {}  # key digest -> (expiry, principal)
        self.generation = 0  # bumped by clear(): a lookup that started before a change must not be stored

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

    def clear(self, *_ignored: object) -> None:
        self.generation += 1
        self._entries.clear()
