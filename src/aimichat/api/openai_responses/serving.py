"""The Responses API over :class:`~aimichat.api.chat.serving.ChatService`: the chat result, reshaped.

A non-streaming answer becomes one ``response`` object whose ``output`` holds a ``message`` item (the
answer's text) and then one ``function_call`` item per tool call; an answer of calls only has no message.

A stream becomes OpenAI's event sequence, each an SSE event with its name and a ``sequence_number``:
``response.created``, ``response.in_progress``, then for each output item in turn (``output_index``
counts them) either

- text: ``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``…,
  ``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``; or
- a function call: ``response.output_item.added`` (its ``arguments`` ``""``),
  ``response.function_call_arguments.delta``…, ``response.function_call_arguments.done``,
  ``response.output_item.done``;

and last ``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut the answer,
``response.failed`` when the model failed mid-stream). Items are streamed one after the other, as the
engines send tool calls: an item is done when the next one starts. Credits, limits, headers and the 429
are the chat service's, untouched.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from aimichat.api.chat.protocol import AssistantMessage, ChunkToolCall
from aimichat.api.chat.serving import ChatResult, Completion, CompletionStream
from aimichat.quota.ledger import RateLimit

from .protocol import FunctionCallItem, ItemStatus, MessageItem, OutputItem, ResponsesRequest


@dataclass(frozen=True)
class ResponseBody:
    body: dict[str, Any]
    rate_limit: RateLimit


@dataclass(frozen=True)
class ResponseStream:
    events: AsyncIterator[bytes]
    rate_limit: RateLimit


def response_object(
    request: ResponsesRequest,
    *,
    response_id: str,
    model: str,
    output: list[OutputItem],
    status: str,
    usage: dict[str, int] | None,
    created: int,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": None,
        "store": False,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": request.text or {"format": {"type": "text"}},
        "tool_choice": request.tool_choice or "auto",
        "tools": request.echoed_tools(),
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": "disabled",
        "usage": _usage(usage) if usage is not None else None,
        "user": request.user,
        "metadata": request.metadata or {},
    }


def message_item(text: str, status: ItemStatus, item_id: str | None = None) -> MessageItem:
    return {
        "type": "message",
        "id": item_id or "msg_" + secrets.token_hex(12),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def function_call_item(call_id: str, name: str, arguments: str, status: ItemStatus) -> FunctionCallItem:
    return {
        "type": "function_call",
        "id": "fc_" + secrets.token_hex(12),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(message: AssistantMessage, status: ItemStatus) -> list[OutputItem]:
    """A chat answer's message as output items: its text (if any, or if there is nothing else), then its
    calls. Only the last item can have been cut by ``max_output_tokens``: it takes the answer's ``status``."""
    calls = message.get("tool_calls") or []
    output: list[OutputItem] = []
    if message["content"] or not calls:
        output.append(message_item(message["content"] or "", "completed"))
    for call in calls:
        function = call["function"]
        output.append(function_call_item(call["id"], function["name"], function["arguments"], "completed"))
    output[-1]["status"] = status
    return output


