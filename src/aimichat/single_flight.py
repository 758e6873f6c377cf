"""One read at a time per key, shared by the requests that need it while it runs.

The replica's caches (key lookups, the tiers' limits) expire together for every request in flight: under
32 concurrent clients of one key, each looked the key up again (a py-spy profile of ``bench/gateway.py``
put those lookups at a quarter of the reservations' worker-thread time). A :class:`SingleFlight` makes
the first request's read serve the others.

Sharing must not change what a request is told:

- **A change made here wins.** Each read is made for a *generation* (the cache's count of ``clear()``
  calls); a request of a later generation never joins an earlier read.
- **Only a success is shared.** A request that comes while a read runs waits for it ``join_wait`` seconds
  at most; if the read has not succeeded by then (still running, or failed), the request reads for
  itself, as if nothing were shared. A healthy read takes about a millisecond; one still running after
  100 ms is waiting on a store that stopped answering, and a request that came after the store came back
  must not inherit that read's failure
  (``tests/faults/test_faults.py::test_postgresql_black_holed_with_streams_in_flight`` caught it: 503s
  after a PostgreSQL outage had ended). A read's error is its starter's, and is not kept.
- A waiter that is cancelled (its caller hung up) leaves the read running for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

JOIN_WAIT = 0.1  # seconds a request waits for a read already running before it reads for itself


@dataclass(frozen=True)
class _Flight(Generic[T]):
    generation: int
    task: asyncio.Future[T]


class SingleFlight(Generic[T]):
    """Runs ``read()`` once per key at a time (see the module docstring); one per cache, on one event loop."""

    def __init__(self, join_wait: float | None = None) -> None:
        self.join_wait = JOIN_WAIT if join_wait is None else join_wait
        self._flights: dict[Hashable, _Flight[T]] = {}

    async def run(self, key: Hashable, generation: int, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``'s result, or that of the read of ``key`` for ``generation`` already running."""
        flight = self._flights.get(key)
        if flight is not None and flight.generation == generation and not flight.task.done():
            done, _ = await asyncio.wait({flight.task}, timeout=self.join_wait)
            if done and not flight.task.cancelled() and flight.task.exception() is None:
                return flight.task.result()
            return await read()  # stuck or failed: this request's fate is its own, as without sharing
        task = asyncio.ensure_future(read())
        self._flights[key] = _Flight(generation, task)
        task.add_done_callback(lambda finished: self._landed(key, finished))
        return await asyncio.shield(task)

    def _landed(self, key: Hashable, task: asyncio.Future[T]) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # its starter has it; if it left, no "exception was never retrieved"

    def __len__(self) -> int:
        """Reads in flight."""
        return len(self._flights)
