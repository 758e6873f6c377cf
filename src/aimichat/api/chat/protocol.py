"""Request and response schemas of ``POST /v1/chat/completions`` (OpenAI-compatible)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from aimichat.engines import tools as tool_calls
from aimichat.engines.base import JSON, FinishReason, Message

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
    "functions": "The legacy 'functions' parameter is not supported; send the same functions as 'tools'.",
    "function_call": "The legacy 'function_call' parameter is not supported; use 'tool_choice'.",
    "audio": "Audio output is not supported by this server.",
    "prediction": "Predicted outputs are not supported by this server.",
}

MAX_N = 128  # OpenAI's own bound on n; each tier has its own, lower cap (``tiers set --max-n``)
MAX_TOOLS = 128  # OpenAI's bound on the functions of one request


# Strict scalar types: "max_tokens": "2" or "stream": "yes" is a 400 naming the parameter, as at OpenAI,
# rather than silently coerced (pydantic's lax mode would take both). A float may still be given as 1.
Int: TypeAlias = Annotated[int, Strict()]
Float: TypeAlias = Annotated[float, Strict()]
Bool: TypeAlias = Annotated[bool, Strict()]
Str: TypeAlias = Annotated[str, Strict()]


class ContentPart(BaseModel):
    """A part of a message's content: text, or an image, audio or file an upstream model may read."""

    model_config = ConfigDict(extra="allow")
    type: Str
    text: Str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Str
    arguments: Str = "{}"


class ToolCall(BaseModel):
    """A call an assistant message made earlier in the chat."""

    model_config = ConfigDict(extra="ignore")
    id: Str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. an upstream's "reasoning_content": passed on as sent

    role: Str
    content: Str | list[ContentPart] | None = None
    name: Str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role == "developer":  # OpenAI's newer name for the system role
            return "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"role '{role}' is not supported; use 'system', 'user', 'assistant' or 'tool'")
        return role

    @model_validator(mode="after")
    def _tool_message(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the 'tool_call_id' of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry 'tool_calls'")
        return self

    def has_media(self) -> bool:
        """Does the content hold parts other than text (images, audio, files)?"""
        return isinstance(self.content, list) and any(part.type != "text" for part in self.content)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise unsupported(
                    "messages",
                    f"content parts of type '{part.type}' are only read by models marked multimodal; "
                    "this model reads 'text' parts only",
                )
            parts.append(part.text)
        return "".join(parts)

    def engine_message(self) -> Message:
        """The message for an engine. What role, text and calls cannot say (images and other parts, a name,
        an upstream's own fields) is kept as sent for an upstream; text parts are joined, as some servers
        (llama-cpp-python's) take content as a string only."""
        calls = tuple(call.model_dump() for call in self.tool_calls or ())
        media = self.has_media()
        text = "" if media else self.text()
        raw: dict[str, Any] | None = None
        if media or self.name is not None or self.model_extra or self.tool_calls:
            raw = self.model_dump(exclude_none=True)
            if not media:
                # As sent: an answer of calls only may come with "content": null or "".
                raw["content"] = None if self.content is None else text
        return Message(self.role, text, tool_calls=calls, tool_call_id=self.tool_call_id, raw=raw)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Str
    description: Str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not tool_calls.FUNCTION_NAME.match(name):
            raise ValueError(f"function name '{name}' must be 1-64 letters, digits, underscores or dashes")
        return name


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionSpec


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
    n: Int | None = Field(None, ge=1, le=MAX_N)
    user: Str | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: Bool | None = None
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
        if self.top_logprobs and not self.logprobs:
            raise unsupported("top_logprobs", "top_logprobs needs 'logprobs': true")
        self._check_tool_choice()
        if self.calls_tools():
            try:  # the embedded engines' grammar; an upstream constrains its own sampling
                self._grammar = tool_calls.tool_grammar(self.tool_specs(), self.tool_choice, self.parallel_tool_calls)
            except tool_calls.ToolError as exc:
                raise unsupported("tools", str(exc)) from None
        else:
            self._grammar = self._build_grammar()  # refuses a response format it cannot honour
        return self

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not isinstance(name, str):
                raise unsupported(
                    "tool_choice", "use 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
                )
            if name not in tool_calls.function_names(self.tool_specs()):
                raise unsupported("tool_choice", f"the function '{name}' is not among the tools")
        elif choice in ("required",) and not self.tools:
            raise unsupported("tool_choice", "'required' needs at least one tool in 'tools'")

    def tool_specs(self) -> tuple[JSON, ...]:
        """The tools as sent (unknown fields kept, for an upstream)."""
        return tuple(tool.model_dump(exclude_none=True) for tool in self.tools or ())

    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def has_media(self) -> bool:
        return any(message.has_media() for message in self.messages)

    def choices(self) -> int:
        return self.n or 1

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
        from llama_cpp.llama_grammar import JSON_GBNF

        from aimichat.engines.json_grammar import schema_grammar

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
            return schema_grammar(schema)
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise unsupported("response_format", f"this JSON schema cannot be turned into a grammar: {exc}") from None

    def engine_messages(self) -> list[Message]:
        return [m.engine_message() for m in self.messages]

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


class FunctionCallOut(TypedDict):
    name: str
    arguments: str  # a JSON text


class ToolCallOut(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(TypedDict):
    content: list[TokenLogprob] | None
    refusal: NotRequired[None]


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None  # None when the answer is tool calls only
    tool_calls: NotRequired[list[ToolCallOut]]


class Choice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkFunction(TypedDict, total=False):
    name: str
    arguments: str  # this piece of the arguments' JSON text


class ChunkToolCall(TypedDict, total=False):
    index: int
    id: str
    type: Literal["function"]
    function: ChunkFunction


class ChunkDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ChunkToolCall]


class ChunkChoice(TypedDict):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
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
