"""The continuous-batching engine: concurrent streams, slot reuse, per-request sampling, exact usage.

One engine (8 slots of 512 tokens) is loaded for the whole module. Engine-level tests drive it with
asyncio directly; the HTTP tests go through the real API. ``max_tokens`` stays small so the module
finishes quickly even on a busy 2-core machine.

About identical text at temperature 0 (the issue asks for at least 90%): llama.cpp's batched
arithmetic is not bit-identical across batch shapes. Measured on this engine's first design, which
put prompt chunks into the same ``llama_decode`` as the generating tokens, 17-19 of 20 streams
matched their solo run. The cause: llama.cpp cuts such a mixed multi-sequence batch into micro-batches
of equal tokens per sequence, so a prompt could have its last token computed in a micro-batch of its
own, and the CPU attention kernels differ between one query row and several (logits moved by up to
~0.6, enough to flip a near-tie under greedy decoding). The engine now reads each prompt in its own
decode, cut only by its length, and decodes generated tokens one row per sequence: 20 of 20 match.
The tolerance stays for what llama.cpp may change underneath.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from aimichat.config import Settings
from aimichat.engines.base import ContextLengthExceeded, Delta, EngineBusy, EngineError, Finish, Message, SamplingParams
from aimichat.engines.batched import BatchedEngine
from aimichat.store.db import Database
from conftest import make_account, make_key, serve_app

SLOTS = 8
MIN_IDENTICAL = 0.9  # the tolerance for batch-shape divergence at temperature 0

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain gravity in one sentence.",
    "What is 12 times 12?",
    "Name a famous painter.",
    "Give me a tip for better sleep.",
    "What do bees make?",
    "Describe a cat in a few words.",
    "Why is the sky blue?",
    "Suggest a name for a pet fish.",
    "What is the opposite of hot?",
    "Translate 'good morning' into Spanish.",
    "How many days are in a week?",
    "What is photosynthesis?",
    "Tell me a fun fact about octopuses.",
    "What is the boiling point of water?",
    "Recommend a classic novel.",
    "What does a compass do?",
    "Say something kind.",
]
LONG = "Count from one to one hundred in words, separated by commas."


@pytest.fixture(scope="module")
def batched():
    engine = BatchedEngine(
        slots=SLOTS,
        context_length=512,
        threads=os.cpu_count() or 1,
        system_prompt=Settings().system_prompt,
        max_queue=64,
    )
    engine.load()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(batched, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batched")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_app(batched, db, tmp) as live:
        make_account(db, "batch@example.com", daily=1_000_000)
        live.key = make_key(db, "batch@example.com")
        yield live
    db.dispose()


# -- helpers ---------------------------------------------------------------------------------------


async def complete(engine: BatchedEngine, text: str | list[Message], **params) -> tuple[str, Finish]:
    """Run one request (a user message, or whole messages) to the end; returns its text and its Finish."""
    prompt = await engine.prepare([Message("user", text)] if isinstance(text, str) else text)
    parts: list[str] = []
    finish = None
    async for event in engine.generate(prompt, SamplingParams(**params)):
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            finish = event
    assert finish is not None
    return "".join(parts), finish


def alone(engine: BatchedEngine, requests: list[tuple[str, dict]]) -> list[tuple[str, Finish]]:
    """Each request with the engine to itself."""

    async def run():
        return [await complete(engine, text, **params) for text, params in requests]

    return asyncio.run(run())


def together(engine: BatchedEngine, requests: list[tuple[str, dict]]) -> list[tuple[str, Finish]]:
    """All requests submitted at once (more than the slots wait in the queue)."""

    async def run():
        return await asyncio.gather(*(complete(engine, text, **params) for text, params in requests))

    return asyncio.run(run())


@dataclass
class Stream:
    """What one streaming HTTP client saw."""

    status: int = 0
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict | None = None
    done: bool = False
    first_at: float | None = None
    end_at: float | None = None
    errors: list[str] = field(default_factory=list)


def stream_chat(server, content: str, max_tokens: int, out: Stream, hang_up: threading.Event | None = None) -> None:
    """Stream one chat completion over HTTP into ``out``; once ``hang_up`` is set, disconnect mid-stream."""
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(timeout=120) as client, client.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        out.status = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.done = True
                break
            _read_chunk(json.loads(line[6:]), out)
            if hang_up is not None and hang_up.is_set() and out.chunks:
                return  # leaving the block closes the connection mid-stream
    out.end_at = time.monotonic()


def _read_chunk(chunk: dict, out: Stream) -> None:
    if "error" in chunk:
        out.errors.append(chunk["error"]["message"])
        return
    if chunk.get("usage"):
        out.usage = chunk["usage"]
    for choice in chunk.get("choices", []):
        content = choice["delta"].get("content")
        if content:
            out.first_at = out.first_at or time.monotonic()
            out.chunks += 1
            out.text += content
        out.finish_reason = choice.get("finish_reason") or out.finish_reason


def run_threads(targets: list[threading.Thread], timeout: float = 120) -> None:
    for t in targets:
        t.start()
    for t in targets:
        t.join(timeout)
        assert not t.is_alive(), "a stream hung"


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        time.sleep(0.01)


def prompt_tokens(engine: BatchedEngine, text: str) -> int:
    return len(engine.tokenize_chat([Message("user", text)]))


def looks_like_text(text: str) -> bool:
    return "\ufffd" not in text and sum(word.isalpha() for word in text.split()) >= 2


# -- over HTTP -------------------------------------------------------------------------------------


def test_eight_concurrent_streams_all_complete_with_exact_usage(server, batched):
    prompts = PROMPTS[:SLOTS]
    streams = [Stream() for _ in prompts]
    busy_seen: list[int] = []
    threads = [threading.Thread(target=stream_chat, args=(server, p, 24, s)) for p, s in zip(prompts, streams)]
    watcher = threading.Thread(target=_watch_busy, args=(batched, threads, busy_seen))
    run_threads([*threads, watcher])

    for prompt, s in zip(prompts, streams):
        assert s.status == 200 and s.done and not s.errors, (prompt, s)
        assert looks_like_text(s.text), (prompt, s.text)
        assert s.finish_reason in ("stop", "length")
        assert s.usage["prompt_tokens"] == prompt_tokens(batched, prompt)
        assert 0 < s.usage["completion_tokens"] <= 24
        assert (s.usage["completion_tokens"] == 24) == (s.finish_reason == "length")
    assert max(busy_seen) >= 4, f"the streams were not served together (most busy slots seen: {max(busy_seen)})"


def _watch_busy(engine: BatchedEngine, threads: list[threading.Thread], seen: list[int]) -> None:
    seen.append(0)
    while any(t.is_alive() for t in threads):
        seen.append(engine.ready()[1]["slots_busy"])
        time.sleep(0.005)


def test_a_disconnect_frees_its_slot_for_a_queued_request_while_the_others_continue(server, batched):
    runners = [Stream() for _ in range(SLOTS)]
    hang_up = threading.Event()
    threads = [
        threading.Thread(target=stream_chat, args=(server, LONG, 48, s), kwargs={"hang_up": hang_up if i == 0 else None})
        for i, s in enumerate(runners)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: batched.ready()[1]["slots_busy"] == SLOTS)

    queued = Stream()
    late = threading.Thread(target=stream_chat, args=(server, "What is the capital of Italy?", 8, queued))
    late.start()
    wait_until(lambda: batched.ready()[1]["queued"] == 1)
    assert queued.first_at is None  # every slot is taken: it waits
    hang_up.set()
    for t in [*threads, late]:
        t.join(120)
        assert not t.is_alive(), "a stream hung"

    quitter, others = runners[0], runners[1:]
    assert quitter.chunks >= 1 and not quitter.done and quitter.usage is None
    assert queued.done and queued.usage["completion_tokens"] >= 1 and looks_like_text(queued.text)
    for s in others:
        assert s.done and s.status == 200 and not s.errors
        assert s.finish_reason in ("stop", "length") and s.usage["completion_tokens"] >= 1
    # The queued request got the freed slot while the other seven were still generating.
    assert queued.first_at < max(s.end_at for s in others)
    wait_until(lambda: batched.ready()[1]["slots_busy"] == 0)


def test_readyz_and_metrics_show_slots_and_queue(server, batched):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        engine = client.get("/readyz").json()["engine"]
        metrics = client.get("/metrics").text
    assert engine["engine"] == "batched" and engine["slots"] == SLOTS
    assert engine["slots_busy"] == 0 and engine["queued"] == 0
    assert f"aimichat_engine_slots {float(SLOTS)}" in metrics
    assert "aimichat_engine_slots_busy 0.0" in metrics and "aimichat_engine_queue_depth 0.0" in metrics


def test_a_prompt_that_cannot_fit_a_slot_answers_400_before_taking_one(server, batched):
    body = {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 5}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {server.key}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert batched.ready()[1]["slots_busy"] == 0


# -- engine level ----------------------------------------------------------------------------------


def test_temperature_zero_streams_match_the_same_request_alone(batched):
    requests = [(p, {"max_tokens": 16, "temperature": 0}) for p in PROMPTS]
    solo = alone(batched, requests)
    crowd = together(batched, requests)  # 20 requests on 8 slots: batches of many shapes, slots reused
    identical = [a == b for a, b in zip(solo, crowd)]
    share = sum(identical) / len(identical)
    print(f"\nidentical at temperature 0: {sum(identical)}/{len(identical)}")
    for prompt, same, a, b in zip(PROMPTS, identical, solo, crowd):
        if not same:
            print(f"  differs: {prompt!r}\n    alone:    {a[0]!r}\n    together: {b[0]!r}")
    assert share >= MIN_IDENTICAL
    # Usage is exact whatever the batch: the prompt count never changes, completions match when texts do.
    for prompt, (_, a), (_, b) in zip(PROMPTS, solo, crowd):
        assert a.prompt_tokens == b.prompt_tokens == prompt_tokens(batched, prompt)


def test_sampling_settings_do_not_leak_between_slots(batched):
    """Fixed-seed and greedy targets give their solo text whatever the neighbours do with other settings."""
    targets = [
        ("Tell me a short story about a robot.", {"max_tokens": 20, "temperature": 0}),
        ("Describe the moon.", {"max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 1234}),
        ("Write a line of poetry about rain.", {"max_tokens": 20, "temperature": 1.2, "seed": 7}),
    ]
    noise_settings = [
        {"temperature": 1.5, "top_p": 0.5, "presence_penalty": 1.5, "seed": None},
        {"temperature": 2.0, "frequency_penalty": 2.0, "stop": ("e",), "seed": None},
        {"temperature": 0.0, "presence_penalty": -1.0, "stop": ("\n",)},
        {"temperature": 0.7, "top_p": 0.2, "seed": 99},
        {"temperature": 1.0, "frequency_penalty": -1.5, "seed": None},
    ]
    noise = [(PROMPTS[i], {"max_tokens": 12 + 4 * i, **s}) for i, s in enumerate(noise_settings)]
    solo = alone(batched, targets)
    matches = 0
    for mix in (targets + noise, noise[:2] + targets + noise[2:]):  # targets in different slots and company
        crowd = together(batched, mix)
        matches += sum(crowd[mix.index(t)] == s for t, s in zip(targets, solo))
    assert matches >= 5, f"only {matches}/6 target streams matched their solo run"


def test_usage_and_text_match_the_one_at_a_time_engine(batched, engine):
    """Same tokens in, same sampler chain: the batched engine alone answers as the embedded engine does."""
    requests = [
        (PROMPTS[0], {"max_tokens": 16, "temperature": 0}),
        (PROMPTS[1], {"max_tokens": 16, "temperature": 0, "stop": ("sea", "\n")}),
        (PROMPTS[9], {"max_tokens": 16, "temperature": 0.8, "seed": 42}),
    ]

    async def run(eng):
        return [await complete(eng, text, **params) for text, params in requests]

    mine, theirs = asyncio.run(run(batched)), asyncio.run(run(engine))
    for (text, _), a, b in zip(requests, mine, theirs):
        assert a[1].prompt_tokens == b[1].prompt_tokens, text
    assert sum(a == b for a, b in zip(mine, theirs)) >= 2, (mine, theirs)


def test_slots_reuse_the_shared_prompt_start_and_answers_do_not_depend_on_history(batched):
    def cached() -> int:
        return batched.ready()[1]["prompt_tokens_cached"]

    ask = (PROMPTS[0], {"max_tokens": 12, "temperature": 0})
    pirate = ([Message("system", "You are a pirate."), Message("user", PROMPTS[0])], {"max_tokens": 12, "temperature": 0})
    before = cached()
    (first,) = alone(batched, [ask])
    reused = cached() - before
    assert 10 < reused < first[1].prompt_tokens  # our system prompt was not read again; the question was
    before = cached()
    alone(batched, [pirate])  # another system prompt shares only the template's first tokens
    assert cached() - before < 8
    assert alone(batched, [ask]) == [first]  # the slot's shared start is whole again, with the same values
    assert first[1].prompt_tokens == prompt_tokens(batched, PROMPTS[0])  # usage counts the whole prompt


def test_a_conversations_next_turn_reads_only_what_is_new(batched):
    """A slot keeps its last prompt and answer: the next turn of that chat reads just the new part."""
    def cached() -> int:
        return batched.ready()[1]["prompt_tokens_cached"]

    question = [Message("user", "Name three rivers in Europe.")]
    (answer, first), = alone(batched, [(question, {"max_tokens": 24, "temperature": 0})])
    turn = question + [Message("assistant", answer), Message("user", "Which is the longest?")]
    before = cached()
    (reply, second), = alone(batched, [(turn, {"max_tokens": 8, "temperature": 0})])
    reused = cached() - before
    assert second.prompt_tokens == len(batched.tokenize_chat(turn))  # usage still counts the whole prompt
    assert reused >= first.prompt_tokens + first.completion_tokens - 8 - 4  # - re-read, - re-tokenised answer end
    # A repeated request finds its whole prompt in a slot, reads its end again, and answers as it did.
    assert alone(batched, [(turn, {"max_tokens": 8, "temperature": 0})])[0][0] == reply
    assert cached() - before - reused == second.prompt_tokens - 8


def test_a_burst_of_short_identical_requests_all_complete_and_leave_the_engine_idle(batched):
    """Many more requests than slots, each done in one step: admissions and releases never drift."""
    burst = [("Hello, how are you?", {"max_tokens": 1, "temperature": 0})] * 60
    answers = together(batched, burst)
    assert len({text for text, _ in answers}) == 1 and all(f.completion_tokens == 1 for _, f in answers)
    state = batched.ready()[1]
    assert (state["slots_busy"], state["queued"]) == (0, 0)


def test_stop_strings_are_cut_and_never_shown(batched):
    (text, finish), = alone(batched, [(LONG, {"max_tokens": 40, "temperature": 0, "stop": (",",)})])
    assert "," not in text and finish.finish_reason == "stop"
    assert 1 <= finish.completion_tokens < 40


def test_a_full_queue_refuses_and_a_timed_out_request_never_takes_a_slot(batched, monkeypatch):
    monkeypatch.setattr(batched, "max_queue", 1)

    async def scenario():
        prompt = await batched.prepare([Message("user", LONG)])
        long = SamplingParams(max_tokens=400, temperature=0)
        runners = [batched.generate(prompt, long) for _ in range(SLOTS)]
        await asyncio.gather(*(anext(r) for r in runners))  # every slot is generating
        monkeypatch.setattr(batched, "queue_timeout", 0.3)
        waiter = batched.generate(prompt, long)
        with pytest.raises(EngineBusy):  # one may wait (max_queue=1) but only for 0.3 s
            await anext(waiter)
        refused_now = batched.generate(prompt, long)
        blocker = asyncio.ensure_future(anext(batched.generate(prompt, long)))  # occupies the one queue place
        await asyncio.sleep(0.05)
        with pytest.raises(EngineBusy) as busy:
            await anext(refused_now)
        assert busy.value.retry_after >= 1
        with pytest.raises(EngineBusy):
            await blocker
        assert batched.ready()[1]["slots_busy"] == SLOTS
        for r in runners:
            await r.aclose()  # disconnects: their slots are freed at the next step

    asyncio.run(scenario())
    wait_until(lambda: batched.ready()[1]["slots_busy"] == 0, timeout=10)


def test_context_length_is_checked_before_a_slot_is_taken(batched):
    async def scenario():
        with pytest.raises(ContextLengthExceeded):
            await batched.prepare([Message("user", "word " * 600)])
        ok = await batched.prepare([Message("user", "hi")])
        oversized = type(ok)(ok.messages, 600, 0, payload=[ok.payload[0]] * 600)
        with pytest.raises(ContextLengthExceeded):
            await anext(batched.generate(oversized, SamplingParams(max_tokens=5)))

    asyncio.run(scenario())
    assert batched.ready()[1]["slots_busy"] == 0


def test_shutdown_fails_running_and_waiting_requests_instead_of_hanging():
    engine = BatchedEngine(slots=1, context_length=256, threads=1, step_tokens=64)
    engine.load()

    async def scenario():
        prompt = await engine.prepare([Message("user", LONG)])
        params = SamplingParams(max_tokens=200, temperature=0)
        running, waiting = engine.generate(prompt, params), engine.generate(prompt, params)
        await anext(running)
        pending = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.05)
        assert engine.ready()[1]["queued"] == 1
        await engine.close()
        with pytest.raises(EngineError):
            while True:
                await anext(running)
        with pytest.raises(EngineError):
            await pending
        assert engine.ready()[0] is False

    asyncio.run(scenario())
