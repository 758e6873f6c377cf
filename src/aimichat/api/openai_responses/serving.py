"""The Responses API over :class:`~aimichat.api.chat.serving.ChatService`: the chat result, reshaped.

A non-streaming answer becomes one ``response`` object; a stream becomes OpenAI's event sequence
(``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``…, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, ``response.completed``), each an SSE
event with its name and a ``sequence_number``. Credits, limits, headers and the 429 are the chat
service's, untouched.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aimichat.api.chat.serving import ChatResult, Completion, CompletionStream
from aimichat.quota.ledger import RateLimit

from .protocol import ResponsesRequest


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
    item_id: str,
    model: str,
    text: str,
    status: str,
    usage: dict[str, int] | None,
    created: int,
) -> dict[str, Any]:
    done = status != "in_progress"
    output = []
    if done or text:
        output.append(
            {
                "type": "message",
                "id": item_id,
                "status": "completed" if status == "completed" else status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
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
        "output": output if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": False,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "text": request.text or {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "truncation": "disabled",
        "usage": _usage(usage) if usage is not None else None,
        "user": request.user,
        "metadata": request.metadata or {},
    }


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
        body = response_object(
            request,
            response_id="resp_" + result.body["id"].removeprefix("chatcmpl-"),
            item_id="msg_" + secrets.token_hex(12),
            model=result.body["model"],
            text=choice["message"]["content"],
            status="incomplete" if choice["finish_reason"] == "length" else "completed",
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


async def _events(request: ResponsesRequest, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Chat completion chunks in, Responses events out (the chat stream settles as it always does)."""
    seq = _Sequence()
    response_id, item_id, created = "", "msg_" + secrets.token_hex(12), int(time.time())
    model, finish, usage = "", None, None
    text: list[str] = []
    started = False
    part = {"type": "output_text", "text": "", "annotations": []}
    async for raw in chunks:
        data = raw.removeprefix(b"data: ").strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:  # the model stopped mid-stream: the chat stream says so, and so do we
            error = chunk["error"]
            failed = response_object(
                request, response_id=response_id or "resp_" + secrets.token_hex(12), item_id=item_id,
                model=model, text="".join(text), status="failed", usage=None, created=created,
            )  # fmt: skip
            failed["error"] = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
            yield seq.event("response.failed", {"response": failed})
            return
        if not started:
            started = True
            response_id = "resp_" + chunk["id"].removeprefix("chatcmpl-")
            model, created = chunk["model"], chunk["created"]
            shell = response_object(
                request, response_id=response_id, item_id=item_id, model=model, text="", status="in_progress",
                usage=None, created=created,
            )  # fmt: skip
            yield seq.event("response.created", {"response": shell})
            yield seq.event("response.in_progress", {"response": shell})
            item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
            yield seq.event("response.output_item.added", {"output_index": 0, "item": item})
            yield seq.event(
                "response.content_part.added",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "part": part},
            )
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {}).get("content")
            if delta:
                text.append(delta)
                yield seq.event(
                    "response.output_text.delta",
                    {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []},
                )
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    whole = "".join(text)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield seq.event("response.output_text.done", {**where, "text": whole, "logprobs": []})
    yield seq.event("response.content_part.done", {**where, "part": {**part, "text": whole}})
    status = "incomplete" if finish == "length" else "completed"
    final = response_object(
        request, response_id=response_id, item_id=item_id, model=model, text=whole, status=status, usage=usage,
        created=created,
    )  # fmt: skip
    yield seq.event("response.output_item.done", {"output_index": 0, "item": final["output"][0]})
    yield seq.event("response.completed" if status == "completed" else "response.incomplete", {"response": final})
