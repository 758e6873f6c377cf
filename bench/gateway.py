"""What AimiChat adds to each request, against a bare proxy: the same requests straight to a zero-latency
upstream, through a bare proxy (bench/bare_proxy.py) and through AimiChat (key auth + credit reservation +
settlement + proxying), in one run.

    .venv/bin/python bench/gateway.py [--requests 400] [--backends sqlite,postgresql,redis] [--py-spy DIR]
                                      [--paced-seconds 5] [--models 20] [--key-limits]

For each backend (SQLite; PostgreSQL; PostgreSQL ledger + Redis counters) it measures, non-streaming
and streaming: sequential latency (p50/p99; the targets take turns request by request, in rotating
order, so drift hits all alike), throughput with 32 concurrent clients (in four slices that take turns
too), and p99 at a paced 200 requests/s. The bare proxy (Starlette + one pooled httpx client, no auth,
no ledger, served by uvicorn with AimiChat's options) is the baseline: what any Python proxy adds.
LiteLLM's proxy (its master key only: no database, no budgets) is measured too when ``litellm`` is
importable (the ``bench`` extra). "Added" is a target's median (p99) minus the direct one's.

It prints a line per backend, mode and target, then a table with the ratios, then
``gateway_overhead_ratio=`` (AimiChat added p50 ÷ bare proxy added p50), ``gateway_throughput_ratio=``
(AimiChat req/s ÷ bare proxy req/s at 32 clients), ``gateway_cpu_ratio=`` (the CPU time its server
process spends per request at 32 clients, ÷ the bare proxy's; each line and the table also give the
whole machine's CPU per request and PostgreSQL's, i.e. every ``postgres`` process here) and, last,
``gateway_overhead_ms_p50=<value>``: all for PostgreSQL, non-streaming (sequential for the latencies).

``--models N``: a second AimiChat (same backend) with N models in its registry (aimichat-1 and N-1
upstream models, each with its own price on the tier) takes its turn beside the first, its requests
naming the last model added; ``models_overhead_ratio=`` is its added p50 ÷ the one-model gateway's.

``--key-limits``: a second key of the same account on the same gateway, with a daily cap, a monthly
cap, requests and tokens per minute (all far above what the run uses, so nothing is refused), takes its
turn beside the unlimited key; ``key_limits_added_ms=`` is its added p50 minus the unlimited key's.

``--py-spy DIR``: after the timed passes of each backend, record AimiChat's server with py-spy
(the ``bench`` extra) during an extra 32-client non-streaming pass, as DIR/<backend>.txt (``py-spy
record --format raw --threads``: folded stacks, one line per stack and thread; feed them to a flame graph
tool or grep them). Not during the timed passes, which it would slow. On a VM py-spy may not tell idle
threads from busy ones: read the MainThread lines (the event loop), and the worker threads' lines that
are not waiting in ``Queue.get``.

Every server runs in its own process; PostgreSQL and Redis come from AIMICHAT_TEST_POSTGRES_URL /
AIMICHAT_TEST_REDIS_URL (default 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from sqlalchemy.engine import make_url

HERE = Path(__file__).parent
PG_URL = os.environ.get("AIMICHAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AIMICHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BODY = {"messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 16}
CLIENTS = 32
PACED_RATE = 200
HEADLINE = ("postgresql", "plain")
MANY = "AimiChat N models"
LIMITED = "AimiChat limited key"


@dataclass
class Target:
    """One way to the stub: its chat URL, and what a request to it carries."""

    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # added to the body (LiteLLM routes on "model")
    pid: int | None = None  # the server's process, whose CPU time per request the throughput pass measures

    def body(self, stream: bool) -> dict:
        return {**BODY, **self.extra, **({"stream": True} if stream else {})}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy so far (every process: the client, the servers, PostgreSQL)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def database_cpu() -> dict[int, float]:
    """CPU time so far of each PostgreSQL process on this machine (its server, one backend per connection)."""
    spent = {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "postgres":
                spent[int(comm.parent.name)] = cpu_seconds(int(comm.parent.name))
        except OSError:
            continue  # gone meanwhile
    return spent


def database_cpu_since(before: dict[int, float]) -> float:
    """PostgreSQL's CPU seconds since ``before`` (a backend started meanwhile counts whole; one that ended is lost)."""
    return sum(now - before.get(pid, 0.0) for pid, now in database_cpu().items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
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
def process(args: list[str], env: dict, url: str, ready_path: str, seconds: float = 60):
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc, ready_path, seconds)
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
def gateway(backend: str, upstream: str, data_dir: str, models: int = 1, limited_key: list | None = None):
    """AimiChat in front of the stub, with an account that will not run out of credits and ``models``
    models in its registry (priced per request); yields (url, key, pid). With ``limited_key`` (a list),
    a second key with caps and per-minute limits is made and appended to it."""
    with postgres_database() if backend != "sqlite" else _nothing() as pg_url:
        env = {
            **os.environ,
            "AIMICHAT_DATA_DIR": data_dir,
            "AIMICHAT_ENGINE": "upstream",
            "AIMICHAT_UPSTREAM_URL": upstream,
        }
        if pg_url:
            env["AIMICHAT_DATABASE_URL"] = pg_url
        if backend == "redis":
            env.update(AIMICHAT_REDIS_URL=REDIS_URL, AIMICHAT_REDIS_PREFIX="aimichat-bench-" + secrets.token_hex(4))
        cli = [sys.executable, "-m", "aimichat"]
        run = lambda *a: subprocess.run([*cli, *a], env=env, check=True, capture_output=True, text=True).stdout  # noqa: E731
        run("tiers", "set", "bench", "--daily-credits", "100000000")
        run("accounts", "create", f"bench-{backend}@example.com", "--password", "bench-password", "--tier", "bench")
        for i in range(1, models):
            run("models", "add", f"bench-{i}", "--upstream", upstream)
            run("prices", "set", "bench", f"bench-{i}", "--per-request", "1")
        key = run("keys", "create", f"bench-{backend}@example.com", "--name", "bench").strip().splitlines()[-1]
        if limited_key is not None:
            limits = ["--daily-cap", "50000000", "--monthly-cap", "90000000", "--rpm", "1000000", "--tpm", "900000000"]
            made = run("keys", "create", f"bench-{backend}@example.com", "--name", "limited", *limits)
            limited_key.append(made.strip().splitlines()[-1])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with process([*cli, "serve", "--port", str(port), "--log-level", "warning"], env, url, "/readyz") as proc:
            yield url, key, proc.pid


