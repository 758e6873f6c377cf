"""The one interface every engine implements, and the errors engines raise.

The API layer only ever talks to an :class:`Engine`. An engine turns chat messages into a stream of
:class:`Delta` pieces and always ends with exactly one :class:`Finish` carrying exact token usage,
which is what credits are charged from.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

# OpenAI's shapes, kept as JSON objects end to end so that an upstream receives, and the caller gets back,
# exactly what was sent: a tool is {"type": "function", "function": {"name", "description", "parameters"}};
# a call is {"id", "type": "function", "function": {"name", "arguments"}} (arguments: a JSON text).
JSON = dict[str, Any]


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[JSON, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # the call a "tool" message answers
    # The message as the caller sent it, for an upstream (content parts such as images, names, refusals);
    # None: role and content say it all.
    raw: Mapping[str, Any] | None = field(default=None, compare=False)

    def as_json(self) -> JSON:
        """The message as an OpenAI-compatible server takes it."""
        if self.raw is not None:
            return dict(self.raw)
        body: JSON = {"role": self.role, "content": self.content}
        if self.tool_calls:
            body["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            body["tool_call_id"] = self.tool_call_id
        return body


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None  # GBNF every token must follow (structured output on the embedded engine)
    response_format: dict[str, Any] | None = None  # the caller's, as sent: forwarded as is to an upstream
    extra: dict[str, Any] = field(default_factory=dict)  # more fields an upstream receives as sent
    n: int = 1  # choices to generate, each with its own Delta.index
    logprobs: bool = False
    top_logprobs: int = 0  # 0-20 alternatives per token, with logprobs
    tools: tuple[JSON, ...] = ()  # functions the model may call
    tool_choice: str | JSON | None = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None

    def calls_tools(self) -> bool:
        """May the answer be a tool call?"""
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(frozen=True)
class Delta:
    """A piece of one choice's answer, handed to the client as soon as it exists: text, and for some
    answers pieces of tool calls, log probabilities or fields an upstream sent that we pass on as sent."""

    text: str
    tokens: int = 1  # completion tokens this piece carries (what a caller cut off mid-stream pays for)
    index: int = 0  # the choice (n > 1)
    # OpenAI's stream shape: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}, arguments in pieces.
    tool_calls: tuple[JSON, ...] = ()
    logprobs: tuple[JSON, ...] = ()  # OpenAI's ``logprobs.content`` entries of this piece's tokens
    extra: Mapping[str, Any] | None = None  # other delta fields of an upstream (reasoning_content, refusal)


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


@dataclass(frozen=True)
class Finish:
    finish_reason: FinishReason  # the first choice's
    prompt_tokens: int
    completion_tokens: int  # every choice's together
    estimated: bool = False  # usage guessed rather than counted (some upstreams send none)
    reasons: tuple[FinishReason, ...] = ()  # every choice's finish reason, by index, when n > 1

    def reason(self, index: int) -> FinishReason:
        return self.reasons[index] if index < len(self.reasons) else self.finish_reason


Event = Delta | Finish


@dataclass(frozen=True)
class EngineStats:
    """What an engine reports about itself: read by ``/readyz`` and by the Prometheus gauges.

    ``running`` and ``queued`` are counted by every engine; ``slots`` only by engines that have them
    (None otherwise); ``details`` holds what is particular to one kind of engine (its upstreams, its
    prompt cache), shown as is on ``/readyz``.
    """

    ready: bool
    kind: str  # "llama" | "upstream" | "scripted": shown as /readyz's engine.engine
    model: str | None  # the file or upstream model name behind the public id
    running: int = 0  # requests generating now
    queued: int = 0  # requests waiting for the engine
    slots: int | None = None  # sequences the engine decodes together
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ``engine`` object of ``/readyz``."""
        body: dict[str, Any] = {
            "engine": self.kind,
            "model": self.model,
            "loaded": self.ready,
            "running": self.running,
            "queued": self.queued,
        }
        if self.slots is not None:
            body |= {"slots": self.slots, "slots_busy": self.running}
        return body | self.details


def with_default_system_prompt(messages: list[Message], system_prompt: str) -> list[Message]:
    """The chat as an engine renders it: ``system_prompt`` first when the caller sent no system message."""
    if not system_prompt or any(m.role == "system" for m in messages):
        return list(messages)
    return [Message("system", system_prompt), *messages]


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


class InvalidRequest(EngineError):
    """The request asks for what this engine can never do (not a failure: retrying cannot help)."""

    def __init__(self, reason: str, *, code: str = "invalid_value", param: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code
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

    def stats(self) -> EngineStats:
        """Readiness and load, cheap enough to call on every ``/readyz`` and metrics scrape."""
        ...

    async def prepare(self, messages: list[Message], tools: Sequence[JSON] = ()) -> PreparedPrompt:
        """Render and count the prompt (with the ``tools`` the model may call); raises ContextLengthExceeded
        when it cannot fit."""
        ...

    def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncGenerator[Event, None]:
        """Stream Delta events and end with one Finish. Closing the iterator stops generation."""
        ...
