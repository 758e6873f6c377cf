"""The scripted engine keeps the Engine contract the other tests rely on: exact counts, max_tokens, stop
strings, the context window, closing stops generation, and the failures it is told to inject."""

from __future__ import annotations

import asyncio

import pytest

from aimichat.engines.base import ContextLengthExceeded, Delta, Engine, EngineBusy, EngineError, Finish, Message
from aimichat.engines.base import SamplingParams as Params
from scripted_engine import MESSAGE_OVERHEAD, ScriptedEngine, echo, endless

HI = [Message("user", "Say hi")]


def run(engine: ScriptedEngine, messages: list[Message], params: Params) -> tuple[list[Delta], Finish]:
    async def go() -> tuple[list[Delta], Finish]:
        prompt = await engine.prepare(messages)
        events = [event async for event in engine.generate(prompt, params)]
        *deltas, finish = events
        assert all(isinstance(d, Delta) for d in deltas) and isinstance(finish, Finish)
        return deltas, finish

    return asyncio.run(go())


def test_it_is_an_engine_and_counts_words_as_tokens():
    engine = ScriptedEngine("one two three", system_prompt="Be brief.")
    assert isinstance(engine, Engine)
    deltas, finish = run(engine, HI, Params(max_tokens=10))
    assert "".join(d.text for d in deltas) == "one two three" and [d.tokens for d in deltas] == [1, 1, 1]
    assert finish == Finish("stop", 2 + 2 + 2 * MESSAGE_OVERHEAD, 3)  # "Be brief." and "Say hi", with markers
    assert engine.generations[0].messages == (Message("system", "Be brief."), *HI)
    assert engine.stats().running == 0 and engine.generations[0].outcome == "finished"


def test_max_tokens_and_stop_strings():
    deltas, finish = run(ScriptedEngine(endless()), HI, Params(max_tokens=4))
    assert "".join(d.text for d in deltas) == "one two three four" and finish.finish_reason == "length"
    deltas, finish = run(ScriptedEngine(endless()), HI, Params(max_tokens=50, stop=("hree f",)))
    assert "".join(d.text for d in deltas) == "one two t" and finish.finish_reason == "stop"
    assert finish.completion_tokens == 4 and sum(d.tokens for d in deltas) == 3  # "four" was read, never shown
    deltas, _ = run(ScriptedEngine(echo), [Message("user", "a b c")], Params(max_tokens=50, stop=("c d",)))
    assert "".join(d.text for d in deltas) == "a b c"  # held back while it could become the stop string, then sent


def test_a_prompt_longer_than_the_context_is_refused():
    engine = ScriptedEngine(context_length=10)
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(engine.prepare([Message("user", "w " * 7)]))  # 7 words and 3 markers
    assert asyncio.run(engine.prepare([Message("user", "w " * 6)])).max_completion_tokens == 1


def test_closing_the_stream_stops_generation():
    engine = ScriptedEngine(endless())

    async def go() -> None:
        events = engine.generate(await engine.prepare(HI), Params(max_tokens=1000))
        assert isinstance(await anext(events), Delta)
        assert engine.stats().running == 1
        await events.aclose()

    asyncio.run(go())
    assert (engine.generations[0].outcome, engine.generations[0].tokens) == ("closed", 1)
    assert engine.stats().running == 0


def test_injected_failures_and_delays():
    with pytest.raises(EngineBusy):
        run(ScriptedEngine(error=EngineBusy("full", retry_after=3)), HI, Params(max_tokens=5))
    with pytest.raises(EngineError, match="injected"):
        run(ScriptedEngine(endless(), fail_after=2), HI, Params(max_tokens=5))
    engine = ScriptedEngine("a b c", first_token_delay=0.1, token_delay=0.05)

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async for _ in engine.generate(await engine.prepare(HI), Params(max_tokens=5)):
            pass
        return loop.time() - start

    assert 0.2 <= asyncio.run(timed()) < 1.0
