"""PostgreSQL connections that cannot hang: connect, statement, lock and round-trip limits.

The server enforces ``statement_timeout`` and ``lock_timeout`` (set at connection start-up, so they cost
no round trip); libpq enforces ``connect_timeout`` and TCP keepalives. None of them helps when the server
stops answering altogether (a black-holed network, a frozen host): the server cannot cancel a statement
it never received, and a TCP connection that keeps being acknowledged (a proxy, a load balancer) never
looks dead. So each round trip also has a client-side deadline: :class:`TimedConnection` arms a
watchdog before it waits for the server and disarms it after; a round trip that outlives the deadline
(the statement timeout, plus the connect timeout for the answer to travel back) has its socket shut
down, which ends the wait with an ``OperationalError``. SQLAlchemy then sees a broken connection and
drops the pool, and the request fails closed (503).

This module imports psycopg: only PostgreSQL URLs load it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.abc import PQGen
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from .db import DatabaseTimeouts

# libpq counts the connect timeout in whole seconds and takes 2 as its minimum (psycopg follows it).
MIN_CONNECT_TIMEOUT = 2
# TCP keepalives, both ways: a peer that vanished while a connection sat idle in the pool (or, on the
# server, a client that vanished holding row locks in an open transaction) is noticed within ~1 minute.
KEEPALIVES_IDLE = 30
KEEPALIVES_INTERVAL = 10
KEEPALIVES_COUNT = 3


def connect_timeout(seconds: float) -> int:
    """The libpq ``connect_timeout`` for ``seconds``: whole seconds, at least 2."""
    return max(MIN_CONNECT_TIMEOUT, math.ceil(seconds))


def round_trip_deadline(timeouts: DatabaseTimeouts) -> float | None:
    """How long one round trip may take before the client gives up on the server: the statement
    timeout (the server cancels the statement then) plus the connect timeout for its answer to come
    back. None when statements have no limit."""
    if timeouts.statement <= 0:
        return None
    return timeouts.statement + connect_timeout(timeouts.connect)


def connect_args(url: str, timeouts: DatabaseTimeouts) -> dict[str, Any]:
    """psycopg connection parameters for ``timeouts``; what the URL's query already sets is kept."""
    query = make_url(url).query
    args: dict[str, Any] = {
        "connect_timeout": connect_timeout(timeouts.connect),
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE,
        "keepalives_interval": KEEPALIVES_INTERVAL,
        "keepalives_count": KEEPALIVES_COUNT,
    }
    deadline = round_trip_deadline(timeouts)
    if deadline is not None:
        # Data the server never acknowledges (a dead network) ends the connection in the kernel too.
        args["tcp_user_timeout"] = int(deadline * 1000)
    args = {name: value for name, value in args.items() if name not in query}
    # Start-up options, each a server setting for the session; a limit of 0 sends none (the role's or the
    # server's own setting applies), and without any limit no options at all (for poolers that refuse them).
    server = {"statement_timeout": _ms(timeouts.statement), "lock_timeout": _ms(timeouts.lock)}
    server = {name: value for name, value in server.items() if value}
    if server:
        server |= {
            "tcp_keepalives_idle": KEEPALIVES_IDLE,
            "tcp_keepalives_interval": KEEPALIVES_INTERVAL,
            "tcp_keepalives_count": KEEPALIVES_COUNT,
        }
    given = query.get("options", "")
    if isinstance(given, tuple):
        given = " ".join(given)
    ours = " ".join(f"-c {name}={value}" for name, value in server.items() if f"{name}=" not in given)
    if ours:
        args["options"] = f"{given} {ours}".strip()
    return args


def _ms(seconds: float) -> int:
    """PostgreSQL's milliseconds for a limit in seconds; 0 (no limit) stays 0."""
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


@dataclass
class _Armed:
    deadline: float
    fd: int
    conn: TimedConnection


class Watchdog:
    """One thread per process that shuts down the socket of a round trip past its deadline.

    Arming and disarming cost a lock and a dict operation; the thread sleeps until the earliest
    deadline (or until something is armed), so an idle or healthy process pays nothing more.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, _Armed] = {}
        self._tokens = itertools.count()
        self._wake_at: float | None = None  # when the thread next wakes by itself; None: not before notified
        self._thread: threading.Thread | None = None

    def arm(self, conn: TimedConnection, fd: int, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = _Armed(deadline, fd, conn)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="aimichat-db-watchdog", daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline < self._wake_at:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, armed in list(self._armed.items()):
                    if armed.deadline <= now:
                        # Under the lock: the owner cannot disarm and close (and so free the fd) meanwhile.
                        del self._armed[token]
                        armed.conn.deadline_passed = True
                        _shut_down(armed.fd)
                self._wake_at = min((a.deadline for a in self._armed.values()), default=None)
                self._cond.wait(None if self._wake_at is None else max(0.0, self._wake_at - now))


def _shut_down(fd: int) -> None:
    """End every wait on the socket ``fd`` (poll wakes up, reads EOF) without closing the owner's fd."""
    with contextlib.suppress(OSError):
        dup = os.dup(fd)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise
        with sock:
            sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = Watchdog()


class TimedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every round trip with the server ends within ``round_trip`` seconds."""

    round_trip: float | None = None  # set by the engine's connect hook; None: no client-side deadline
    deadline_passed = False

    def wait(self, gen: PQGen[Any], interval: float = 0.1, timeout: float | None = None) -> Any:
        limit = self.round_trip
        if limit is None:
            return self._wait(gen, interval, timeout)
        token = WATCHDOG.arm(self, self.pgconn.socket, limit)
        try:
            return self._wait(gen, interval, timeout)
        except psycopg.Error as exc:
            if self.deadline_passed:
                raise psycopg.OperationalError(
                    f"the database did not answer within {limit:g} s (statement timeout plus connect timeout);"
                    " the connection was closed"
                ) from exc
            raise
        finally:
            WATCHDOG.disarm(token)

    def _wait(self, gen: PQGen[Any], interval: float, timeout: float | None) -> Any:
        # psycopg 3.2 takes (gen, interval); 3.3 added the timeout: pass it only when a caller gave one.
        if timeout is None:
            return super().wait(gen, interval)
        return super().wait(gen, interval, timeout)


def connect(round_trip: float | None, *cargs: Any, **cparams: Any) -> TimedConnection:
    """SQLAlchemy's ``do_connect`` hook: a TimedConnection instead of psycopg's own class."""
    conn = TimedConnection.connect(*cargs, **cparams)
    conn.round_trip = round_trip
    return conn
