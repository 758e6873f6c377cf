"""The request of ``POST /v1/responses`` and its translation into a chat completion request.

Stateless (``store: false``): ``previous_response_id`` and stored responses are refused with a 400 that
says so. Function tools wait for tool calling in the chat service (issue 13) and are refused the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from aimichat.api.chat.protocol import (
    Bool,
    ChatCompletionRequest,
    Float,
    Int,
    Str,
    first_lone_surrogate,
    unsupported,
)

_REFUSED = {
    "previous_response_id": "Responses are not stored here (store: false), so there is no previous response "
    "to continue: send the whole conversation as 'input'.",
    "tools": "Function tools are not supported by this server yet.",
    "tool_choice": "Function tools are not supported by this server yet.",
    "reasoning": "Reasoning options are not supported by the models of this server.",
    "background": "Background responses are not supported by this server.",
    "conversation": "Conversations are not stored by this server: send the whole conversation as 'input'.",
}
_ROLES = {"user", "assistant", "system", "developer"}


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
        return data

    @model_validator(mode="after")
    def _as_chat(self) -> ResponsesRequest:
        """Build the chat request while validating, so whatever cannot map is this request's 400."""
        try:
            self._chat = self._chat_request()
        except ValidationError as exc:
            first = exc.errors()[0]
            param = str(first.get("ctx", {}).get("param") or ".".join(str(p) for p in first.get("loc", ())))
            raise unsupported(param or "input", first.get("msg", "invalid value")) from None
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
            messages += [_message(item) for item in self.input]
        body: dict[str, Any] = {
            "messages": messages,
            "model": self.model,
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": bool(self.stream),
            "response_format": _response_format(self.text),
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})


def _message(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as a chat message: ``{"role", "content"}`` with a string or ``input_text`` parts."""
    kind = item.get("type", "message")
    if kind in ("function_call_output", "function_call"):
        raise unsupported("input", "function calls are not supported by this server yet")
    role = item.get("role")
    if kind != "message" or role not in _ROLES:
        raise unsupported("input", f"an input item must be a message with a role in {sorted(_ROLES)}")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise unsupported("input", "only text content parts (input_text) are supported")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    return {"role": "system" if role == "developer" else role, "content": content}


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
