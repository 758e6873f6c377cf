"""The request of ``POST /v1/responses``, its translation into a chat completion request, and the shapes
of what it answers.

Stateless (``store: false``): ``previous_response_id`` and stored responses are refused with a 400 that
says so. Function tools are the chat service's tools in another shape:

- a tool is flat here (``{"type": "function", "name", "description", "parameters", "strict"}``) and nested
  under ``"function"`` in chat; other tool types (``web_search``, ``file_search``…) need OpenAI's own
  services and are refused with a 400 naming the type;
- ``tool_choice`` ``{"type": "function", "name": ...}`` is chat's ``{"type": "function", "function": {"name"}}``;
- ``function_call`` input items are an assistant message's ``tool_calls`` (following calls, and the
  assistant's text just before them, make one message, as the model wrote them) and a
  ``function_call_output`` item is a ``tool`` message answering an earlier call's ``call_id``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from aimichat.api.chat.protocol import (
    MAX_TOOLS,
    Bool,
    ChatCompletionRequest,
    Float,
    FunctionSpec,
    Int,
    Str,
    first_lone_surrogate,
    unsupported,
)

_REFUSED = {
    "previous_response_id": "Responses are not stored here (store: false), so there is no previous response "
    "to continue: send the whole conversation as 'input'.",
    "reasoning": "Reasoning options are not supported by the models of this server.",
    "background": "Background responses are not supported by this server.",
    "conversation": "Conversations are not stored by this server: send the whole conversation as 'input'.",
}
_ROLES = {"user", "assistant", "system", "developer"}
_TEXT_PARTS = ("input_text", "output_text", "text")
_TOOL_CHOICES = ("none", "auto", "required")
# A chat parameter as the Responses API calls it, for a 400 raised while validating the chat request.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class FunctionTool(FunctionSpec):
    """A function the model may call, in the Responses API's flat shape: chat's function and its ``type``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]

    def chat_tool(self) -> dict[str, Any]:
        """The same tool as chat completions take it (nested under ``function``)."""
        function = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"type": "function", "function": function}

    def echo(self) -> FunctionToolOut:
        """The tool as the response object repeats it."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }


ToolChoice: TypeAlias = Literal["none", "auto", "required"] | dict[str, Any]


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Str | None = None
    input: Str | list[dict[str, Any]]
    instructions: Str | None = None
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    stream: Bool | None = False
    store: Bool | None = None
    text: dict[str, Any] | None = None
    user: Str | None = None
    metadata: dict[str, Any] | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    _chat: ChatCompletionRequest | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                if first_lone_surrogate(value) is not None:
                    raise unsupported(name, "contains a lone surrogate, which is not valid Unicode text")
            for name, reason in _REFUSED.items():
                if data.get(name) not in (None, [], "auto", "none"):
                    raise unsupported(name, reason)
            if data.get("store") is True:
                raise unsupported("store", "responses are not stored by this server: send 'store': false")
            if isinstance(data.get("tools"), list):
                for tool in data["tools"]:
                    check_tool(tool)
            check_tool_choice(data.get("tool_choice"))
        return data

    @model_validator(mode="after")
    def _as_chat(self) -> ResponsesRequest:
        """Build the chat request while validating, so whatever cannot map is this request's 400."""
        try:
            self._chat = self._chat_request()
        except ValidationError as exc:
            first = exc.errors()[0]
            ctx = first.get("ctx") or {}
            where = str(ctx.get("param") or ".".join(str(p) for p in first.get("loc", ())))
            reason = str(ctx.get("reason") or first.get("msg", "invalid value")).removeprefix("Value error, ")
            raise unsupported(_PARAMS.get(where.split(".")[0], where) or "input", reason) from None
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion (what the chat service runs)."""
        assert self._chat is not None  # built by validation
        return self._chat

    def _chat_request(self) -> ChatCompletionRequest:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += chat_messages(self.input)
        body: dict[str, Any] = {
            "messages": messages,
            "model": self.model,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": bool(self.stream),
            "response_format": _response_format(self.text),
            "tools": [tool.chat_tool() for tool in self.tools] if self.tools else None,
            "tool_choice": chat_tool_choice(self.tool_choice),
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})

    def echoed_tools(self) -> list[FunctionToolOut]:
        return [tool.echo() for tool in self.tools or ()]


def check_tool(tool: Any) -> None:
    """Refuse a tool this server cannot run, naming its type (OpenAI's hosted tools need OpenAI's services)."""
    if not isinstance(tool, dict):
        return  # pydantic says what is wrong with it
    kind = tool.get("type")
    if kind == "function" and "name" not in tool and isinstance(tool.get("function"), dict):
        raise unsupported(
            "tools",
            "a function tool of the Responses API is flat: {'type': 'function', 'name': ..., 'parameters': "
            "{...}}, not nested under 'function' as in chat completions",
        )
    if kind != "function":
        raise unsupported("tools", f"tools of type '{kind}' are not supported by this server: only 'function' tools")


def check_tool_choice(choice: Any) -> None:
    """Refuse a tool choice other than ``none``, ``auto``, ``required`` or one named function."""
    if choice is None or choice in _TOOL_CHOICES:
        return
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return
    kind = f"'{choice.get('type')}' " if isinstance(choice, dict) else ""
    raise unsupported(
        "tool_choice",
        f"the tool choice {kind}is not supported: use 'none', 'auto', 'required' or "
        "{'type': 'function', 'name': ...}",
    )


def chat_tool_choice(choice: ToolChoice | None) -> str | dict[str, Any] | None:
    """``tool_choice`` as chat completions take it."""
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def chat_messages(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages.

    A ``function_call`` item joins the assistant message just before it (its text, or the calls before it),
    so one turn's text and calls stay one message, as the model wrote them; a ``function_call_output``
    must answer a call made earlier in the input.
    """
    messages: list[dict[str, Any]] = []
    calls: set[str] = set()
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            call = _tool_call(item)
            calls.add(call["id"])
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", kind)
            if call_id not in calls:
                raise unsupported(
                    "input",
                    f"no function_call item with call_id '{call_id}' comes before its function_call_output",
                )
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output(item.get("output"))})
        else:
            messages.append(_message(item))
    return messages


