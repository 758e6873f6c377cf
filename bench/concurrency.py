#!/usr/bin/env python3
"""Concurrent streaming throughput: AimiChat's llama.cpp engine (N slots, then one) against native llama-server.

llama-cpp-python's own server (``python -m llama_cpp.server``) runs too, as a second baseline.

Starts each server itself (free port, throwaway data dir, an account and key made with the
``aimichat`` CLI), runs 1, 4 and 8 concurrent streaming clients of 100 tokens each against it, and
stops it. For every run it prints total completion tokens per second and the worst time to first
token, then the servers' resident memory, and among the last lines (``--flash-attention`` and
``--two-models`` add theirs in between)::

    vs_llama_server_8=<AimiChat total tok/s at 8 streams ÷ llama-server's>
    concurrency_ratio_8=<AimiChat total tok/s at 8 streams ÷ AimiChat at 1 stream>

``--flash-attention``: AimiChat runs once more with ``AIMICHAT_FLASH_ATTENTION=true`` (right after llama-server),
and prints ``vs_llama_server_8_flash=`` and ``flash_attention_ratio_8=`` (its 8-stream tok/s ÷ the default's).

``--two-models``: AimiChat also serves two embedded models (the same GGUF registered twice, half the
slots each, aimichat-1 hidden, the cores split between them as the registry does by default), half the
streams going to each; it prints their aggregate and worst first token beside one model's, and
``two_models_ratio_8=`` (the two models' aggregate tok/s ÷ one model's at the same streams).

Every server gets the same GGUF, context per slot, llama.cpp threads and requests (AimiChat's default
system prompt is sent explicitly, so every server reads the very same prompt tokens). Native
``llama-server`` (llama.cpp's own server, built as bench/README.md says) is the baseline to beat; it is
taken from ``$LLAMA_SERVER`` or the PATH, run with as many slots as AimiChat (``-np``) and skipped, with
a note, when there is none.

Usage (from the repository root)::

    .venv/bin/python bench/concurrency.py                    # everything, about a minute on a quiet machine
    LLAMA_SERVER=/path/to/llama-server .venv/bin/python bench/concurrency.py --streams 1,8 --no-baseline --no-single

Throughput on a shared machine is noisy: take final numbers on a quiet one (``--repeat 3`` reports medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

PYTHON = sys.executable
TOPICS = [
    "a dragon",
    "the sea",
    "a lost robot",
    "a lighthouse keeper",
    "a city of glass",
    "a talking cat",
    "a long winter",
    "a time traveller",
    "a desert caravan",
    "an old library",
    "a mountain village",
    "a clockmaker",
    "a river pirate",
    "a snow fox",
    "a night train",
    "a forgotten island",
]


@dataclass
class Server:
    name: str
    url: str
    key: str
    proc: subprocess.Popen
    model: str | None = None  # sent as "model" when set


@dataclass
class Run:
    server: str
    streams: int
    tokens: int
    seconds: float
    worst_ttft: float
    decode_ms: float | None = None  # llama-server only: its own mean time per generated token, from its timings

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


# -- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def aimichat_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This environment, but with our own data dir and nothing that would point AimiChat elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMICHAT_")}
    env["AIMICHAT_DATA_DIR"] = str(data_dir)
    env.update({f"AIMICHAT_{k.upper()}": v for k, v in settings.items()})
    return env


def cli(data_dir: Path, *args: str) -> str:
    argv = [PYTHON, "-m", "aimichat", *args]
    return subprocess.run(argv, env=aimichat_env(data_dir), check=True, capture_output=True, text=True).stdout


def make_key(data_dir: Path) -> str:
    """An account on a tier with plenty of credits, and an API key for it, through the aimichat CLI."""
    cli(data_dir, "tiers", "set", "bench", "--daily-credits", "1000000")
    cli(data_dir, "accounts", "create", "bench@example.com", "--password", "a-long-bench-password", "--tier", "bench")
    return cli(data_dir, "keys", "create", "bench@example.com", "--name", "bench").strip().splitlines()[-1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


@contextmanager
def running(name: str, argv: list[str], ready_path: str, port: int, key: str, env: dict[str, str]) -> Iterator[Server]:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc, url + ready_path)
        yield Server(name, url, key, proc)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """End the server this script started (by its own handle), forcefully if it will not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def aimichat(data_dir: Path, key: str, parallel: int, threads: int, context_length: int, flash: bool = False):
    port = free_port()
    argv = [PYTHON, "-m", "aimichat", "serve", "--port", str(port), "--parallel", str(parallel)]
    argv += ["--log-level", "warning"]
    env = aimichat_env(data_dir, threads=str(threads), context_length=str(context_length), engine="embedded")
    env["AIMICHAT_FLASH_ATTENTION"] = "true" if flash else "false"
    label = f"aimichat parallel={parallel}" if parallel > 1 else "aimichat one-at-a-time"
    return running(label + (" flash" if flash else ""), argv, "/readyz", port, key, env)


