"""The upstream engine alone against the zero-latency stub: CPU per request and requests/s.

    .venv/bin/python bench/upstream_client.py [--requests 2000] [--rounds 3] [--clients aiohttp,httpx]

``stub_upstream.py`` runs in its own process; this one drives ``UpstreamEngine.generate`` directly (no API,
no credits) on uvloop when installed, as ``aimichat serve`` does. For each client (``AIMICHAT_UPSTREAM_HTTP``)
and round, taking turns: ``--requests`` streamed requests one after another, then as many with 32 at once.
``time.process_time()`` counts this process's CPU only, so the stub's does not enter. Prints a line per client
and mode (the median of the rounds) and last ``upstream_cpu_ms_per_request=`` (the first client, sequential).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from aimichat.engines.base import Message, SamplingParams
from aimichat.engines.openai_upstream import UpstreamEngine
from aimichat.engines.upstream_http import HttpClientKind

CONCURRENCY = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("the stub upstream did not start")


async def one(engine: UpstreamEngine, params: SamplingParams) -> int:
    prompt = await engine.prepare([Message("user", "hi")])
    events = 0
    async for _ in engine.generate(prompt, params):
        events += 1
    return events


async def sequential(engine: UpstreamEngine, requests: int) -> tuple[float, float]:
    """(CPU ms a request, requests/s) for one request at a time."""
    params = SamplingParams(max_tokens=16)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        assert await one(engine, params) == 6  # five words and the finish
    return (time.process_time() - cpu) * 1000 / requests, requests / (time.perf_counter() - wall)


async def concurrent(engine: UpstreamEngine, requests: int) -> tuple[float, float]:
    """(CPU ms a request, requests/s) with CONCURRENCY requests in flight."""
    params = SamplingParams(max_tokens=16)
    left = requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(engine, params)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return (time.process_time() - cpu) * 1000 / requests, requests / (time.perf_counter() - wall)


async def measure(url: str, kinds: list[HttpClientKind], requests: int, rounds: int) -> dict[str, list[float]]:
    engines = {kind: UpstreamEngine(url, http_client=kind) for kind in kinds}
    results: dict[str, list[float]] = {}
    try:
        for engine in engines.values():
            await engine.start()
            await sequential(engine, 200)  # warm-up: connections, caches
        for _ in range(rounds):
            for kind, engine in engines.items():
                for mode, run in (("sequential", sequential), (f"{CONCURRENCY}_at_once", concurrent)):
                    cpu_ms, rps = await run(engine, requests)
                    results.setdefault(f"{kind} {mode} cpu_ms", []).append(cpu_ms)
                    results.setdefault(f"{kind} {mode} req_s", []).append(rps)
    finally:
        for engine in engines.values():
            await engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="aiohttp,httpx")
    args = parser.parse_args()
    kinds: list[HttpClientKind] = []
    for name in args.clients.split(","):
        if name not in ("aiohttp", "httpx"):
            parser.error(f"unknown client {name!r}")
        kinds.append("aiohttp" if name == "aiohttp" else "httpx")
    port = free_port()
    stub = Path(__file__).with_name("stub_upstream.py")
    process = subprocess.Popen([sys.executable, str(stub), "--port", str(port)])
    try:
        wait_for_port(port)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        results = runner(measure(f"http://127.0.0.1:{port}/v1", kinds, args.requests, args.rounds))
    finally:
        process.terminate()
        process.wait(timeout=10)
    for name, values in results.items():
        print(f"{name}: {statistics.median(values):.3f} (rounds: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"upstream_cpu_ms_per_request={statistics.median(results[f'{kinds[0]} sequential cpu_ms']):.3f}")


if __name__ == "__main__":
    main()
