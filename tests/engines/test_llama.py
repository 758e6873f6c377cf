"""The llama.cpp engine: one slot (a FIFO queue) and eight (continuous batching), over HTTP and directly.

The session's ``engine`` (one slot, 2048 tokens) serves the queue tests: a bounded FIFO queue,
timeouts, disconnects. A module engine of 8 slots of 512 tokens serves the rest: concurrent streams,
slot reuse, per-request sampling, exact usage, and the same answers as llama-cpp-python's own
``Llama.generate``. Engine-level tests drive an engine with asyncio directly; the HTTP tests go through
the real API. ``max_tokens`` stays small so the module finishes quickly even on a busy 2-core machine.

About identical text at temperature 0 (the issue asks for at least 90%): llama.cpp's batched
arithmetic is not bit-identical across batch shapes. Measured on this engine's first design, which
put prompt chunks into the same ``llama_decode`` as the generating tokens, 17-19 of 20 streams
matched their solo run. The cause: llama.cpp cuts such a mixed multi-sequence batch into micro-batches
of equal tokens per sequence, so a prompt could have its last token computed in a micro-batch of its
own, and the CPU attention kernels differ between one query row and several (logits moved by up to
~0.6, enough to flip a near-tie under greedy decoding). The engine now reads prompts in decodes of their
own (several prompts together only when their chunks have one length, which llama.cpp keeps whole) and
decodes generated tokens one row per sequence: 20 of 20 match.
The tolerance stays for what llama.cpp may change underneath.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import llama_cpp
import pytest
from llama_cpp import Llama
from sqlalchemy import select

from aimichat.config import Settings
from aimichat.engines.base import ContextLengthExceeded, Delta, EngineBusy, EngineError, Finish, Message, SamplingParams
from aimichat.engines.configs import EmbeddedConfig, build_engine
from aimichat.engines.llama import REREAD_TOKENS, LlamaEngine, default_model_path
from aimichat.engines.sampling import GreedySampler, SamplerChain, make_sampler
from aimichat.engines.text import TextOutput
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from fixtures import make_account, make_key, serve_app, settled, sse_events

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
def engine8() -> Iterator[LlamaEngine]:
    """Eight slots of 512 tokens, loaded once for the module."""
    engine = LlamaEngine(
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
def server(engine8, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama8")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_app(engine8, db, tmp) as live:
        make_account(db, "batch@example.com", daily=1_000_000)
        live.key = make_key(db, "batch@example.com")
        yield live
    db.dispose()


@pytest.fixture(scope="module")
def llama_generate() -> Iterator[Llama]:
    """llama-cpp-python's own high-level model over the same GGUF: the reference the engine must match."""
    llm = Llama(
        model_path=str(default_model_path()),
        n_ctx=512,
        n_threads=os.cpu_count() or 1,
        n_threads_batch=os.cpu_count() or 1,
        n_batch=512,
        verbose=False,
    )
    yield llm
    llm.close()


@pytest.fixture
def queue_server(engine, tmp_path):
    """The session's one-slot engine behind a fresh app and database."""
    db = Database(f"sqlite:///{tmp_path / 'aimichat.db'}")
    with serve_app(engine, db, tmp_path) as live:
        make_account(db, "queue@example.com", daily=100_000)
        live.key = make_key(db, "queue@example.com")
        live.db = db
        yield live
    db.dispose()


# -- helpers ---------------------------------------------------------------------------------------


def reference_answer(
    llm: Llama, tokens: list[int], params: SamplingParams, repeat_penalty: float
) -> tuple[str, Finish]:
    """What ``Llama.generate`` answers for ``tokens`` read from an empty cache, cut as the engine cuts text."""
    llm.reset()
    llm.set_seed(params.seed if params.seed is not None else 0)
    output, parts, reason = TextOutput(params.stop), [], "length"
    for token in llm.generate(
        tokens,
        temp=params.temperature,
        top_p=params.top_p,
        repeat_penalty=repeat_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
    ):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            reason = "stop"
            break
        delta = output.push(llm.detokenize([token]))
        parts += [delta.text] if delta else []
        if output.hit_stop:
            reason = "stop"
            break
        if output.generated >= params.max_tokens:
            break
    tail = output.tail()
    return "".join(parts) + (tail.text if tail else ""), Finish(reason, len(tokens), output.generated)


