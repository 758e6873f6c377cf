"""Request and response schemas of ``POST /v1/chat/completions`` (OpenAI-compatible)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, NotRequired, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from aimichat.engines.base import FinishReason, Message

UNSUPPORTED_PARAMETER = "unsupported_parameter"  # the error type of a refusal below; its ctx names the param


INVALID_TEXT = "invalid_text"  # a string that is no Unicode text; its ctx names the param too


def first_lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string of ``value`` (JSON may escape one: ``\\ud800``), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return value[exc.start]
        return None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            if (bad := first_lone_surrogate(item)) is not None:
                return bad
    return None


def unsupported(param: str, reason: str) -> PydanticCustomError:
    """A refusal of one request parameter: the 400 names ``param`` (read from the error's ctx, not its text)."""
    return PydanticCustomError(UNSUPPORTED_PARAMETER, "'{param}': {reason}", {"param": param, "reason": reason})


# Fields OpenAI accepts that this server cannot honour: refused with a 400 that says so,
# rather than silently ignored and giving the caller something other than what they asked for.
UNSUPPORTED = {
    "tools": "Tool calling is not supported by this server.",
    "tool_choice": "Tool calling is not supported by this server.",
    "functions": "Function calling is not supported by this server.",
    "function_call": "Function calling is not supported by this server.",
    "parallel_tool_calls": "Tool calling is not supported by this server.",
    "top_logprobs": "logprobs are not supported by this server.",
    "audio": "Audio output is not supported by this server.",
    "prediction": "Predicted outputs are not supported by this server.",
}


# Strict scalar types: "max_tokens": "2" or "stream": "yes" is a 400 naming the parameter, as at OpenAI,
# rather than silently coerced (pydantic's lax mode would take both). A float may still be given as 1.
Int: TypeAlias = Annotated[int, Strict()]
Float: TypeAlias = Annotated[float, Strict()]
Bool: TypeAlias = Annotated[bool, Strict()]
Str: TypeAlias = Annotated[str, Strict()]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Str
    text: Str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Str
    content: Str | list[TextPart] | None = None
    name: Str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role == "developer":  # OpenAI's newer name for the system role
            return "system"
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role '{role}' is not supported; use 'system', 'user' or 'assistant'")
        return role

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise unsupported(
                    "messages", f"content parts of type '{part.type}' are not supported; only 'text' parts are"
                )
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Bool = False


# Fields an upstream server may honour that AimiChat itself does not interpret (vLLM's guided decoding,
# llama.cpp's and Ollama's samplers…): forwarded to upstream models as sent, ignored by embedded ones.
# Anything else unknown is dropped (never forwarded blindly: a field must be known to be a sampling option).
PASS_THROUGH = frozenset(
    {
        "top_k", "min_p", "typical_p", "repetition_penalty", "repeat_penalty", "repeat_last_n", "mirostat",
        "mirostat_tau", "mirostat_eta", "tfs_z", "logit_bias", "min_tokens", "ignore_eos", "skip_special_tokens",
        "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
        "structured_outputs", "grammar", "json_schema", "chat_template_kwargs", "keep_alive", "options",
        "reasoning_effort", "service_tier", "metadata", "store",
    }
)  # fmt: skip


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage]
    model: Str | None = None
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    stop: Str | list[Str] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    n: Int | None = Field(None, ge=1)
    user: Str | None = None
    logprobs: Bool | None = None
    mode: Str | None = None  # AimiChat: keys may only use "talk"
    response_format: dict[str, Any] | None = None
    _grammar: str | None = PrivateAttr(default=None)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("'messages' must contain at least one message")
        return messages

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stop

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():  # before pydantic, whose str validation is inconsistent about them
                if (bad := first_lone_surrogate(value)) is not None:
                    reason = f"contains a lone surrogate (\\u{ord(bad):04x}), which is not valid Unicode text"
                    raise PydanticCustomError(INVALID_TEXT, "'{param}': {reason}", {"param": name, "reason": reason})
            for name, reason in UNSUPPORTED.items():
                if data.get(name) not in (None, [], False):
                    raise unsupported(name, reason)
        return data

    @model_validator(mode="after")
    def _refuse_unsupported_values(self) -> ChatCompletionRequest:
        if self.n not in (None, 1):
            raise unsupported("n", "more than one choice (n > 1) is not supported by this server")
        if self.logprobs:
            raise unsupported("logprobs", "logprobs are not supported by this server")
        self._grammar = self._build_grammar()  # refuses a response format it cannot honour
        for message in self.messages:
            message.text()  # raises for image or audio parts
        return self

    def passthrough(self) -> dict[str, Any]:
        """The fields an upstream model receives as sent (see ``PASS_THROUGH``)."""
        extra = self.model_extra or {}
        return {name: value for name, value in extra.items() if name in PASS_THROUGH}

    def structured(self) -> bool:
        return bool(self.response_format) and self.response_format.get("type", "text") != "text"  # type: ignore[union-attr]

    def grammar(self) -> str | None:
        """The GBNF an embedded model's sampling follows for ``response_format`` (None: free text)."""
        return self._grammar

    def _build_grammar(self) -> str | None:
        """See :meth:`grammar`.

        ``json_object``: any JSON object; ``json_schema``: llama-cpp-python's converter of the schema (OpenAI's
        ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``), so every complete answer
        parses and validates; an answer cut by ``max_tokens`` ends with ``finish_reason: "length"``.
        """
        if not self.structured():
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        fmt = self.response_format or {}
        kind = fmt.get("type")
        if kind == "json_object" and "schema" not in fmt:
            return JSON_GBNF
        if kind == "json_object":  # llama.cpp's server's dialect: {"type": "json_object", "schema": {...}}
            fmt = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt["schema"]}}
            kind = "json_schema"
        if kind != "json_schema":
            raise unsupported("response_format", f"unknown type '{kind}': use 'text', 'json_object' or 'json_schema'")
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise unsupported("response_format", "'json_schema' needs {'name': ..., 'schema': {...}}")
        try:
            grammar: str = json_schema_to_gbnf(json.dumps(schema))
            return grammar
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise unsupported("response_format", f"this JSON schema cannot be turned into a grammar: {exc}") from None

    def engine_messages(self) -> list[Message]:
        return [Message(m.role, m.text()) for m in self.messages]

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# Response shapes. serving.py builds them as plain dicts (a pydantic model per chunk costs more than the
# rest of the hop); as TypedDicts they are still checked by mypy where they are built, and are what the
# OpenAPI document shows. tests/api/test_protocol.py validates real answers against them.


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str


class Choice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str


class ChunkChoice(TypedDict):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: FinishReason | None


class RateLimitInfo(TypedDict):
    """AimiChat's addition to the usage chunk: the X-RateLimit-* figures after settlement."""

    limit: int
    remaining: int
    reset: str


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: NotRequired[Usage]
    x_ratelimit: NotRequired[RateLimitInfo]
