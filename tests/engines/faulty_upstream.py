"""A fault-injecting OpenAI-compatible upstream: a raw ASGI app, run by uvicorn on a free port.

Each chat request takes the next behaviour from ``plan`` (or ``default`` when the plan is empty):

- ``ok``: a role chunk, one chunk per entry of ``pieces``, a finish chunk, the usage chunk (when
  asked for with ``stream_options.include_usage``) and ``[DONE]``; ``no_usage``: the same without usage.
- ``500``, ``503``, ``429``, ``401``, ``400``, ``400_context``: that error, OpenAI-shaped
  (429 and 503 carry ``Retry-After: <retry_after>``).
- ``stall_first``: 200 and headers, then nothing until the client goes away.
- ``stall_mid:N``: N text chunks, then nothing until the client goes away.
- ``drop:N``: N text chunks, then the connection is dropped (no end of the chunked body).
- ``trickle``: a text chunk every 50 ms, for a long time (for disconnect tests).
- ``empty``, ``drop_empty``: 200, then an empty body or a dropped connection (what llama-cpp-python's
  server answers to a streamed request it refuses).

It records every request body and Authorization header, and the moment (``time.monotonic()``) each streaming
client went away.
A plain 200 for a non-streaming request is a one-token completion (the engine's diagnosis request).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque

ERRORS = {
    "500": (500, {"error": {"message": "upstream exploded", "type": "server_error", "code": None}}),
    "503": (503, {"error": {"message": "upstream overloaded", "type": "server_error", "code": None}}),
    "429": (429, {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}),
    "401": (
        401,
        {
            "error": {
                "message": "Incorrect API key provided: sk-abc***xyz",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        },
    ),
    "400": (400, {"error": {"message": "temperature is too spicy", "type": "invalid_request_error", "code": None}}),
    "400_context": (
        400,
        {
            "object": "error",
            "type": "BadRequestError",
            "code": 400,
            "message": "This model's maximum context length is 512 tokens. However, you requested "
            "900 tokens (890 in the messages, 10 in the completion).",
        },
    ),
}
TRICKLE_CHUNKS = 2000
TRICKLE_DELAY = 0.05
STALL_LIMIT = 30.0  # a stall ends by itself eventually, so a broken test cannot hang the server


class Dropped(Exception):
    """Raised after the response started: uvicorn then closes the socket mid-body."""


class FaultyUpstream:
    def __init__(self, default: str = "ok"):
        self.default = default
        self.reset()

    def reset(self) -> None:
        self.plan: deque[str] = deque()
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each chat request
        self.disconnects: list[float] = []
        self.pieces = ["Hello", " there", ",", " friend", "!"]
        self.usage = {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}
        self.retry_after = "7"

    @property
    def chat_requests(self) -> int:
        return len(self.requests)

    def _next(self) -> tuple[str, int]:
        behaviour = self.plan.popleft() if self.plan else self.default
        name, _, arg = behaviour.partition(":")
        return name, int(arg or 0)

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["method"] == "GET" and scope["path"].endswith("/models"):
            await _json(send, 200, {"object": "list", "data": [{"id": "faulty", "object": "model"}]})
            return
        request = json.loads(await _body(receive) or b"{}")
        self.requests.append(request)
        self.authorizations.append(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
        name, n = self._next()
        if name in ERRORS:
            status, body = ERRORS[name]
            headers = [(b"retry-after", self.retry_after.encode())] if status in (429, 503) else []
            await _json(send, status, body, headers)
        elif not request.get("stream"):
            await _json(send, 200, _completion(self.pieces[0]))
        else:
            await self._stream(name, n, request, receive, send)

    async def _stream(self, name: str, n: int, request: dict, receive, send) -> None:
        gone = asyncio.Event()
        watcher = asyncio.create_task(self._watch(receive, gone))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
                }
            )
            await self._answer(name, n, request, send, gone)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()

    async def _answer(self, name: str, n: int, request: dict, send, gone: asyncio.Event) -> None:
        if name == "empty":
            return
        if name == "drop_empty":
            raise Dropped("dropping the connection before any event")
        await _event(send, _chunk({"role": "assistant", "content": ""}))
        if name == "stall_first":
            await _wait(gone, STALL_LIMIT)
            return
        if name == "trickle":
            for i in range(TRICKLE_CHUNKS):
                await _event(send, _chunk({"content": f" w{i}"}))
                if await _wait(gone, TRICKLE_DELAY):
                    return
            return
        pieces = self.pieces if name in ("ok", "no_usage") else [f" t{i}" for i in range(n)]
        for piece in pieces:
            await _event(send, _chunk({"content": piece}))
        if name == "stall_mid":
            await _wait(gone, STALL_LIMIT)
            return
        if name == "drop":
            raise Dropped("dropping the connection on purpose")
        await _event(send, _chunk({}, finish_reason="stop"))
        if name == "ok" and (request.get("stream_options") or {}).get("include_usage"):
            await _event(
                send,
                {
                    "id": "up-1",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "faulty",
                    "choices": [],
                    "usage": self.usage,
                },
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})

    async def _watch(self, receive, gone: asyncio.Event) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnects.append(time.monotonic())
        gone.set()


def _chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": "up-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "faulty",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _completion(text: str) -> dict:
    return {
        "id": "up-1",
        "object": "chat.completion",
        "created": 0,
        "model": "faulty",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 42, "completion_tokens": 1, "total_tokens": 43},
    }


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; True when it happened."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _event(send, payload: dict) -> None:
    await send(
        {"type": "http.response.body", "body": b"data: " + json.dumps(payload).encode() + b"\n\n", "more_body": True}
    )


async def _json(send, status: int, body: dict, headers: list | None = None) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


async def _body(receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