async def complete(engine: LlamaEngine, text: str | list[Message], **params) -> tuple[str, Finish]:
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


def alone(engine: LlamaEngine, requests: list[tuple[str, dict]]) -> list[tuple[str, Finish]]:
    """Each request with the engine to itself."""

    async def run():
        return [await complete(engine, text, **params) for text, params in requests]

    return asyncio.run(run())


def together(engine: LlamaEngine, requests: list[tuple[str, dict]]) -> list[tuple[str, Finish]]:
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
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as response,
    ):
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


def prompt_tokens(engine: LlamaEngine, text: str) -> int:
    return len(engine.tokenize_chat([Message("user", text)]))


def looks_like_text(text: str) -> bool:
    return "\ufffd" not in text and sum(word.isalpha() for word in text.split()) >= 2


# -- over HTTP -------------------------------------------------------------------------------------


def test_eight_concurrent_streams_all_complete_with_exact_usage(server, engine8):
    prompts = PROMPTS[:SLOTS]
    streams = [Stream() for _ in prompts]
    busy_seen: list[int] = []
    threads = [threading.Thread(target=stream_chat, args=(server, p, 24, s)) for p, s in zip(prompts, streams)]
    watcher = threading.Thread(target=_watch_busy, args=(engine8, threads, busy_seen))
    run_threads([*threads, watcher])

    for prompt, s in zip(prompts, streams):
        assert s.status == 200 and s.done and not s.errors, (prompt, s)
        assert looks_like_text(s.text), (prompt, s.text)
        assert s.finish_reason in ("stop", "length")
        assert s.usage["prompt_tokens"] == prompt_tokens(engine8, prompt)
        assert 0 < s.usage["completion_tokens"] <= 24
        assert (s.usage["completion_tokens"] == 24) == (s.finish_reason == "length")
    assert max(busy_seen) >= 4, f"the streams were not served together (most busy slots seen: {max(busy_seen)})"


def _watch_busy(engine: LlamaEngine, threads: list[threading.Thread], seen: list[int]) -> None:
    seen.append(0)
    while any(t.is_alive() for t in threads):
        seen.append(engine.stats().running)
        time.sleep(0.005)


def test_a_disconnect_frees_its_slot_for_a_queued_request_while_the_others_continue(server, engine8):
    runners = [Stream() for _ in range(SLOTS)]
    hang_up = threading.Event()
    threads = [
        threading.Thread(
            target=stream_chat, args=(server, LONG, 48, s), kwargs={"hang_up": hang_up if i == 0 else None}
        )
        for i, s in enumerate(runners)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: engine8.stats().running == SLOTS)

    queued = Stream()
    late = threading.Thread(target=stream_chat, args=(server, "What is the capital of Italy?", 8, queued))
    late.start()
    # It waits for a turn: in the engine's queue, or before it, in the fairness gate's (quota/fairness.py).
    wait_until(lambda: engine8.stats().queued + server.app.state.fairness.waiting(engine8) == 1)
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
    wait_until(lambda: engine8.stats().running == 0)


def test_readyz_and_metrics_show_slots_and_queue(server, engine8):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        engine = client.get("/readyz").json()["engine"]
        metrics = client.get("/metrics").text
    assert engine["engine"] == "llama" and engine["slots"] == SLOTS
    assert engine["slots_busy"] == 0 and engine["queued"] == 0
    assert f'aimichat_engine_slots{{model="aimichat-1"}} {float(SLOTS)}' in metrics
    assert 'aimichat_engine_slots_busy{model="aimichat-1"} 0.0' in metrics
    assert 'aimichat_engine_queue_depth{model="aimichat-1"} 0.0' in metrics


