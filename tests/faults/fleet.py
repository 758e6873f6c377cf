"""What the crash, fault and soak runs share: real `aimichat serve` processes over one database (and
Redis), answered by a :class:`~slow_upstream.SlowUpstream`, and the check that the ledger is exact.

"Exact" means: the credit counters (SQL rows, or Redis keys) of every account, and of every capped key,
say what the ledger sums to for the day and the month. A counter that counts more than the ledger makes
a caller pay for nothing; one that counts less oversells.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import redis
from sqlalchemy import func, select

from aimichat.keys import service as keys
from aimichat.keys.service import Principal
from aimichat.quota import ledger, periods
from aimichat.quota.backends import QuotaBackend, RedisQuota, SqlQuota
from aimichat.quota.ledger import Reservation
from aimichat.quota.pricing import Cost
from aimichat.store.clock import utcnow
from aimichat.store.db import Database
from aimichat.store.models import KeyCounter, UsageCounter, UsageEvent


def serve_env(database_url: str, data_dir: Path, upstream_url: str, **settings: object) -> dict[str, str]:
    """The environment of an `aimichat serve` over ``database_url`` whose model is the upstream at
    ``upstream_url``; ``settings`` as ``Settings`` fields (``redis_url=...`` becomes AIMICHAT_REDIS_URL).
    Nothing of the caller's own AIMICHAT_* settings leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMICHAT_")}
    env |= {
        "AIMICHAT_DATA_DIR": str(data_dir),
        "AIMICHAT_DATABASE_URL": database_url,
        "AIMICHAT_ENGINE": "upstream",
        "AIMICHAT_UPSTREAM_URL": upstream_url + "/v1",
    }
    return env | {f"AIMICHAT_{name.upper()}": str(value) for name, value in settings.items()}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """One `aimichat serve` process on a free port; its log goes to ``log_path`` (a pipe nobody reads
    would fill up and stall a long run)."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None):
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ServerProcess:
        self._log = self.log_path.open("ab")
        command = [sys.executable, "-m", "aimichat", "serve", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=self._log)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /readyz answers 200; fails at once, with its log, if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.url} not ready after {timeout} s:\n{self.log()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9: no drain, no settlement, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (drain, then exit); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def resident_kb(self) -> int:
        """Resident memory (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


# -- the ledger ----------------------------------------------------------------------------------


@dataclass
class LedgerCheck:
    """The counters against the ledger, for the keys checked."""

    charged: int = 0  # credits the ledger counts today, over every account checked
    reserved: int = 0  # rows still open (their requests running, or never settled)
    statuses: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)  # "what: counter says X, ledger says Y"

    @property
    def exact(self) -> bool:
        return not self.mismatches


def quota_for(database: Database, redis_url: str | None = None, prefix: str = "aimichat") -> QuotaBackend:
    """The counters the servers use: SQL, or Redis under ``prefix``."""
    if redis_url:
        return RedisQuota(database, redis.Redis.from_url(redis_url), prefix=prefix)
    return SqlQuota(database)


def principal_of(database: Database, secret: str) -> Principal:
    with database.connect() as conn:
        principal = keys.authenticate(conn, secret)
    assert principal is not None, "not a live key"
    return principal


def check_ledger(database: Database, quota: QuotaBackend, secrets_: list[str]) -> LedgerCheck:
    """Compare, for the accounts and capped keys of ``secrets_``, today's and this month's counters with
    the ledger. On Redis a counter that is missing (dropped by a sweep, lost with Redis) is first rebuilt
    from the ledger by a reservation of nothing, as the next request would; that reservation is released."""
    now = utcnow()
    day, month = periods.day_start(now), periods.month_start(now)
    check = LedgerCheck()
    seen: set[int] = set()
    for secret in secrets_:
        p = principal_of(database, secret)
        counted = _counted(database, quota, p, now)
        with database.session() as s:
            want = {"day": ledger.ledger_sum(s, p.account_id, day, day)}
            if p.monthly_credits is not None:
                want["month"] = ledger.ledger_sum(s, p.account_id, month, day)
            if p.limits.daily_cap is not None:
                want["key day"] = ledger.key_ledger_sum(s, p.key_id or 0, day, day)
            if p.limits.monthly_cap is not None:
                want["key month"] = ledger.key_ledger_sum(s, p.key_id or 0, month, day)
        for what, value in want.items():
            if counted.get(what) != value:
                check.mismatches.append(f"{p.account_email} {what}: counter {counted.get(what)}, ledger {value}")
        if p.account_id not in seen:
            seen.add(p.account_id)
            check.charged += want["day"]
    with database.session() as s:
        rows = s.execute(
            select(UsageEvent.status, func.count()).where(UsageEvent.account_id.in_(seen)).group_by(UsageEvent.status)
        ).all()
    check.statuses = {status: int(n) for status, n in rows}
    check.reserved = check.statuses.get("reserved", 0)
    return check


