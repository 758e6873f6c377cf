"""A soak: real `aimichat serve` processes on PostgreSQL at ~80% of their measured capacity for a while.

    .venv/bin/python bench/soak.py [--seconds 600] [--servers 2] [--load 0.8] [--redis]

Two server processes (``--servers``) share a new PostgreSQL database (and Redis counters with
``--redis``); their model is ``tests/faults/slow_upstream.py`` in its own process (12 tokens, 10 ms
apart), as the scripted engine cannot be given to a subprocess. First the capacity is measured: 32
clients back to back for ``--capacity-seconds``, answers a second. Then requests arrive at ``--load``
times that rate (paced, not back to back) for ``--seconds``: half streaming, one in ten a client that
hangs up after the first token, spread over a per-request account, a per-token one (its key capped)
and a small one (50 credits a day) that soon gets 429s.

It reports the requests, the answers by status (only 200, 429 and 503 are allowed), the servers'
resident memory and open descriptors at the start and the end, and whether the ledger is exact at the
end (no row left ``reserved``, every counter equal to the ledger: tests/faults/fleet.py), as
``name=value`` lines, the last ``soak_ok=``. ``tests/faults/test_soak_short.py`` runs 20 s of it in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "faults")]

from fleet import ServerProcess, check_ledger, free_port, quota_for, serve_env  # noqa: E402

from aimichat.accounts import service as accounts  # noqa: E402
from aimichat.app import prepare_database  # noqa: E402
from aimichat.config import Settings  # noqa: E402
from aimichat.keys import service as keys  # noqa: E402
from aimichat.store.db import Database  # noqa: E402

PG_URL = os.environ.get("AIMICHAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIMICHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ALLOWED = {200, 429, 503}
MAX_IN_FLIGHT = 120  # per run; the servers allow 64 connections an address each


@dataclass
class Report:
    seconds: float
    capacity: float  # answers a second, 32 clients back to back
    rate: float  # requests a second sent during the soak
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "0": no HTTP answer
    hung_up: int = 0  # clients that hung up after the first token, on purpose
    memory_kb: dict[str, list[int]] = field(default_factory=dict)  # per server: [start, end]
    fds: dict[str, list[int]] = field(default_factory=dict)
    reserved_left: int = 0
    ledger_exact: bool = False
    mismatches: list[str] = field(default_factory=list)

    @property
    def unexpected(self) -> dict[str, int]:
        return {s: n for s, n in self.statuses.items() if int(s) not in ALLOWED}

    @property
    def ok(self) -> bool:
        return not self.unexpected and self.ledger_exact and self.reserved_left == 0


def new_database() -> tuple[str, str]:
    """A new, empty PostgreSQL database: its URL and name."""
    base = make_url(PG_URL)
    name = f"aimichat_soak_{os.getpid()}_{int(time.time())}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return base.set(database=name).render_as_string(hide_password=False), name


def drop_database(name: str) -> None:
    admin = make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_keys(db: Database) -> list[str]:
    """A per-request account, a per-token one with a capped key, and a small one: their keys."""
    plans = [
        ("req@example.com", {"daily_credits": 10_000_000}, {}),
        (
            "tok@example.com",
            {"daily_credits": 100_000_000, "cost_rule": "per_token", "credits_per_1k_tokens": 1000},
            {"daily_cap": 90_000_000},
        ),
        ("small@example.com", {"daily_credits": 50}, {}),
    ]
    secrets = []
    with db.session() as s:
        for email, tier, caps in plans:
            name = "soak-" + email.split("@")[0]
            accounts.set_tier(s, name, **tier)  # type: ignore[arg-type]
            account = accounts.create_account(s, email, "correct horse", tier=name)
            secrets.append(keys.create_key(s, account, "soak", keys.KeyLimits(**caps)).secret)
        s.commit()
    return secrets


async def one(client: httpx.AsyncClient, url: str, key: str, stream: bool, hang_up: bool) -> int:
    """One request, read to its end (or until the first token, for a client that hangs up): its status."""
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as answer:
            async for line in answer.aiter_lines():
                if hang_up and '"content":"w' in line.replace(" ", ""):
                    break  # leaving the block closes the connection mid-stream
            return answer.status_code
    except httpx.HTTPError:
        return 0


def pick(rng: random.Random, secrets: list[str]) -> tuple[str, bool, bool]:
    """A key (45% per request, 45% per token, 10% the small account), streaming or not, hanging up or not."""
    roll = rng.random()
    key = secrets[0] if roll < 0.45 else secrets[1] if roll < 0.9 else secrets[2]
    stream = rng.random() < 0.5
    return key, stream, stream and rng.random() < 0.2  # one request in ten hangs up mid-stream


async def measure_capacity(urls: list[str], secrets: list[str], seconds: float) -> float:
    """Answers a second with 32 clients sending back to back (the capacity the soak runs at a share of)."""
    rng = random.Random(1)
    done = 0
    deadline = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            key, stream, _ = pick(rng, [*secrets[:2], secrets[0]])  # no 429s: they would flatter the figure
            await one(client, urls[index % len(urls)], key, stream, False)
            done += 1

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client, i) for i in range(32)))
        return done / (time.monotonic() - start)


async def soak(urls: list[str], secrets: list[str], rate: float, seconds: float, report: Report) -> None:
    """Send ``rate`` requests a second (paced) for ``seconds``; count the answers into ``report``."""
    rng = random.Random(2)
    statuses: Counter[str] = Counter()
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def send(index: int) -> None:
            key, stream, hang_up = pick(rng, secrets)
            statuses[str(await one(client, urls[index % len(urls)], key, stream, hang_up))] += 1
            report.hung_up += hang_up

        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate)
            while sent < due and len(in_flight) < MAX_IN_FLIGHT:
                task = asyncio.create_task(send(sent))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*in_flight)
    report.requests = sent
    report.statuses = dict(sorted(statuses.items()))


def run(
    seconds: float, servers: int = 2, load: float = 0.8, capacity_seconds: float = 10, redis: bool = False
) -> Report:
    """The whole soak (see the module docstring); the servers, the upstream and the database are gone after."""
    url, name = new_database()
    db = Database(url)
    work = Path(tempfile.mkdtemp(prefix="aimichat-soak-"))
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "faults" / "slow_upstream.py"), "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fleet: list[ServerProcess] = []
    prefix = f"aimichat-soak-{os.getpid()}"
    try:
        prepare_database(db, Settings(data_dir=work, database_url=url))
        secrets = make_keys(db)
        counters = {"redis_url": REDIS_URL, "redis_prefix": prefix} if redis else {}
        env = serve_env(url, work, f"http://127.0.0.1:{upstream_port}", **counters)
        fleet = [ServerProcess(env, work / f"server{i}.log").start() for i in range(servers)]
        for server in fleet:
            server.wait_ready()
        urls = [s.url for s in fleet]
        capacity = asyncio.run(measure_capacity(urls, secrets, capacity_seconds))
        report = Report(seconds=seconds, capacity=round(capacity, 1), rate=round(capacity * load, 1))
        start = {s.url: (s.resident_kb(), s.open_fds()) for s in fleet}  # after the warm-up
        asyncio.run(soak(urls, secrets, capacity * load, seconds, report))
        time.sleep(1.0)  # hung-up streams settle once their server sees the client gone
        for s in fleet:
            report.memory_kb[s.url] = [start[s.url][0], s.resident_kb()]
            report.fds[s.url] = [start[s.url][1], s.open_fds()]
        check = check_ledger(db, quota_for(db, REDIS_URL if redis else None, prefix), secrets)
        report.reserved_left, report.ledger_exact, report.mismatches = check.reserved, check.exact, check.mismatches
        for s in fleet:
            assert s.stop() == 0, s.log()[-2000:]
        return report
    finally:
        for s in fleet:
            s.kill()
        upstream.kill()
        upstream.wait()
        db.dispose()
        drop_database(name)
        if redis:
            import redis as redis_client

            client = redis_client.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(f"{prefix}:*"):
                client.delete(key)
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured capacity to run at")
    parser.add_argument("--capacity-seconds", type=float, default=10)
    parser.add_argument("--redis", action="store_true", help="credit counters in Redis")
    args = parser.parse_args()
    report = run(args.seconds, args.servers, args.load, args.capacity_seconds, args.redis)
    print(json.dumps(asdict(report), indent=2))
    print(f"soak_requests={report.requests}")
    print(f"soak_statuses={json.dumps(report.statuses)}")
    for server, (before, after) in report.memory_kb.items():
        print(f"soak_rss_mb {server}: {before / 1024:.1f} -> {after / 1024:.1f}")
    for server, (before, after) in report.fds.items():
        print(f"soak_fds {server}: {before} -> {after}")
    print(f"soak_ledger_exact={report.ledger_exact} reserved_left={report.reserved_left}")
    print(f"soak_ok={report.ok}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