def test_a_prompt_that_cannot_fit_a_slot_answers_400_before_taking_one(server, engine8):
    body = {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 5}
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {server.key}"}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert engine8.stats().running == 0


# -- engine level ----------------------------------------------------------------------------------


def test_temperature_zero_streams_match_the_same_request_alone(engine8):
    requests = [(p, {"max_tokens": 16, "temperature": 0}) for p in PROMPTS]
    solo = alone(engine8, requests)
    crowd = together(engine8, requests)  # 20 requests on 8 slots: batches of many shapes, slots reused
    identical = [a == b for a, b in zip(solo, crowd)]
    share = sum(identical) / len(identical)
    print(f"\nidentical at temperature 0: {sum(identical)}/{len(identical)}")
    for prompt, same, a, b in zip(PROMPTS, identical, solo, crowd):
        if not same:
            print(f"  differs: {prompt!r}\n    alone:    {a[0]!r}\n    together: {b[0]!r}")
    assert share >= MIN_IDENTICAL
    # Usage is exact whatever the batch: the prompt count never changes, completions match when texts do.
    for prompt, (_, a), (_, b) in zip(PROMPTS, solo, crowd):
        assert a.prompt_tokens == b.prompt_tokens == prompt_tokens(engine8, prompt)


def test_sampling_settings_do_not_leak_between_slots(engine8):
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
    solo = alone(engine8, targets)
    matches = 0
    for mix in (targets + noise, noise[:2] + targets + noise[2:]):  # targets in different slots and company
        crowd = together(engine8, mix)
        matches += sum(crowd[mix.index(t)] == s for t, s in zip(targets, solo))
    assert matches >= 5, f"only {matches}/6 target streams matched their solo run"


def test_the_greedy_fast_path_picks_what_llama_cpps_chain_picks(engine8, llama_generate):
    """GreedySampler (numpy) against llama.cpp's penalties + greedy chain on the same logits, token by token.

    Penalties above and below 1 and more picks than the 64-token penalty window, so the window's turnover
    and the multiply-or-divide rule are both exercised.
    """
    llm, greedy_params = llama_generate, SamplingParams(max_tokens=1, temperature=0)
    for text, penalty in [(LONG, 1.1), ("Repeat the word banana fifty times.", 1.3), (PROMPTS[1], 0.9)]:
        fast = make_sampler(greedy_params, n_vocab=llm.n_vocab(), repeat_penalty=penalty, seed=0)
        chain = SamplerChain(greedy_params, n_vocab=llm.n_vocab(), repeat_penalty=penalty, seed=0)
        assert isinstance(fast, GreedySampler)
        llm.reset()
        llm.eval(engine8.tokenize_chat([Message("user", text)]))
        picks = []
        for _ in range(100):
            picks.append((fast.sample(llm.ctx, -1), chain.sample(llm.ctx, -1)))
            llm.eval([picks[-1][1]])
        chain.close()
        assert [mine for mine, _ in picks] == [theirs for _, theirs in picks]


def test_alone_it_answers_as_llama_generate(engine8, llama_generate):
    """Same tokens in, same sampler chain: a request alone gets what llama-cpp-python's own loop gives."""
    requests = [
        (PROMPTS[0], {"max_tokens": 16, "temperature": 0}),
        (PROMPTS[1], {"max_tokens": 16, "temperature": 0, "stop": ("sea", "\n")}),
        (PROMPTS[9], {"max_tokens": 16, "temperature": 0.8, "seed": 42}),
    ]
    mine = alone(engine8, requests)
    theirs = [
        reference_answer(
            llama_generate,
            engine8.tokenize_chat([Message("user", text)]),
            SamplingParams(**params),
            engine8.repeat_penalty,
        )
        for text, params in requests
    ]
    for (text, _), (_, a), (_, b) in zip(requests, mine, theirs):
        assert a.prompt_tokens == b.prompt_tokens == prompt_tokens(engine8, text)
    # All three, the seeded draw included: a sampler chain that drifted from Llama.generate's shows here.
    assert mine == theirs


