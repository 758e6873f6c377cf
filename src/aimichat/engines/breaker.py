"""A circuit breaker for one upstream: skip it while it keeps failing, probe it again after a cool-down.

States: *closed* (requests go through), *open* (skipped until the cool-down has passed) and
*half-open* (the cool-down has passed: exactly one request, the probe, goes through; its success
closes the breaker, its failure opens it again for another cool-down).

Every ``allow()`` that returned True must be answered by exactly one of ``success()``,
``failure()`` or ``release()`` (the attempt ended without saying anything about the upstream's
health, e.g. the caller went away), otherwise a half-open breaker would wait for its probe forever.
All state lives on the instance; it is used from one event loop, so it needs no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.consecutive_failures = 0
        self._clock = clock
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a request go to this upstream now? In half-open state this admits the one probe."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.consecutive_failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.consecutive_failures += 1
        # A failed probe re-opens at once: the upstream has shown it is still broken.
        if self._probing or self.consecutive_failures >= self.failure_threshold:
            self._opened_at = self._clock()
        self._probing = False

    def release(self) -> None:
        """The admitted attempt ended without a verdict; let the next request probe instead."""
        self._probing = False

    def retry_in(self) -> float:
        """Seconds until a tripped breaker lets a probe through (0 when it would now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())