def _tool_call(item: dict[str, Any]) -> dict[str, Any]:
    """A ``function_call`` item as a chat ``tool_calls`` entry (the call's ``call_id`` is its ``id``)."""
    arguments = _string(item, "arguments", "function_call", empty=True)
    try:
        json.loads(arguments or "{}")
    except ValueError:
        raise unsupported("input", "the 'arguments' of a function_call item must be a JSON text") from None
    function = {"name": _string(item, "name", "function_call"), "arguments": arguments}
    return {"id": _string(item, "call_id", "function_call"), "type": "function", "function": function}


def _string(item: dict[str, Any], field: str, kind: str, *, empty: bool = False) -> str:
    value = item.get(field)
    if not isinstance(value, str) or not (value or empty):
        raise unsupported("input", f"a {kind} item needs '{field}' as a string")
    return value


def _output(output: Any) -> str:
    """A function's output: a string, or ``input_text`` parts (joined)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return _text(output, "a function_call_output's 'output'")
    raise unsupported("input", "a function_call_output item needs 'output' as a string or input_text parts")


def _message(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as a chat message: ``{"role", "content"}`` with a string or ``input_text`` parts."""
    kind = item.get("type", "message")
    role = item.get("role")
    if kind != "message" or role not in _ROLES:
        raise unsupported(
            "input",
            f"an input item must be a message with a role in {sorted(_ROLES)}, a function_call or a "
            f"function_call_output (not '{kind}')",
        )
    content = item.get("content")
    if isinstance(content, list):
        content = _text(content, "a message's content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _text(parts: list[Any], what: str) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            raise unsupported("input", f"only text content parts (input_text) are supported in {what}")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type", "text") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.get("name", "response"),
                "schema": fmt.get("schema"),
                "strict": fmt.get("strict"),
            },
        }
    return dict(fmt)


# Answer shapes. serving.py builds them as plain dicts; as TypedDicts mypy checks them where they are built.

ItemStatus: TypeAlias = Literal["in_progress", "completed", "incomplete"]


class FunctionToolOut(TypedDict):
    type: Literal["function"]
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class OutputText(TypedDict):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class MessageItem(TypedDict):
    type: Literal["message"]
    id: str  # msg_…
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallItem(TypedDict):
    type: Literal["function_call"]
    id: str  # fc_…: the item
    call_id: str  # call_…: what a function_call_output answers
    name: str
    arguments: str  # a JSON text
    status: ItemStatus


OutputItem: TypeAlias = MessageItem | FunctionCallItem