def test_with_flash_attention_it_answers_as_llama_generate_with_flash_attention(engine8):
    """AIMICHAT_FLASH_ATTENTION: the answers change (docs/benchmarks.md), but a request alone still gets what
    llama-cpp-python's own loop gives with flash attention on, and a crowd on 8 slots still completes with
    exact usage and mostly the same texts."""
    threads = os.cpu_count() or 1
    prompt = Settings().system_prompt
    engine = LlamaEngine(slots=SLOTS, context_length=512, threads=threads, system_prompt=prompt, flash_attention=True)
    for on in (True, False):  # the setting reaches the engines the registry builds
        assert build_engine("m", EmbeddedConfig(), Settings(flash_attention=on)).flash_attention is on  # type: ignore[union-attr]
    engine.load()
    llm = Llama(
        model_path=str(default_model_path()),
        n_ctx=512,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        flash_attn=True,
        verbose=False,
    )
    try:
        requests = [(text, {"max_tokens": 16, "temperature": 0}) for text in PROMPTS]
        mine = alone(engine, requests)
        theirs = [
            reference_answer(
                llm, engine.tokenize_chat([Message("user", text)]), SamplingParams(**params), engine.repeat_penalty
            )
            for text, params in requests
        ]
        assert mine == theirs
        without = alone(engine8, requests)
        print(f"\nanswers flash attention changed: {sum(a != b for a, b in zip(mine, without))}/{len(requests)}")
        assert sum(a != b for a, b in zip(mine, without)) >= 2  # it is on
        crowd = together(engine, requests)
        for (text, _), (_, finish) in zip(requests, crowd):
            assert finish.prompt_tokens == prompt_tokens(engine, text) and finish.completion_tokens > 0
        assert sum(a == b for a, b in zip(mine, crowd)) / len(requests) >= MIN_IDENTICAL
    finally:
        llm.close()
        engine.shutdown()


def test_slots_reuse_the_shared_prompt_start_and_answers_do_not_depend_on_history(engine8):
    def cached() -> int:
        return engine8.stats().details["prompt_tokens_cached"]

    ask = (PROMPTS[0], {"max_tokens": 12, "temperature": 0})
    pirate_chat = [Message("system", "You are a pirate."), Message("user", PROMPTS[0])]
    pirate = (pirate_chat, {"max_tokens": 12, "temperature": 0})
    before = cached()
    (first,) = alone(engine8, [ask])
    reused = cached() - before
    assert 10 < reused < first[1].prompt_tokens  # our system prompt was not read again; the question was
    before = cached()
    alone(engine8, [pirate])  # another system prompt shares only the template's first tokens
    assert cached() - before < 8
    assert alone(engine8, [ask]) == [first]  # the slot's shared start is whole again, with the same values
    assert first[1].prompt_tokens == prompt_tokens(engine8, PROMPTS[0])  # usage counts the whole prompt


