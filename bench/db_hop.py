"""One PostgreSQL statement from the event loop: through a worker thread (what the request path does) or
with SQLAlchemy's asyncio engine on psycopg's ``AsyncConnection`` (what "async drivers" would do).

    .venv/bin/python bench/db_hop.py [--requests 1000] [--rounds 2]

Both run ``SELECT 1`` on a pooled connection in autocommit, taking turns, one at a time and then 32 at once,
on uvloop when installed (as ``aimichat serve`` runs). Prints, per way and mode, the median latency, this
process's CPU time per statement (``time.process_time()``: the loop, the worker threads and the driver, not
PostgreSQL's) and statements per second, the median of the rounds; last ``async_vs_thread_cpu=`` (the async
engine's CPU per statement ÷ the thread's, 32 at once). PostgreSQL from AIMICHAT_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.concurrency import run_in_threadpool

PG_URL = os.environ.get("AIMICHAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
STATEMENT = text("SELECT 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args.requests, args.rounds))


async def run(requests: int, rounds: int) -> None:
    sync_engine = create_engine(PG_URL, pool_size=20, isolation_level="AUTOCOMMIT")
    async_engine = create_async_engine(PG_URL, pool_size=20, isolation_level="AUTOCOMMIT")

    def in_thread() -> object:
        with sync_engine.connect() as conn:
            return conn.execute(STATEMENT).scalar()

    async def thread_hop() -> object:
        return await run_in_threadpool(in_thread)

    async def async_driver() -> object:
        async with async_engine.connect() as conn:
            return (await conn.execute(STATEMENT)).scalar()

    ways: dict[str, Callable[[], Awaitable[object]]] = {"thread": thread_hop, "async": async_driver}
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for way in ways.values():  # warm the pools
        await measure(way, 100, 32)
    for _ in range(rounds):
        for clients in (1, 32):
            for name, way in ways.items():
                results.setdefault((name, clients), []).append(await measure(way, requests, clients))
    for (name, clients), runs in results.items():
        p50, cpu, rate = (statistics.median(column) for column in zip(*runs))
        print(f"{name:<6} {clients:>2} at once: p50 {p50:.3f} ms, CPU {cpu:.3f} ms a statement, {rate:.0f}/s")
    cpu = {key: statistics.median(run[1] for run in runs) for key, runs in results.items()}
    print(f"async_vs_thread_cpu={cpu[('async', 32)] / cpu[('thread', 32)]:.2f}")
    sync_engine.dispose()
    await async_engine.dispose()


async def measure(way: Callable[[], Awaitable[object]], requests: int, clients: int) -> tuple[float, float, float]:
    """(median latency in ms, CPU ms a statement, statements a second) of ``requests`` from ``clients``."""
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(requests // clients):
            start = time.perf_counter()
            await way()
            latencies.append(time.perf_counter() - start)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = len(latencies)
    return statistics.median(latencies) * 1000, cpu / done * 1000, done / wall


if __name__ == "__main__":
    main()
