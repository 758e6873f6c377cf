"""Cached health checks for ``/readyz``: answered in well under a second, even when a store hangs.

A :class:`CachedCheck` runs its probe (a database ``SELECT 1``, a Redis ``PING``) in a thread of its own,
never in the request thread pool (requests stuck on a dead store may fill it), at most one at a time.
A success is trusted for ``interval`` seconds; a failure is not cached, so the next caller starts a new
probe and readiness comes back as soon as the store does. A caller waits at most ``wait`` seconds for
a probe in flight; past that it gets the last result, and once the probe has been running longer than
``timeout`` seconds, a failure. So readiness fails within ``interval`` + ``timeout`` of a store going
silent, and within one probe of it refusing connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds a success is trusted
TIMEOUT = 2.0  # seconds a probe may run before the check reports a failure
WAIT = 0.5  # seconds a caller waits for a probe in flight


_DONE = threading.Event()
_DONE.set()


@dataclass(frozen=True)
class Health:
    ok: bool
    error: str | None = None  # the exception's type name; "TimeoutError" for a probe without an answer
    at: float = 0.0  # time.monotonic() when it was known
    detail: str = ""  # the exception's message, for the log

    def as_json(self) -> dict[str, Any]:
        return {"ok": True} if self.ok else {"ok": False, "error": self.error}


class CachedCheck:
    def __init__(
        self,
        name: str,
        probe: Callable[[], object],
        *,
        interval: float = INTERVAL,
        timeout: float = TIMEOUT,
        wait: float = WAIT,
    ) -> None:
        self.name = name
        self.probe = probe
        self.interval = interval
        self.timeout = timeout
        self.wait = wait
        self._lock = threading.Lock()
        self._last: Health | None = None
        self._started: float | None = None  # when the probe in flight started; None: none in flight
        self._done = threading.Event()
        self._reported_ok = True  # what the log last said, so a lasting outage is logged once

    async def result(self) -> Health:
        """The store's health, without waiting more than ``wait`` seconds (and not at all once the
        probe in flight has been running that long: only its first callers wait for it)."""
        done, started = self._start_if_due()
        deadline = started + self.wait
        pause = 0.001
        while not done.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(pause)  # polled: works from any event loop, and costs nothing once done
            pause = min(pause * 2, 0.02)
        return self.current()

    def current(self) -> Health:
        """What is known now, without starting a probe."""
        now = time.monotonic()
        with self._lock:
            last, started = self._last, self._started
        if started is not None and now - started > self.timeout:
            return self._report(Health(False, "TimeoutError", now, f"no answer within {self.timeout:g} s"))
        if last is None:
            return Health(False, "TimeoutError", now)  # the first probe has not answered yet
        return self._report(last)

    def _start_if_due(self) -> tuple[threading.Event, float]:
        """The probe in flight (started now if due): its end, and when it started."""
        now = time.monotonic()
        with self._lock:
            if self._started is not None:
                return self._done, self._started
            if self._last is not None and self._last.ok and now - self._last.at < self.interval:
                return _DONE, now
            self._started = now
            self._done = done = threading.Event()
        threading.Thread(target=self._run, args=(done,), name=f"aimichat-health-{self.name}", daemon=True).start()
        return done, now

    def _run(self, done: threading.Event) -> None:
        try:
            self.probe()
            health = Health(True, at=time.monotonic())
        except Exception as exc:  # any driver error means "not reachable"; the reason goes to the caller
            health = Health(False, type(exc).__name__, time.monotonic(), str(exc))
        with self._lock:
            self._last = health
            self._started = None
        done.set()

    def _report(self, health: Health) -> Health:
        if health.ok != self._reported_ok:
            self._reported_ok = health.ok
            if health.ok:
                log.info("readiness: %s reachable again", self.name)
            else:
                log.warning("readiness: %s unreachable: %s: %s", self.name, health.error, health.detail)
        return health