def test_a_new_request_copies_the_prompt_start_a_busy_slot_holds_and_answers_as_read_fresh(engine8, llama_generate):
    """Two chats about one document: the second copies the document's cells from the first one's slot."""
    document = (
        "The lighthouse on Gull Rock was built in 1871 from granite quarried on the mainland. Its lamp "
        "burned whale oil until 1890, then kerosene, and has been electric since 1952. Three keepers "
        "lived there with their families until the light was automated in 1987. "
    )
    first = [Message("user", document + "When was the light automated?")]
    second = [Message("user", document + "What did the lamp burn first?")]
    params = SamplingParams(max_tokens=40, temperature=0)
    first_tokens, second_tokens = engine8.tokenize_chat(first), engine8.tokenize_chat(second)
    common = next(i for i, (a, b) in enumerate(zip(first_tokens, second_tokens)) if a != b)

    async def run() -> tuple[str, str, int]:
        events = engine8.generate(await engine8.prepare(first), params)
        parts = [(await anext(events)).text]  # the first chat holds its slot, its prompt read
        assert engine8.stats().running == 1
        before = engine8.stats().details["prompt_tokens_cached"]
        reply, _ = await complete(engine8, second, max_tokens=12, temperature=0)
        cached = engine8.stats().details["prompt_tokens_cached"] - before
        parts += [event.text async for event in events if isinstance(event, Delta)]
        return "".join(parts), reply, cached

    answer, reply, cached = asyncio.run(run())
    assert cached >= common - REREAD_TOKENS  # the document was not read again
    assert answer == reference_answer(llama_generate, first_tokens, params, engine8.repeat_penalty)[0]
    assert (
        reply
        == reference_answer(
            llama_generate, second_tokens, SamplingParams(max_tokens=12, temperature=0), engine8.repeat_penalty
        )[0]
    )


def test_a_conversations_next_turn_reads_only_what_is_new(engine8):
    """A slot keeps its last prompt and answer: the next turn of that chat reads just the new part."""

    def cached() -> int:
        return engine8.stats().details["prompt_tokens_cached"]

    question = [Message("user", "Name three rivers in Europe.")]
    ((answer, first),) = alone(engine8, [(question, {"max_tokens": 24, "temperature": 0})])
    turn = [*question, Message("assistant", answer), Message("user", "Which is the longest?")]
    before = cached()
    ((reply, second),) = alone(engine8, [(turn, {"max_tokens": 8, "temperature": 0})])
    reused = cached() - before
    assert second.prompt_tokens == len(engine8.tokenize_chat(turn))  # usage still counts the whole prompt
    assert reused >= first.prompt_tokens + first.completion_tokens - REREAD_TOKENS - 4  # - re-tokenised answer end
    # A repeated request finds its whole prompt in a slot, reads its end again, and answers as it did.
    assert alone(engine8, [(turn, {"max_tokens": 8, "temperature": 0})])[0][0] == reply
    assert cached() - before - reused == second.prompt_tokens - REREAD_TOKENS


def test_a_burst_of_short_identical_requests_all_complete_and_leave_the_engine_idle(engine8):
    """Many more requests than slots, each done in one step: admissions and releases never drift."""
    burst = [("Hello, how are you?", {"max_tokens": 1, "temperature": 0})] * 60
    answers = together(engine8, burst)
    assert len({text for text, _ in answers}) == 1 and all(f.completion_tokens == 1 for _, f in answers)
    stats = engine8.stats()
    assert (stats.running, stats.queued) == (0, 0)


def test_stop_strings_are_cut_and_never_shown(engine8):
    ((text, finish),) = alone(engine8, [(LONG, {"max_tokens": 40, "temperature": 0, "stop": (",",)})])
    assert "," not in text and finish.finish_reason == "stop"
    assert 1 <= finish.completion_tokens < 40


def test_a_full_queue_refuses_and_a_timed_out_request_never_takes_a_slot(engine8, monkeypatch):
    monkeypatch.setattr(engine8, "max_queue", 1)

    async def scenario():
        prompt = await engine8.prepare([Message("user", LONG)])
        long = SamplingParams(max_tokens=400, temperature=0)
        runners = [engine8.generate(prompt, long) for _ in range(SLOTS)]
        await asyncio.gather(*(anext(r) for r in runners))  # every slot is generating
        monkeypatch.setattr(engine8, "queue_timeout", 0.3)
        waiter = engine8.generate(prompt, long)
        with pytest.raises(EngineBusy):  # one may wait (max_queue=1) but only for 0.3 s
            await anext(waiter)
        refused_now = engine8.generate(prompt, long)
        blocker = asyncio.ensure_future(anext(engine8.generate(prompt, long)))  # occupies the one queue place
        await asyncio.sleep(0.05)
        with pytest.raises(EngineBusy) as busy:
            await anext(refused_now)
        assert busy.value.retry_after >= 1
        with pytest.raises(EngineBusy):
            await blocker
        assert engine8.stats().running == SLOTS
        for r in runners:
            await r.aclose()  # disconnects: their slots are freed at the next step

    asyncio.run(scenario())
    wait_until(lambda: engine8.stats().running == 0, timeout=10)


