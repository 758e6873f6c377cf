"""The one interface every engine implements, and the errors engines raise.

The API layer only ever talks to an :class:`Engine`. An engine turns chat messages into a stream of
:class:`Delta` pieces and always ends with exactly one :class:`Finish` carrying exact token usage,
which is what credits are charged from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Delta:
    """A piece of generated text, handed to the client as soon as it exists."""

    text: str
    tokens: int = 1  # completion tokens this piece carries (what a caller cut off mid-stream pays for)


@dataclass(frozen=True)
class Finish:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False  # usage guessed rather than counted (some upstreams send none)


Event = Delta | Finish


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt rendered and counted by the engine, so callers can reserve credits before generating."""

    messages: tuple[Message, ...]
    prompt_tokens: int
    max_completion_tokens: int  # what still fits in the context window
    payload: object = field(default=None, compare=False)  # engine-private (e.g. token ids)
    estimated: bool = False  # prompt_tokens is a guess (an upstream engine without a tokenizer here)


class EngineError(Exception):
    """The engine failed; nothing useful was produced."""


class EngineBusy(EngineError):
    """The engine cannot take the request now (queue full or wait too long); retry later."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRejected(EngineError):
    """An upstream model server refused the request itself (its 4xx): the caller's to fix, never retried."""

    def __init__(self, reason: str, *, code: str | None = None, param: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code  # e.g. "context_length_exceeded"
        self.param = param


class ContextLengthExceeded(EngineError):
    def __init__(self, prompt_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, "
            f"but your messages use {prompt_tokens} tokens. Shorten the messages."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


@runtime_checkable
class Engine(Protocol):
    model_id: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> tuple[bool, dict]:
        """(is ready, details for /readyz)."""
        ...

    async def prepare(self, messages: list[Message]) -> PreparedPrompt:
        """Render and count the prompt; raises ContextLengthExceeded when it cannot fit."""
        ...

    def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncIterator[Event]:
        """Stream Delta events and end with one Finish. Closing the iterator stops generation."""
        ...