@contextmanager
def aimichat_two_models(data_dir: Path, key: str, parallel: int, context_length: int) -> Iterator[list[Server]]:
    """One AimiChat serving "left" and "right", two embedded models of ``parallel`` slots each, threads
    left to the registry's default split; yields a Server per model (same process)."""
    for name in ("left", "right"):
        cli(
            data_dir,
            "models",
            "add",
            name,
            "--embedded",
            "--parallel",
            str(parallel),
            "--context-length",
            str(context_length),
        )
    cli(data_dir, "models", "remove", "aimichat-1")
    port = free_port()
    argv = [PYTHON, "-m", "aimichat", "serve", "--port", str(port), "--log-level", "warning"]
    with running("aimichat two models", argv, "/readyz", port, key, aimichat_env(data_dir)) as server:
        yield [Server(f"aimichat model {n}", server.url, key, server.proc, n) for n in ("left", "right")]
    cli(data_dir, "models", "restore", "aimichat-1")
    for name in ("left", "right"):
        cli(data_dir, "models", "remove", name)


def llama_cpp_server(model: Path, threads: int, context_length: int):
    port = free_port()
    argv = [
        PYTHON,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(context_length),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        # By default a new request interrupts the running one; queueing is the fair comparison.
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    return running("llama_cpp.server", argv, "/v1/models", port, "none", dict(os.environ))


def find_llama_server() -> str | None:
    """llama.cpp's own server binary: ``$LLAMA_SERVER``, else ``llama-server`` on the PATH."""
    path = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    return path if path and os.access(path, os.X_OK) else None


def llama_server(binary: str, model: Path, parallel: int, threads: int, context_length: int, extra: list[str]):
    """Native llama-server with AimiChat's shape: ``parallel`` slots of ``context_length`` tokens each.

    ``-c`` is the whole KV cache, split evenly between the slots (one KV stream per slot with an explicit
    ``-np``, as AimiChat). Everything else is llama-server's default (continuous batching, its slot
    prompt cache and host-memory prompt cache, flash attention "auto", which is on for the CPU) unless
    ``extra`` says otherwise: ``--llama-server-args="-fa off"`` gives it AimiChat's attention kernels.
    """
    port = free_port()
    argv = [
        binary,
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(parallel),
        "--ctx-size",
        str(parallel * context_length),
        "--threads",
        str(threads),
        "--threads-batch",
        str(threads),
        "--no-webui",
        *extra,
    ]
    name = " ".join(["llama-server", f"-np {parallel}", *extra])
    return running(name, argv, "/health", port, "none", dict(os.environ))


def memory(server: Server) -> str:
    """The server's current and peak resident memory, from /proc."""
    fields = {}
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    rss, peak = int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024
    return f"{server.name}: {rss:.0f} MiB resident (peak {peak:.0f} MiB)"


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Stream:
    tokens: int
    first: float  # seconds to the first text
    decode_ms: float | None  # llama-server's own time per generated token (its "timings"), when it sends them


async def one_stream(
    client: httpx.AsyncClient, server: Server, chat: list[dict], max_tokens: int, started: float
) -> Stream:
    """Stream one completion of ``chat``."""
    body = {
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if server.model:
        body["model"] = server.model
    headers = {"Authorization": f"Bearer {server.key}"}
    first, chunks, usage, timings = None, 0, None, None
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = first or time.perf_counter() - started
                chunks += 1
    tokens = usage["completion_tokens"] if usage else chunks  # one chunk per token where usage is not sent
    decode_ms = timings.get("predicted_per_token_ms") if timings else None
    return Stream(tokens, first if first is not None else float("inf"), decode_ms)


def prompts(streams: int, run: int, system_prompt: str) -> list[list[dict]]:
    """The questions of one run: ``streams`` topics from ``run * streams`` on, cycling through TOPICS.

    Consecutive runs of one stream count ask other questions, but TOPICS is short: each stream count starts
    again at the first topics, and ``--repeat`` comes back to earlier ones. A server with a prompt cache
    (llama-server's host-memory cache; AimiChat's slots) then answers those from it: docs/benchmarks.md.

    AimiChat's default system prompt goes out explicitly: every server reads the same prompt tokens.
    """
    topics = [TOPICS[(run * streams + i) % len(TOPICS)] for i in range(streams)]
    return [
        [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": f"Write a long, detailed story about {topic}."},
        ]
        for topic in topics
    ]


async def measure(server: Server | list[Server], chats: list[list[dict]], max_tokens: int) -> Run:
    """The chats at once; given several servers (models), they take the chats in turn."""
    servers = server if isinstance(server, list) else [server]
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(client, servers[i % len(servers)], chat, max_tokens, started) for i, chat in enumerate(chats))
        )
        seconds = time.perf_counter() - started
    decode = [r.decode_ms for r in results if r.decode_ms is not None]
    return Run(
        " + ".join(s.name for s in servers),
        len(chats),
        sum(r.tokens for r in results),
        seconds,
        max(r.first for r in results),
        statistics.mean(decode) if decode else None,
    )