def test_context_length_is_checked_before_a_slot_is_taken(engine8):
    async def scenario():
        with pytest.raises(ContextLengthExceeded):
            await engine8.prepare([Message("user", "word " * 600)])
        ok = await engine8.prepare([Message("user", "hi")])
        oversized = type(ok)(ok.messages, 600, 0, payload=[ok.payload[0]] * 600)
        with pytest.raises(ContextLengthExceeded):
            await anext(engine8.generate(oversized, SamplingParams(max_tokens=5)))

    asyncio.run(scenario())
    assert engine8.stats().running == 0


def test_shutdown_fails_running_and_waiting_requests_instead_of_hanging():
    engine = LlamaEngine(slots=1, context_length=256, threads=1, step_tokens=64)
    engine.load()

    async def scenario():
        prompt = await engine.prepare([Message("user", LONG)])
        params = SamplingParams(max_tokens=200, temperature=0)
        running, waiting = engine.generate(prompt, params), engine.generate(prompt, params)
        await anext(running)
        pending = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.05)
        assert engine.stats().queued == 1
        await engine.close()
        with pytest.raises(EngineError):
            while True:
                await anext(running)
        with pytest.raises(EngineError):
            await pending
        assert engine.stats().ready is False

    asyncio.run(scenario())


# -- one slot: a bounded FIFO queue ----------------------------------------------------------------

QUEUED = {"messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}], "temperature": 0}


def stream_to_end(server, body: dict, results: dict[int, tuple], index: int) -> None:
    """Run one streaming request to the end; record (status, retry-after, got [DONE], start of the body)."""
    headers = {"Authorization": f"Bearer {server.key}"}
    with (
        httpx.Client(timeout=120) as c,
        c.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers) as r,
    ):
        text = "".join(r.iter_text())
        results[index] = (r.status_code, r.headers.get("retry-after"), text.endswith("data: [DONE]\n\n"), text[:300])


