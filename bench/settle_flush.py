"""What a settlement's WAL flush costs on PostgreSQL: reserve + settle, durable against not (issue 14).

    .venv/bin/python bench/settle_flush.py [--requests 400] [--rounds 5]

One account on a fresh database of the local PostgreSQL server (the tests' ``AIMICHAT_TEST_POSTGRES_URL``); each
round runs ``--requests`` reserve-and-settle pairs through ``SqlQuota`` with ``durable_settlements`` on, then
as many with it off, taking turns, and prints the median milliseconds a pair took. The last line is
``settle_flush_saved_ms=``: the median of the rounds' differences.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]

from aimichat.accounts import service as accounts  # noqa: E402
from aimichat.keys.service import principal_for  # noqa: E402
from aimichat.quota.backends import SqlQuota  # noqa: E402
from aimichat.quota.ledger import Reservation  # noqa: E402
from aimichat.quota.pricing import Cost  # noqa: E402
from fixtures import make_account, migrated, new_postgres_database  # noqa: E402


def pair_ms(quota: SqlQuota, principal, n: int) -> float:
    times = []
    for _ in range(n):
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        started = time.perf_counter()
        granted = quota.reserve(principal, Cost(1, 1), request_id=secrets.token_hex(8), now=now)
        assert isinstance(granted, Reservation)
        quota.settle(granted, credits=1, prompt_tokens=5, completion_tokens=5, now=now)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    url, drop = new_postgres_database()
    database = migrated(url)
    try:
        make_account(database, daily=10_000_000)
        with database.session() as session:
            principal = principal_for(accounts.get_account(session, "user@example.com"))
        durable, relaxed = SqlQuota(database, durable_settlements=True), SqlQuota(database)
        pair_ms(relaxed, principal, 50)  # warm the pool and the statement cache
        saved = []
        for round_ in range(args.rounds):
            on, off = pair_ms(durable, principal, args.requests), pair_ms(relaxed, principal, args.requests)
            saved.append(on - off)
            print(f"round {round_ + 1}: reserve+settle p50 {on:.3f} ms waiting for the flush, {off:.3f} ms not")
        print(f"settle_flush_saved_ms={statistics.median(saved):.3f}")
    finally:
        database.dispose()
        drop()


if __name__ == "__main__":
    main()
