"""What AimiChat adds to each request: the same requests straight to a zero-latency upstream and through
AimiChat (key auth + credit reservation + settlement + proxying), in one run.

    .venv/bin/python bench/gateway.py [--requests 400] [--backends sqlite,postgresql,redis]

For each backend (SQLite; PostgreSQL; PostgreSQL ledger + Redis counters) it measures, non-streaming
and streaming: sequential latency (p50/p99, requests interleaved so drift hits both sides alike),
throughput with 32 concurrent clients, and p99 at a paced 200 requests/s. It prints the added
latency and as its last line ``gateway_overhead_ms_p50=<value>`` for PostgreSQL, sequential, non-streaming.
Every server runs in its own process; PostgreSQL and Redis come from AIMICHAT_TEST_POSTGRES_URL /
AIMICHAT_TEST_REDIS_URL (default 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
from sqlalchemy.engine import make_url

HERE = Path(__file__).parent
PG_URL = os.environ.get("AIMICHAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIMICHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BODY = {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.args}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server did not start: {proc.args}")


@contextmanager
def process(args: list[str], env: dict, url: str, ready_path: str):
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc, ready_path)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def postgres_database():
    base = make_url(PG_URL)
    name = "aimichat_bench_" + secrets.token_hex(4)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def gateway(backend: str, upstream: str, data_dir: str):
    """AimiChat in front of the stub, with an account that will not run out of credits; yields (url, key)."""
    with postgres_database() if backend != "sqlite" else _nothing() as pg_url:
        env = {**os.environ, "AIMICHAT_DATA_DIR": data_dir, "AIMICHAT_ENGINE": "upstream", "AIMICHAT_UPSTREAM_URL": upstream}
        if pg_url:
            env["AIMICHAT_DATABASE_URL"] = pg_url
        if backend == "redis":
            env.update(AIMICHAT_REDIS_URL=REDIS_URL, AIMICHAT_REDIS_PREFIX="aimichat-bench-" + secrets.token_hex(4))
        cli = [sys.executable, "-m", "aimichat"]
        run = lambda *a: subprocess.run([*cli, *a], env=env, check=True, capture_output=True, text=True).stdout  # noqa: E731
        run("tiers", "set", "bench", "--daily-credits", "100000000")
        run("accounts", "create", f"bench-{backend}@example.com", "--password", "bench-password", "--tier", "bench")
        key = run("keys", "create", f"bench-{backend}@example.com", "--name", "bench").strip().splitlines()[-1]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with process([*cli, "serve", "--port", str(port), "--log-level", "warning"], env, url, "/readyz"):
            yield url, key


@contextmanager
def _nothing():
    yield None


def one(client: httpx.Client, url: str, key: str | None, stream: bool) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**BODY, "stream": True} if stream else BODY
    start = time.perf_counter()
    if stream:
        with client.stream("POST", url, json=body, headers=headers) as r:
            for _ in r.iter_bytes():
                pass
    else:
        r = client.post(url, json=body, headers=headers)
    assert r.status_code == 200, r.status_code
    return (time.perf_counter() - start) * 1000


def sequential(direct: str, through: str, key: str, n: int, stream: bool) -> tuple[list[float], list[float]]:
    d, t = [], []
    with httpx.Client(timeout=30) as c:
        for _ in range(20):  # warm up connections and caches
            one(c, direct, None, stream)
            one(c, through, key, stream)
        for _ in range(n):
            d.append(one(c, direct, None, stream))
            t.append(one(c, through, key, stream))
    return d, t


async def _concurrent(url: str, key: str | None, n: int, clients: int, stream: bool) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**BODY, "stream": True} if stream else BODY
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        queue = list(range(n))

        async def worker():
            while queue:
                queue.pop()
                r = await client.post(url, json=body, headers=headers)
                assert r.status_code == 200, r.status_code

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return n / (time.perf_counter() - start)


async def _paced(url: str, key: str | None, rate: int, seconds: float, stream: bool) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {**BODY, "stream": True} if stream else BODY
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:

        async def shot():
            start = time.perf_counter()
            try:
                r = await client.post(url, json=body, headers=headers)
                ok = r.status_code == 200
            except httpx.HTTPError:  # past capacity a paced run overloads the server: count, don't crash
                ok = False
            latencies.append((time.perf_counter() - start) * 1000 if ok else float("inf"))

        tasks = []
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(shot()))
        await asyncio.gather(*tasks)
    return latencies


def pct(values: list[float], q: float) -> float:
    """Percentile; failed requests count as infinitely slow."""
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--backends", default="sqlite,postgresql,redis")
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    args = parser.parse_args()
    stub_port = free_port()
    stub = f"http://127.0.0.1:{stub_port}"
    direct = f"{stub}/v1/chat/completions"
    results = {}
    with process([sys.executable, str(HERE / "stub_upstream.py"), "--port", str(stub_port)], dict(os.environ), stub, "/v1/models"):
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory() as data_dir, gateway(backend, stub, data_dir) as (url, key):
                through = f"{url}/v1/chat/completions"
                for stream in (False, True):
                    mode = "stream" if stream else "plain"
                    d, t = sequential(direct, through, key, args.requests, stream)
                    rps_d = asyncio.run(_concurrent(direct, None, args.requests, 32, stream))
                    rps_t = asyncio.run(_concurrent(through, key, args.requests, 32, stream))
                    paced_d = asyncio.run(_paced(direct, None, 200, args.paced_seconds, stream))
                    paced_t = asyncio.run(_paced(through, key, 200, args.paced_seconds, stream))
                    row = {
                        "p50_added": statistics.median(t) - statistics.median(d),
                        "p99_added": pct(t, 99) - pct(d, 99),
                        "p50_direct": statistics.median(d),
                        "rps_direct": rps_d,
                        "rps_through": rps_t,
                        "paced200_p99_added": pct(paced_t, 99) - pct(paced_d, 99),
                    }
                    results[(backend, mode)] = row
                    print(f"{backend:<10} {mode:<6} added p50={row['p50_added']:6.2f} ms  p99={row['p99_added']:6.2f} ms  "
                          f"(direct p50 {row['p50_direct']:5.2f} ms)  32 clients: {rps_t:7.1f} req/s vs direct {rps_d:7.1f}  "
                          f"@200 req/s p99 added={row['paced200_p99_added']:6.2f} ms", flush=True)
    key = ("postgresql", "plain") if ("postgresql", "plain") in results else next(iter(results))
    print(f"gateway_overhead_ms_p50={results[key]['p50_added']:.2f}")


if __name__ == "__main__":
    main()
