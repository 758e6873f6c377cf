"""A small, deterministic engine for the tests that do not test the model.

It implements :class:`aimichat.engines.base.Engine` as the real engines do: the prompt is counted in
``prepare`` (too long raises ContextLengthExceeded), ``generate`` streams :class:`Delta` pieces that honour
``max_tokens`` and stop strings, closing the iterator stops generation, and it always ends with exactly one
:class:`Finish` carrying exact counts. Its "tokens" are words: a message costs its words plus
``MESSAGE_OVERHEAD`` (role markers, as a chat template adds), and every word of the reply is one token.

Failures and delays are injected per engine: ``error`` (raised before the first token: an EngineError, or
EngineBusy for a full queue), ``fail_after`` (an EngineError after that many tokens), ``first_token_delay``
and ``token_delay`` (seconds). Each call of ``generate`` is recorded in ``generations``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aimichat.config import PUBLIC_MODEL_ID
from aimichat.engines.base import (
    ContextLengthExceeded,
    Delta,
    EngineBusy,
    EngineError,
    EngineStats,
    Event,
    Finish,
    FinishReason,
    Message,
    PreparedPrompt,
    SamplingParams,
    with_default_system_prompt,
)
from aimichat.engines.text import StopScanner

MESSAGE_OVERHEAD = 3  # tokens a message costs beyond its words
REPLY = "Hello! I am the scripted engine, and every word I say is one token."

Reply = str | Callable[[Sequence[Message]], Iterable[str]]


def endless(words: str = "one two three four five six seven eight nine ten") -> Reply:
    """A reply that never ends by itself: ``words`` over and over, so only max_tokens or a stop string ends it."""
    return lambda messages: itertools.cycle(words.split())


def echo(messages: Sequence[Message]) -> Iterable[str]:
    """A reply that repeats the last message's words."""
    return messages[-1].content.split()


@dataclass
class Generation:
    """What one ``generate`` call did."""

    messages: tuple[Message, ...]  # as the engine renders them (the default system prompt added)
    prompt_tokens: int
    params: SamplingParams
    tokens: int = 0  # reply tokens produced
    outcome: str = "running"  # "running" | "finished" | "closed" (its consumer went away) | "failed"


class ScriptedEngine:
    """Words for tokens, a fixed (or computed) reply, and failures and delays on demand."""

    def __init__(
        self,
        reply: Reply = REPLY,
        *,
        model_id: str = PUBLIC_MODEL_ID,
        context_length: int = 2048,
        system_prompt: str = "",
        first_token_delay: float = 0.0,
        token_delay: float = 0.0,
        error: EngineError | None = None,
        fail_after: int | None = None,
        max_running: int | None = None,
    ):
        self.model_id = model_id
        self.reply = reply
        self.context_length = context_length
        self.system_prompt = system_prompt
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.error = error
        self.fail_after = fail_after
        self.max_running = max_running  # more concurrent generations than this are refused with EngineBusy
        self.loaded = False  # start() loads, close() unloads; a test may set it to see /readyz answer 503
        self.running = 0
        self.generations: list[Generation] = []
        self.tools_offered: list[tuple[dict[str, Any], ...]] = []  # the tools each prepare() was given

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loaded = True

    async def close(self) -> None:
        self.loaded = False

    def stats(self) -> EngineStats:
        return EngineStats(
            ready=self.loaded,
            kind="scripted",
            model="scripted",
            running=self.running,
            details={"context_length": self.context_length},
        )

    # -- prompt ------------------------------------------------------------------------------------

    def tokenize_chat(self, messages: Sequence[Message]) -> list[str]:
        """The prompt's tokens: each message's role marker, its words, and an end marker (as a chat template)."""
        tokens: list[str] = []
        for m in with_default_system_prompt(list(messages), self.system_prompt):
            tokens += [f"<{m.role}>", *m.content.split(), *["</>"] * (MESSAGE_OVERHEAD - 1)]
        return tokens

    async def prepare(self, messages: list[Message], tools: Sequence[dict[str, Any]] = ()) -> PreparedPrompt:
        tokens = self.tokenize_chat(messages)
        room = self.context_length - len(tokens)
        if room < 1:
            raise ContextLengthExceeded(len(tokens), self.context_length)
        rendered = tuple(with_default_system_prompt(list(messages), self.system_prompt))
        self.tools_offered.append(tuple(tools))
        return PreparedPrompt(rendered, len(tokens), room)

    # -- generation --------------------------------------------------------------------------------

    def words(self, messages: Sequence[Message]) -> Iterable[str]:
        return self.reply.split() if isinstance(self.reply, str) else self.reply(messages)

    async def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncIterator[Event]:
        if self.error is not None:
            raise self.error
        if self.max_running is not None and self.running >= self.max_running:
            raise EngineBusy("The engine queue is full; retry shortly.", retry_after=2)
        record = Generation(prompt.messages, prompt.prompt_tokens, params)
        self.generations.append(record)
        self.running += 1
        try:
            if self.first_token_delay:
                await asyncio.sleep(self.first_token_delay)
            reasons: list[FinishReason] = []
            for index in range(params.n):  # n choices, one after the other, each the same reply
                words = iter(self.words(prompt.messages))
                stops = StopScanner(params.stop)
                finish: FinishReason = "stop"
                hit_stop, pending, made = False, 0, 0
                while True:
                    if self.fail_after is not None and record.tokens >= self.fail_after:
                        record.outcome = "failed"
                        raise EngineError("injected failure")
                    word = next(words, None)
                    if word is None:  # the reply is complete (a model's end-of-turn token)
                        break
                    if self.token_delay and record.tokens:
                        await asyncio.sleep(self.token_delay)
                    out, hit_stop = stops.push(word if made == 0 else " " + word)
                    record.tokens += 1
                    made += 1
                    pending += 1
                    if out:
                        yield Delta(out, pending, index=index)
                        pending = 0
                    if hit_stop:
                        break
                    if made >= params.max_tokens:
                        finish = "length"
                        break
                if not hit_stop and (tail := stops.flush()):
                    yield Delta(tail, pending, index=index)
                reasons.append(finish)
            record.outcome = "finished"
            every = tuple(reasons) if params.n > 1 else ()
            yield Finish(reasons[0], prompt.prompt_tokens, record.tokens, reasons=every)
        finally:
            if record.outcome == "running":
                record.outcome = "closed"
            self.running -= 1