def bench(
    server: Server | list[Server], stream_counts: list[int], max_tokens: int, repeat: int, system_prompt: str
) -> list[Run]:
    hello = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": "Say hello."}]]
    asyncio.run(measure(server, hello, 8))  # warm-up: first-request costs are not what we measure
    runs = []
    for streams in stream_counts:
        mixes = [prompts(streams, run, system_prompt) for run in range(repeat)]
        tries = [asyncio.run(measure(server, mix, max_tokens)) for mix in mixes]
        run = sorted(tries, key=lambda r: r.tok_s)[len(tries) // 2]  # the median run
        run.worst_ttft = statistics.median(t.worst_ttft for t in tries)
        own = f"   (its own timings: {run.decode_ms:.1f} ms a token per stream)" if run.decode_ms else ""
        row = f"{run.server:<32} {streams:>7} {run.tok_s:>12.1f} {run.worst_ttft:>13.2f} {run.tokens:>7}"
        print(row + own, flush=True)
        runs.append(run)
    return runs


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,4,8", help="concurrent client counts (default 1,4,8)")
    parser.add_argument("--tokens", type=int, default=100, help="max_tokens per stream (default 100)")
    parser.add_argument("--parallel", type=int, default=8, help="AimiChat slots (default 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads for every server")
    parser.add_argument("--context-length", type=int, default=4096, help="context per request (per slot)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point; the median is reported")
    parser.add_argument("--no-baseline", action="store_true", help="skip llama_cpp.server")
    parser.add_argument("--no-llama-server", action="store_true", help="skip native llama-server even when found")
    parser.add_argument("--llama-server-args", default="", help='more llama-server options, e.g. "-fa off"')
    parser.add_argument("--no-single", action="store_true", help="skip AimiChat with one slot (one request at a time)")
    parser.add_argument("--two-models", action="store_true", help="also two embedded models, half the streams each")
    parser.add_argument("--flash-attention", action="store_true", help="also AimiChat with AIMICHAT_FLASH_ATTENTION")
    args = parser.parse_args()
    stream_counts = sorted({int(s) for s in args.streams.split(",")})
    if 1 not in stream_counts:
        stream_counts.insert(0, 1)  # the ratio needs the single-stream figure

    from aimichat.config import Settings
    from aimichat.engines.llama import default_model_path

    model, system_prompt = default_model_path(), Settings().system_prompt
    native = None if args.no_llama_server else find_llama_server()
    print(
        f"model {model.name}, {args.threads} threads, {args.tokens} tokens per stream, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    if native is None and not args.no_llama_server:
        print(
            "note: no llama-server binary ($LLAMA_SERVER or PATH; bench/README.md says how to build one): "
            "the native baseline is skipped"
        )
    print(f"{'server':<32} {'streams':>7} {'total tok/s':>12} {'worst TTFT s':>13} {'tokens':>7}")
    memories: list[str] = []
    native_runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="aimichat-bench-") as tmp:
        data_dir = Path(tmp)
        key = make_key(data_dir)
        with aimichat(data_dir, key, args.parallel, args.threads, args.context_length) as server:
            batched = bench(server, stream_counts, args.tokens, args.repeat, system_prompt)
            memories.append(memory(server))
        if native is not None:  # right after AimiChat's N slots: the two figures compared come from the same minutes
            extra = args.llama_server_args.split()
            with llama_server(native, model, args.parallel, args.threads, args.context_length, extra) as server:
                native_runs = bench(server, stream_counts, args.tokens, args.repeat, system_prompt)
                memories.append(memory(server))
        flash: list[Run] = []
        if args.flash_attention:  # after llama-server, as close to its minutes as the first run
            with aimichat(data_dir, key, args.parallel, args.threads, args.context_length, flash=True) as server:
                flash = bench(server, stream_counts, args.tokens, args.repeat, system_prompt)
                memories.append(memory(server))
        pair: list[Run] = []
        if args.two_models:
            with aimichat_two_models(data_dir, key, args.parallel // 2, args.context_length) as servers:
                pair = bench(servers, [max(stream_counts)], args.tokens, args.repeat, system_prompt)
                memories.append(memory(servers[0]))
        single = []
        if not args.no_single:
            with aimichat(data_dir, key, 1, args.threads, args.context_length) as server:
                single = bench(server, [1], args.tokens, args.repeat, system_prompt)
                memories.append(memory(server))
    if not args.no_baseline:
        with llama_cpp_server(model, args.threads, args.context_length) as server:
            bench(server, stream_counts, args.tokens, args.repeat, system_prompt)
            memories.append(memory(server))
    for line in memories:
        print(f"memory after the runs, {line}")
    by_streams = {run.streams: run for run in batched}
    top = max(stream_counts)
    flash_top = {run.streams: run for run in flash}.get(top)
    if single:
        print(f"single_stream_ratio={by_streams[1].tok_s / single[0].tok_s:.2f}")
    if native_runs:
        theirs = {run.streams: run for run in native_runs}[top]
        ours = by_streams[top]
        print(f"worst_first_token_{top}: aimichat {ours.worst_ttft:.3f} s, llama-server {theirs.worst_ttft:.3f} s")
        if flash_top:
            print(f"vs_llama_server_{top}_flash={flash_top.tok_s / theirs.tok_s:.2f}")
        print(f"vs_llama_server_{top}={by_streams[top].tok_s / theirs.tok_s:.2f}")
    else:
        print(f"vs_llama_server_{top}: skipped (no llama-server)")
    if pair:
        ours = by_streams[top]
        print(
            f"two_models_{top}: {pair[0].tok_s:.1f} tok/s in all, worst first token {pair[0].worst_ttft:.2f} s; "
            f"one model: {ours.tok_s:.1f} tok/s, worst first token {ours.worst_ttft:.2f} s"
        )
        print(f"two_models_ratio_{top}={pair[0].tok_s / ours.tok_s:.2f}")
    if flash_top:
        print(f"flash_attention_ratio_{top}={flash_top.tok_s / by_streams[top].tok_s:.2f}")
    print(f"concurrency_ratio_{top}={by_streams[top].tok_s / by_streams[1].tok_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