def test_one_slot_full_queue_answers_503_with_retry_after_and_loses_nothing(queue_server, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_queue", 2)
    # Requests wait for their turn in the fairness gate (quota/fairness.py) before the engine's own queue.
    monkeypatch.setattr(queue_server.app.state.fairness, "max_waiting", 2)
    results: dict[int, tuple] = {}
    body = {**QUEUED, "max_tokens": 30}
    threads = [threading.Thread(target=stream_to_end, args=(queue_server, body, results, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8, "no request may hang"
    ok = [r for r in results.values() if r[0] == 200]
    busy = [r for r in results.values() if r[0] == 503]
    assert len(ok) + len(busy) == 8
    assert busy and all(int(r[1]) >= 1 for r in busy)
    assert len(ok) >= 3 and all(r[2] for r in ok), busy  # one running + two queued, each completed
    settled(queue_server)
    with queue_server.db.session() as s:  # refused requests reserved nothing: exactly the served ones are charged
        rows = s.scalars(select(UsageEvent)).all()
        assert sorted(r.status for r in rows) == ["charged"] * len(ok) + ["released"] * len(busy)
        assert sum(r.credits for r in rows) == len(ok)


def test_one_slot_waiting_longer_than_the_queue_timeout_answers_503(queue_server, engine, monkeypatch):
    monkeypatch.setattr(engine, "queue_timeout", 0.5)
    monkeypatch.setattr(queue_server.app.state.fairness, "timeout", 0.5)  # the gate's wait, before the engine's
    results: dict[int, tuple] = {}
    # The first stream must still be running when the second has waited 0.5 s: ~3 s at 100 tok/s.
    first = threading.Thread(target=stream_to_end, args=(queue_server, {**QUEUED, "max_tokens": 300}, results, 0))
    first.start()
    time.sleep(0.3)
    started = time.monotonic()
    r = httpx.post(
        f"{queue_server.url}/v1/chat/completions",
        json={**QUEUED, "max_tokens": 5},
        headers={"Authorization": f"Bearer {queue_server.key}"},
        timeout=60,
    )
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "engine_overloaded"
    assert time.monotonic() - started < 5
    first.join(timeout=180)
    assert results[0][0] == 200


def test_one_slot_a_disconnect_frees_the_engine_for_the_next_request(queue_server):
    headers = {"Authorization": f"Bearer {queue_server.key}"}
    url = f"{queue_server.url}/v1/chat/completions"
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url, json={**QUEUED, "max_tokens": 1500, "stream": True}, headers=headers) as r:
            lines = r.iter_lines()
            received = [line for line, _ in zip(lines, range(12)) if line.startswith("data: ")]
        assert len(received) >= 5  # the stream was running when we hung up
        # The abandoned stream had ~1,490 tokens (~20 s) to go; the next request must start at once.
        started = time.monotonic()
        with c.stream("POST", url, json={**QUEUED, "max_tokens": 5, "stream": True}, headers=headers) as r2:
            first_token = next(line for line in r2.iter_lines() if '"content":"' in line and '"role"' not in line)
            elapsed = time.monotonic() - started
            assert first_token
    assert elapsed < 2.0, f"next request waited {elapsed:.2f}s for its first token"
    time.sleep(0.3)
    settled(queue_server)
    with queue_server.db.session() as s:
        cut = s.scalars(select(UsageEvent).order_by(UsageEvent.id)).first()
        assert cut.status == "charged"
        assert 1 <= cut.completion_tokens < 100  # what was generated before the hang-up, not 1,500


def test_one_slot_a_non_streaming_caller_that_hangs_up_frees_the_engine_and_pays_nothing(queue_server):
    headers = {"Authorization": f"Bearer {queue_server.key}"}
    url = f"{queue_server.url}/v1/chat/completions"
    with pytest.raises(httpx.ReadTimeout):  # ~1,500 tokens would take ~20 s; the caller gives up after 1 s
        httpx.post(url, json={**QUEUED, "max_tokens": 1500}, headers=headers, timeout=1.0)
    started = time.monotonic()
    r = httpx.post(url, json={**QUEUED, "max_tokens": 5}, headers=headers, timeout=60)
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert elapsed < 2.0, f"the next request waited {elapsed:.2f}s behind the abandoned one"
    with queue_server.db.session() as s:
        abandoned = s.scalars(select(UsageEvent).order_by(UsageEvent.id)).first()
    assert (abandoned.status, abandoned.credits) == ("released", 0)  # it received nothing


def test_one_slot_the_server_stays_responsive_during_a_long_generation(queue_server):
    results: dict[int, tuple] = {}
    t = threading.Thread(target=stream_to_end, args=(queue_server, {**QUEUED, "max_tokens": 150}, results, 0))
    t.start()
    time.sleep(0.5)
    worst = 0.0
    for _ in range(10):
        started = time.monotonic()
        assert httpx.get(f"{queue_server.url}/healthz", timeout=10).status_code == 200
        worst = max(worst, time.monotonic() - started)
    assert t.is_alive(), "the generation should still be running"
    assert worst < 0.5
    t.join(timeout=60)


def test_one_slot_usage_chunk_tokens_match_what_was_streamed(queue_server):
    body = {**QUEUED, "max_tokens": 25, "stream": True, "stream_options": {"include_usage": True}}
    r = httpx.post(
        f"{queue_server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {queue_server.key}"},
        timeout=60,
    )
    usage_chunk = sse_events(r.text)[-2]
    assert isinstance(usage_chunk, dict)
    assert usage_chunk["usage"]["completion_tokens"] == 25
    assert usage_chunk["x_ratelimit"]["remaining"] == 100_000 - 1