def _usage(usage: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def reshape(request: ResponsesRequest, result: ChatResult) -> ResponseBody | ResponseStream | ChatResult:
    """The chat service's result as the Responses API's; refusals and hang-ups pass through as they are."""
    if isinstance(result, Completion):
        choice = result.body["choices"][0]
        status: ItemStatus = "incomplete" if choice["finish_reason"] == "length" else "completed"
        body = response_object(
            request,
            response_id="resp_" + result.body["id"].removeprefix("chatcmpl-"),
            model=result.body["model"],
            output=output_items(choice["message"], status),
            status=status,
            usage={
                "prompt_tokens": result.body["usage"]["prompt_tokens"],
                "completion_tokens": result.body["usage"]["completion_tokens"],
                "total_tokens": result.body["usage"]["total_tokens"],
            },
            created=result.body["created"],
        )
        return ResponseBody(body, result.rate_limit)
    if isinstance(result, CompletionStream):
        return ResponseStream(_events(request, result.events), result.rate_limit)
    return result


class _Sequence:
    def __init__(self) -> None:
        self.number = 0

    def event(self, kind: str, payload: dict[str, Any]) -> bytes:
        body = {"type": kind, "sequence_number": self.number, **payload}
        self.number += 1
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode()


@dataclass
class StreamedOutput:
    """The output items of a stream, opened and closed in turn; each method returns the events it makes.

    ``calls`` maps a chat tool call's ``index`` to its item's ``output_index``.
    """

    seq: _Sequence = field(default_factory=_Sequence)
    items: list[OutputItem] = field(default_factory=list)
    open: int | None = None  # the output_index of the item still receiving deltas
    calls: dict[int, int] = field(default_factory=dict)

    def text(self, delta: str) -> Iterator[bytes]:
        if self.open is None or self.items[self.open]["type"] != "message":
            yield from self.close("completed")
            yield from self._add(message_item("", "in_progress"))
            where = self._where()
            part = {"type": "output_text", "text": "", "annotations": []}
            yield self.seq.event("response.content_part.added", {**where, "part": part})
        item = self.items[self._index()]
        assert item["type"] == "message"
        if delta:
            item["content"][0]["text"] += delta
            yield self.seq.event("response.output_text.delta", {**self._where(), "delta": delta, "logprobs": []})

    def tool_call(self, piece: ChunkToolCall) -> Iterator[bytes]:
        function = piece.get("function") or {}
        index = piece.get("index", len(self.calls))
        if index not in self.calls:
            yield from self.close("completed")
            item = function_call_item(piece.get("id") or "call_" + secrets.token_hex(12), "", "", "in_progress")
            item["name"] = function.get("name") or ""
            yield from self._add(item)
            self.calls[index] = self._index()
        output_index = self.calls[index]
        call = self.items[output_index]
        assert call["type"] == "function_call"
        if delta := function.get("arguments"):
            call["arguments"] += delta
            where = {"item_id": call["id"], "output_index": output_index}
            yield self.seq.event("response.function_call_arguments.delta", {**where, "delta": delta})

    def close(self, status: ItemStatus) -> Iterator[bytes]:
        """Finish the open item, if there is one."""
        if self.open is None:
            return
        output_index, item = self.open, self.items[self.open]
        self.open = None
        item["status"] = status
        if item["type"] == "message":
            where = {"item_id": item["id"], "output_index": output_index, "content_index": 0}
            text = item["content"][0]["text"]
            yield self.seq.event("response.output_text.done", {**where, "text": text, "logprobs": []})
            yield self.seq.event("response.content_part.done", {**where, "part": item["content"][0]})
        else:
            where = {"item_id": item["id"], "output_index": output_index}
            yield self.seq.event("response.function_call_arguments.done", {**where, "arguments": item["arguments"]})
        yield self.seq.event("response.output_item.done", {"output_index": output_index, "item": item})

    def finish(self, status: ItemStatus) -> Iterator[bytes]:
        """Close the last item; an answer with no output at all still has its (empty) message, as OpenAI's."""
        if not self.items:
            yield from self.text("")
        yield from self.close(status)

    def _add(self, item: OutputItem) -> Iterator[bytes]:
        self.items.append(item)
        self.open = len(self.items) - 1
        shown = {**item, "content": []} if item["type"] == "message" else item
        yield self.seq.event("response.output_item.added", {"output_index": self.open, "item": shown})

    def _index(self) -> int:
        assert self.open is not None
        return self.open

    def _where(self) -> dict[str, Any]:
        index = self._index()
        return {"item_id": self.items[index]["id"], "output_index": index, "content_index": 0}


async def _events(request: ResponsesRequest, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Chat completion chunks in, Responses events out (the chat stream settles as it always does)."""
    out = StreamedOutput()
    seq = out.seq
    response_id, created = "", int(time.time())
    model, finish, usage = "", None, None
    started = False
    async for raw in chunks:
        data = raw.removeprefix(b"data: ").strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:  # the model stopped mid-stream: the chat stream says so, and so do we
            error = chunk["error"]
            for item in out.items:
                item["status"] = "completed" if item["status"] == "completed" else "incomplete"
            failed = response_object(
                request, response_id=response_id or "resp_" + secrets.token_hex(12), model=model,
                output=out.items, status="failed", usage=None, created=created,
            )  # fmt: skip
            failed["error"] = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
            yield seq.event("response.failed", {"response": failed})
            return
        if not started:
            started = True
            response_id = "resp_" + chunk["id"].removeprefix("chatcmpl-")
            model, created = chunk["model"], chunk["created"]
            shell = response_object(
                request, response_id=response_id, model=model, output=[], status="in_progress", usage=None,
                created=created,
            )  # fmt: skip
            yield seq.event("response.created", {"response": shell})
            yield seq.event("response.in_progress", {"response": shell})
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            if delta.get("content"):
                for event in out.text(delta["content"]):
                    yield event
            for piece in delta.get("tool_calls") or ():
                for event in out.tool_call(piece):
                    yield event
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    status: ItemStatus = "incomplete" if finish == "length" else "completed"
    for event in out.finish(status):
        yield event
    final = response_object(
        request, response_id=response_id, model=model, output=out.items, status=status, usage=usage,
        created=created,
    )  # fmt: skip
    yield seq.event("response.completed" if status == "completed" else "response.incomplete", {"response": final})
