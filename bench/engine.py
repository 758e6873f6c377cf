"""The llama.cpp engine through the API vs a raw llama-cpp-python loop, same model, same prompts, one run.

    .venv/bin/python bench/engine.py [--tokens 200] [--reps 3]
    .venv/bin/python bench/engine.py --json-schema [--tokens 100] [--reps 3]

(a) raw: llama-cpp-python's ``Llama.generate`` on the exact prompt tokens the API would use;
(b) api: ``aimichat serve`` in its own process (free port, throwaway data dir), one streaming client.
Both greedy (temperature 0), so both produce the same tokens. Prints tokens/s (decode rate after the
first token) and time to first token for each, and last ``engine_ratio=<api tok/s ÷ raw tok/s>``.

``--json-schema`` measures structured output instead: the same prompts through the API without a
``response_format``, then with a small and a large JSON schema (llama.cpp grammars are known to be slow on
large schemas), and the same three on the raw loop with llama-cpp-python's own grammar. It prints each
schema's size (JSON bytes, properties, GBNF rules and bytes), tokens/s, and ratios of constrained to
unconstrained tokens/s: ``json_small_ratio=`` and, last, ``json_large_ratio=`` (the API's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
from llama_cpp import Llama

from aimichat.api.chat.protocol import ChatCompletionRequest
from aimichat.config import Settings
from aimichat.engines.base import Message
from aimichat.engines.llama import ChatPrompt, default_model_path

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Write a long story about a cat who learns to sail.",
    "Write a long story about a city built on the back of a whale.",
    "Write a long story about two robots planting a garden.",
    "Write a long story about a baker in the mountains.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A JSON answer to any prompt: the model fills the fields (at most ``--tokens`` of them are measured).
SMALL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
    "additionalProperties": False,
}


def large_schema() -> dict[str, Any]:
    """A form of 48 fields (strings, integers, numbers, booleans, enums, arrays, nested objects): the size of
    a real extraction schema, where each field is its own grammar rule."""
    kinds: list[dict[str, Any]] = [
        {"type": "string", "maxLength": 40},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["low", "medium", "high", "unknown", "not applicable", "to be decided"]},
        {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        {"type": "string", "format": "date"},
    ]
    properties = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(48)}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def grammar_of(schema: dict[str, Any]) -> str:
    """The GBNF the API builds for ``schema`` (what every token of the answer is checked against)."""
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "-"}], response_format=response_format(schema)
    )
    grammar = request.grammar()
    assert grammar is not None
    return grammar


def count_properties(schema: Any) -> int:
    if isinstance(schema, dict):
        own = len(schema.get("properties") or {})
        return own + sum(count_properties(v) for v in schema.values())
    if isinstance(schema, list):
        return sum(count_properties(v) for v in schema)
    return 0


def measure_raw(
    llm: Llama,
    chat: ChatPrompt,
    repeat_penalty: float,
    prompt: str,
    max_tokens: int,
    grammar: str | None = None,
) -> tuple[float, float, int]:
    """(ttft seconds, decode tokens/s, tokens) for the bare llama-cpp-python loop (with ``grammar``: constrained
    by llama-cpp-python's own grammar sampling)."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    tokens = chat.tokens([Message("user", prompt)])
    vocab = llm._model.vocab
    constraint = LlamaGrammar.from_string(grammar, verbose=False) if grammar else None
    start = time.perf_counter()
    first = None
    n = 0
    generated: list[int] = []
    for token in llm.generate(tokens, temp=0.0, top_p=1.0, repeat_penalty=repeat_penalty, grammar=constraint):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llm.detokenize([token], prev_tokens=generated)  # a fair loop turns tokens into text too
        generated.append(token)
        n += 1
        if first is None:
            first = time.perf_counter()
        if n >= max_tokens:
            break
    end = time.perf_counter()
    return first - start, (n - 1) / (end - first), n


def measure_api(
    client: httpx.Client, url: str, key: str, prompt: str, max_tokens: int, extra: dict[str, Any] | None = None
) -> tuple[float, float, int]:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()  # the client exists already: building one costs ~50 ms here (its TLS context)
    first = last = None
    tokens = 0
    with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if '"delta":{"content"' in line:
                now = time.perf_counter()
                first = first or now
                last = now
            elif '"usage"' in line:
                tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
    return first - start, (tokens - 1) / (last - first), tokens


def start_server(data_dir: str) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "AIMICHAT_DATA_DIR": data_dir}  # the default engine, unless AIMICHAT_PARALLEL says otherwise
    aimichat = [sys.executable, "-m", "aimichat"]
    subprocess.run(
        [*aimichat, "accounts", "create", "bench@example.com", "--password", "bench-password"],
        env=env,
        check=True,
        capture_output=True,
    )
    tier = ["tiers", "set", "free", "--daily-credits", "1000000"]
    subprocess.run([*aimichat, *tier], env=env, check=True, capture_output=True)
    key = (
        subprocess.run(
            [*aimichat, "keys", "create", "bench@example.com", "--name", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    port = free_port()
    proc = subprocess.Popen(
        [*aimichat, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, key
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def report(name: str, rows: list[tuple[float, float, int]]) -> float:
    """Print one side's medians; its median tokens/s."""
    ttft = statistics.median(r[0] for r in rows) * 1000
    rate = statistics.median(r[1] for r in rows)
    print(f"{name:<34} tokens/s={rate:7.2f}  ttft_ms={ttft:7.1f}  tokens={[r[2] for r in rows]}")
    return rate


def json_schema_run(llm: Llama, chat: ChatPrompt, settings: Settings, tokens: int, reps: int) -> None:
    """Constrained tokens/s as a ratio of unconstrained, on the same prompts, through the API and raw."""
    schemas = {"small": SMALL_SCHEMA, "large": large_schema()}
    grammars = {name: grammar_of(schema) for name, schema in schemas.items()}
    for name, schema in schemas.items():
        gbnf = grammars[name]
        rules = sum(1 for line in gbnf.splitlines() if "::=" in line)
        print(
            f"schema={name} json_bytes={len(json.dumps(schema))} properties={count_properties(schema)} "
            f"gbnf_rules={rules} gbnf_bytes={len(gbnf)}"
        )
    prompts = [f"{p} Answer as JSON." for p in (PROMPTS * 3)[:reps]]
    cases: dict[str, str | None] = {"unconstrained": None, **{name: name for name in schemas}}
    api: dict[str, list[tuple[float, float, int]]] = {case: [] for case in cases}
    raw: dict[str, list[tuple[float, float, int]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url, key = start_server(data_dir)
        try:
            with httpx.Client(timeout=600) as client:
                measure_api(client, url, key, "Warm up.", 16, {"response_format": response_format(SMALL_SCHEMA)})
                for prompt in prompts:  # every case on a prompt before the next prompt, so drift hits all alike
                    for case, schema_name in cases.items():
                        extra = {"response_format": response_format(schemas[schema_name])} if schema_name else None
                        api[case].append(measure_api(client, url, key, prompt, tokens, extra))
                        grammar = grammars[schema_name] if schema_name else None
                        raw[case].append(measure_raw(llm, chat, settings.repeat_penalty, prompt, tokens, grammar))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    rates = {}
    for case in cases:
        rates[("api", case)] = report(f"aimichat api, {case}", api[case])
        rates[("raw", case)] = report(f"raw llama-cpp-python, {case}", raw[case])
    for name in schemas:  # llama-cpp-python's own cost of the same grammar, for comparison
        print(f"raw_json_{name}_ratio={rates[('raw', name)] / rates[('raw', 'unconstrained')]:.3f}")
    for name in schemas:
        print(f"json_{name}_ratio={rates[('api', name)] / rates[('api', 'unconstrained')]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--reps", type=int, default=len(PROMPTS))
    parser.add_argument("--json-schema", action="store_true", help="measure JSON-schema output against plain text")
    args = parser.parse_args()
    settings = Settings()
    path = settings.model_path or default_model_path()
    llm = Llama(
        model_path=str(path),
        n_ctx=settings.context_length,
        n_threads=settings.threads,
        n_threads_batch=settings.threads,
        n_batch=512,
        verbose=False,
    )
    chat = ChatPrompt(llm._model, settings.system_prompt, path.name)  # the prompt tokens the API would use
    if args.json_schema:
        json_schema_run(llm, chat, settings, args.tokens, args.reps)
        return

    def run_raw(prompt: str, max_tokens: int) -> tuple[float, float, int]:
        return measure_raw(llm, chat, settings.repeat_penalty, prompt, max_tokens)

    with tempfile.TemporaryDirectory() as data_dir:
        proc, url, key = start_server(data_dir)
        try:
            with httpx.Client(timeout=300) as client:
                run_raw("Warm up.", 16)
                measure_api(client, url, key, "Warm up.", 16)
                raw, api = [], []
                for prompt in (PROMPTS * 3)[: args.reps]:  # alternate, so drift hits both sides alike
                    raw.append(run_raw(prompt, args.tokens))
                    api.append(measure_api(client, url, key, prompt, args.tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for name, rows in (("raw llama-cpp-python", raw), ("aimichat api (http, sse)", api)):
        report(name, rows)
    ttft_overhead = (statistics.median(r[0] for r in api) - statistics.median(r[0] for r in raw)) * 1000
    print(f"ttft_overhead_ms={ttft_overhead:.1f}")
    print(f"engine_ratio={statistics.median(r[1] for r in api) / statistics.median(r[1] for r in raw):.3f}")


if __name__ == "__main__":
    main()