@contextmanager
def _nothing():
    yield None


@contextmanager
def bare_proxy(stub: str):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, str(HERE / "bare_proxy.py"), "--port", str(port), "--upstream", stub]
    with process(args, dict(os.environ), url, "/v1/models") as proc:
        yield Target("bare proxy", f"{url}/v1/chat/completions", pid=proc.pid)


@contextmanager
def litellm_proxy(stub: str, workdir: str):
    """LiteLLM's proxy in front of the stub, one worker, for the record; yields None when litellm is absent."""
    if importlib.util.find_spec("litellm") is None:
        print(
            "litellm is not importable: LiteLLM's proxy is skipped (.venv/bin/pip install -e '.[bench]' to include it)",
            flush=True,
        )
        yield None
        return
    config = Path(workdir) / "litellm.yaml"
    master_key = "sk-bench-" + secrets.token_hex(16)  # LiteLLM 1.108 refuses to start without one
    config.write_text(
        "model_list:\n"
        "  - model_name: stub\n"
        "    litellm_params:\n"
        "      model: openai/stub\n"
        f"      api_base: {stub}/v1\n"
        "      api_key: bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        sys.executable,
        "-c",
        "from litellm.proxy.proxy_cli import run_server; run_server()",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    # Its model price list from the wheel: fetching it from GitHub (no internet here) costs retries at start-up.
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    with process(args, env, url, "/health/liveliness", seconds=180) as proc:
        headers = {"Authorization": f"Bearer {master_key}"}
        yield Target("LiteLLM", f"{url}/v1/chat/completions", headers, extra={"model": "stub"}, pid=proc.pid)


def one(client: httpx.Client, target: Target, stream: bool) -> float:
    start = time.perf_counter()
    if stream:
        with client.stream("POST", target.url, json=target.body(True), headers=target.headers) as r:
            for _ in r.iter_bytes():
                pass
    else:
        r = client.post(target.url, json=target.body(False), headers=target.headers)
    assert r.status_code == 200, (target.name, r.status_code)
    return (time.perf_counter() - start) * 1000


def sequential(targets: list[Target], n: int, stream: bool) -> dict[str, list[float]]:
    """n requests to each target, taking turns; the order rotates so that none always follows another."""
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    with httpx.Client(timeout=30) as c:
        for _ in range(20):  # warm up connections and caches
            for t in targets:
                one(c, t, stream)
        for i in range(n):
            k = i % len(targets)
            for t in targets[k:] + targets[:k]:
                times[t.name].append(one(c, t, stream))
    return times


async def _concurrent(target: Target, n: int, clients: int, stream: bool) -> float:
    """n requests from ``clients`` concurrent clients; requests per second."""
    body = target.body(stream)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        queue = list(range(n))

        async def worker():
            while queue:
                queue.pop()
                r = await client.post(target.url, json=body, headers=target.headers)
                assert r.status_code == 200, (target.name, r.status_code)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return n / (time.perf_counter() - start)


def throughput(
    targets: list[Target], n: int, stream: bool, rounds: int = 4
) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:
    """Requests per second at 32 clients, n requests per target in ``rounds`` slices that take turns
    (rotating order), so a burst of load from elsewhere on the machine does not land on one target only;
    the CPU time its server process spent per request meanwhile (ms; 0 when its process is unknown), and
    the whole machine's (the client, the stub and PostgreSQL included), and PostgreSQL's. The CPU times are the steadier
    figures on a small machine: req/s also moves with what else runs."""
    seconds = dict.fromkeys((t.name for t in targets), 0.0)
    cpu = dict.fromkeys((t.name for t in targets), 0.0)
    machine = dict.fromkeys((t.name for t in targets), 0.0)
    database = dict.fromkeys((t.name for t in targets), 0.0)
    per_round = max(CLIENTS, n // rounds)
    for i in range(rounds):
        k = i % len(targets)
        for t in targets[k:] + targets[:k]:
            before, machine_before, database_before = cpu_seconds(t.pid), machine_cpu_seconds(), database_cpu()
            seconds[t.name] += per_round / asyncio.run(_concurrent(t, per_round, CLIENTS, stream))
            cpu[t.name] += cpu_seconds(t.pid) - before
            machine[t.name] += machine_cpu_seconds() - machine_before
            database[t.name] += database_cpu_since(database_before)
    total = per_round * rounds
    per_request = lambda spent: {name: c * 1000 / total for name, c in spent.items()}  # noqa: E731
    rates = {name: total / s for name, s in seconds.items()}
    return rates, per_request(cpu), per_request(machine), per_request(database)


async def _paced(target: Target, rate: int, seconds: float, stream: bool) -> list[float]:
    body = target.body(stream)
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:

        async def shot():
            start = time.perf_counter()
            try:
                r = await client.post(target.url, json=body, headers=target.headers)
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


def pct(values: list[float], q: int) -> float:
    """Percentile; failed requests count as infinitely slow."""
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


@contextmanager
def py_spy(pid: int, out: Path):
    """py-spy recording ``pid`` until the block ends (SIGINT makes it write its file)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise SystemExit("--py-spy: py-spy is not installed (.venv/bin/pip install -e '.[bench]')")
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def measure(targets: list[Target], args: argparse.Namespace, stream: bool) -> dict[str, dict[str, float]]:
    """Per target: sequential p50/p99, req/s at 32 clients, p99 at a paced 200 req/s."""
    seq = sequential(targets, args.requests, stream)
    rps, cpu, machine, database = throughput(targets, args.requests, stream)
    paced = {t.name: asyncio.run(_paced(t, PACED_RATE, args.paced_seconds, stream)) for t in targets}
    return {
        t.name: {
            "p50": statistics.median(seq[t.name]),
            "p99": pct(seq[t.name], 99),
            "rps": rps[t.name],
            "cpu": cpu[t.name],
            "machine": machine[t.name],
            "database": database[t.name],
            "paced_p99": pct(paced[t.name], 99),
        }
        for t in targets
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--backends", default="sqlite,postgresql,redis")
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="record AimiChat with py-spy into DIR/<backend>.txt")
    parser.add_argument("--models", type=int, default=1, help="also measure a gateway with this many models")
    parser.add_argument("--key-limits", action="store_true", help="also measure a key with caps and rate limits")
    args = parser.parse_args()
    stub_port = free_port()
    stub = f"http://127.0.0.1:{stub_port}"
    direct = Target("direct", f"{stub}/v1/chat/completions")
    results: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    print(
        f"{args.requests} requests per measurement, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
        "(other processes' load moves every figure)",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory() as workdir,
        process(
            [sys.executable, str(HERE / "stub_upstream.py"), "--port", str(stub_port)],
            dict(os.environ),
            stub,
            "/v1/models",
        ),
        bare_proxy(stub) as bare,
        litellm_proxy(stub, workdir) as litellm,
    ):
        baselines = [direct, bare] + ([litellm] if litellm else [])
        for backend in args.backends.split(","):
            limited: list[str] = []
            with (
                tempfile.TemporaryDirectory() as data_dir,
                gateway(backend, stub, data_dir, limited_key=limited if args.key_limits else None) as (url, key, pid),
                tempfile.TemporaryDirectory() as many_dir,
                gateway(backend, stub, many_dir, args.models) if args.models > 1 else _nothing() as many,
            ):
                aimichat = Target("AimiChat", f"{url}/v1/chat/completions", {"Authorization": f"Bearer {key}"}, pid=pid)
                targets = [*baselines, aimichat]
                if limited:
                    headers = {"Authorization": f"Bearer {limited[0]}"}
                    targets.append(Target(LIMITED, f"{url}/v1/chat/completions", headers))
                if many:
                    many_url, many_key, _ = many
                    headers = {"Authorization": f"Bearer {many_key}"}
                    extra = {"model": f"bench-{args.models - 1}"}
                    targets.append(Target(MANY, f"{many_url}/v1/chat/completions", headers, extra))
                for stream in (False, True):
                    mode = "stream" if stream else "plain"
                    row = results[(backend, mode)] = measure(targets, args, stream)
                    d = row["direct"]
                    for t in targets[1:]:
                        r = row[t.name]
                        print(
                            f"{backend:<10} {mode:<6} {t.name:<10} added p50={r['p50'] - d['p50']:6.2f} ms  "
                            f"p99={r['p99'] - d['p99']:6.2f} ms  (direct p50 {d['p50']:5.2f} ms)  "
                            f"{CLIENTS} clients: {r['rps']:7.1f} req/s vs direct {d['rps']:7.1f}, "
                            f"CPU {r['cpu']:.2f} ms/request (machine {r['machine']:.2f}, "
                            f"PostgreSQL {r['database']:.2f})  "
                            f"@{PACED_RATE} req/s p99 added={r['paced_p99'] - d['paced_p99']:8.2f} ms",
                            flush=True,
                        )
                if args.py_spy:
                    args.py_spy.mkdir(parents=True, exist_ok=True)
                    with py_spy(pid, args.py_spy / f"{backend}.txt"):
                        asyncio.run(_concurrent(aimichat, 4 * args.requests, CLIENTS, False))

    print()
    print(
        "| backend | mode | AimiChat added p50 | bare proxy added p50 | overhead ratio | AimiChat added p99 "
        "| AimiChat req/s | bare proxy req/s | direct req/s | throughput ratio "
        "| CPU ms/request AimiChat / bare (machine) | PostgreSQL CPU ms/request AimiChat "
        "| @200 req/s p99 added AimiChat / bare |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (backend, mode), row in results.items():
        d, a, b = row["direct"], row["AimiChat"], row["bare proxy"]
        print(
            f"| {backend} | {mode} | {a['p50'] - d['p50']:.2f} ms | {b['p50'] - d['p50']:.2f} ms "
            f"| {ratio(a['p50'] - d['p50'], b['p50'] - d['p50']):.2f} | {a['p99'] - d['p99']:.2f} ms "
            f"| {a['rps']:.0f} | {b['rps']:.0f} | {d['rps']:.0f} | {ratio(a['rps'], b['rps']):.2f} "
            f"| {a['cpu']:.2f} / {b['cpu']:.2f} ({a['machine']:.2f} / {b['machine']:.2f}) | {a['database']:.2f} "
            f"| {a['paced_p99'] - d['paced_p99']:.1f} / {b['paced_p99'] - d['paced_p99']:.1f} ms |"
        )
    print()
    for (backend, mode), row in results.items():
        if "LiteLLM" in row:
            d, lite = row["direct"], row["LiteLLM"]
            print(
                f"LiteLLM {backend} {mode}: added p50 {lite['p50'] - d['p50']:.2f} ms, {lite['rps']:.0f} req/s "
                f"at {CLIENTS} clients (AimiChat ÷ LiteLLM: added p50 "
                f"{ratio(row['AimiChat']['p50'] - d['p50'], lite['p50'] - d['p50']):.2f}, "
                f"req/s {ratio(row['AimiChat']['rps'], lite['rps']):.2f})"
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    key = HEADLINE if HEADLINE in results else next(iter(results))
    d, a, b = results[key]["direct"], results[key]["AimiChat"], results[key]["bare proxy"]
    if key != HEADLINE:
        print(f"(no PostgreSQL run: the figures below are for {key[0]}, {key[1]})")
    print(f"gateway_overhead_ratio={ratio(a['p50'] - d['p50'], b['p50'] - d['p50']):.2f}")
    print(f"gateway_throughput_ratio={ratio(a['rps'], b['rps']):.2f}")
    print(f"gateway_cpu_ratio={ratio(a['cpu'], b['cpu']):.2f}")  # AimiChat's CPU per request ÷ the bare proxy's
    if MANY in results[key]:
        m = results[key][MANY]
        print(
            f"with {args.models} models: added p50 {m['p50'] - d['p50']:.2f} ms vs {a['p50'] - d['p50']:.2f} ms "
            f"with one; {m['rps']:.0f} vs {a['rps']:.0f} req/s"
        )
        print(f"models_overhead_ratio={ratio(m['p50'] - d['p50'], a['p50'] - d['p50']):.2f}")
        print(f"models_throughput_ratio={ratio(m['rps'], a['rps']):.2f}")
    if LIMITED in results[key]:
        lim = results[key][LIMITED]
        print(
            f"limited key: added p50 {lim['p50'] - d['p50']:.2f} ms vs {a['p50'] - d['p50']:.2f} ms unlimited; "
            f"{lim['rps']:.0f} vs {a['rps']:.0f} req/s"
        )
        print(f"key_limits_added_ms={lim['p50'] - a['p50']:.2f}")
    print(f"gateway_overhead_ms_p50={a['p50'] - d['p50']:.2f}")


if __name__ == "__main__":
    main()