def _counted(database: Database, quota: QuotaBackend, p: Principal, now: dt.datetime) -> dict[str, int | None]:
    if isinstance(quota, RedisQuota):
        probe = quota.reserve(p, Cost(0, 0), request_id="ledger-check-" + secrets.token_hex(8), now=now)
        assert isinstance(probe, Reservation), probe
        try:
            account = quota.held_counters(p.account_id, None, now)
            key = quota.held_counters(p.account_id, p.key_id, now)
        finally:
            quota.release(probe, now=now)
        # (the probe's own row is released, not deleted: it counts nothing either way)
        return {"day": account["day"], "month": account["month"], "key day": key["day"], "key month": key["month"]}
    day, month = periods.day_start(now), periods.month_start(now)
    with database.session() as s:

        def used(period: str, start: dt.date) -> int | None:
            return s.scalar(
                select(UsageCounter.used).where(
                    UsageCounter.account_id == p.account_id,
                    UsageCounter.period == period,
                    UsageCounter.period_start == start,
                )
            )

        def key_used(kind: str, start: dt.date) -> int | None:
            row = s.execute(
                select(KeyCounter.used, KeyCounter.window_start).where(
                    KeyCounter.key_id == p.key_id, KeyCounter.kind == kind
                )
            ).first()
            if row is None:
                return None
            return int(row.used) if row.window_start.date() == start else 0  # a row of a past window counts nothing

        return {
            "day": used("day", day),
            "month": used("month", month),
            "key day": key_used("day", day),
            "key month": key_used("month", month),
        }


# -- traffic -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one request got."""

    at: float  # time.monotonic() when sent
    elapsed: float  # seconds to its end (a stream's last byte)
    status: int  # 0: no HTTP answer at all (connection refused, dropped, timed out)
    stream: bool
    complete: bool  # a 200 read to its end: [DONE] for a stream
    error: str | None = None  # the error's code: of a 4xx/5xx body, or of an error event in a stream
    retry_after: str | None = None


def ask(client: httpx.Client, url: str, key: str, *, stream: bool, max_tokens: int = 8) -> Answer:
    """One chat request, read to its end."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {key}"}
    start = time.monotonic()
    try:
        with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body | {"stream": stream}, headers=headers
        ) as answer:
            text = answer.read().decode()
    except httpx.HTTPError as exc:
        return Answer(start, time.monotonic() - start, 0, stream, False, type(exc).__name__)
    elapsed = time.monotonic() - start
    retry_after = answer.headers.get("retry-after")
    if answer.status_code != 200:
        error = _error_code(text)
        return Answer(start, elapsed, answer.status_code, stream, False, error, retry_after)
    if not stream:
        return Answer(start, elapsed, 200, stream, '"usage"' in text)
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    errors = [_error_code(e) for e in events if e.startswith('{"error"')]
    return Answer(start, elapsed, 200, stream, bool(events) and events[-1] == "[DONE]", errors[0] if errors else None)


def _error_code(text: str) -> str:
    """The ``code`` of OpenAI's error shape (``shapeless`` when the body is not in it)."""
    import json

    try:
        error = json.loads(text)["error"]
        return str(error["code"]) if error.get("message") and "type" in error else "shapeless"
    except (ValueError, KeyError, TypeError):
        return "shapeless"


class Traffic:
    """``clients`` threads sending chat requests back to back (streaming and not, taking turns between
    ``keys``) until the ``with`` block ends; ``answers`` is what they got."""

    def __init__(self, url: str, keys_: list[str], clients: int = 6, max_tokens: int = 8, timeout: float = 30):
        self.url, self.keys, self.max_tokens = url, keys_, max_tokens
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        self._timeout = timeout

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=self._timeout) as client:
            turn = index
            while not self._stop.is_set():
                key = self.keys[turn % len(self.keys)]
                self.answers.append(ask(client, self.url, key, stream=turn % 3 != 0, max_tokens=self.max_tokens))
                turn += 1

    def since(self, moment: float) -> list[Answer]:
        return [a for a in self.answers if a.at >= moment]


def unexpected(answers: list[Answer], allowed: tuple[int, ...] = (200, 429, 503)) -> list[Answer]:
    """Answers that break the rules of a fault: a status other than ``allowed``, no answer at all, a 503
    without Retry-After, an error not in OpenAI's shape."""
    return [
        a
        for a in answers
        if a.status not in allowed
        or (a.status == 503 and not (a.retry_after or "").isdigit())
        or a.error == "shapeless"
    ]


def wait_readiness(url: str, ready: bool, within: float) -> float:
    """Poll /readyz until it says ``ready`` (200) or not (503); seconds it took. Each answer must come
    within a second: readiness is answered from a cached check, never from a store that hangs."""
    start = time.monotonic()
    while True:
        asked = time.monotonic()
        status = httpx.get(f"{url}/readyz", timeout=5).status_code
        assert time.monotonic() - asked < 1.0, f"/readyz took {time.monotonic() - asked:.2f} s"
        assert status in (200, 503), status
        if (status == 200) == ready:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"/readyz not {'200' if ready else '503'} after {within} s"
        time.sleep(0.1)
