"""An OpenAI-compatible upstream that takes its time, and can hang on demand: the model behind the
`aimichat serve` processes of the crash, fault and soak runs (a subprocess cannot be given the
scripted engine; ``AIMICHAT_ENGINE=upstream`` pointed at this can).

Every chat request is answered as a stream (what AimiChat's upstream engine asks for): a role chunk,
``min(max_tokens, tokens)`` one-word chunks ``token_delay`` seconds apart, a finish chunk, the usage chunk
(``prompt_tokens`` fixed, the completion the chunks sent) and ``[DONE]``. A non-streaming request (the
engine's diagnosis) gets a one-token completion.

``hang()`` makes it stop answering until ``resume()``: new streams send their headers and nothing more,
streams in flight stop between two tokens (a frozen model server). A stream whose client goes away
stops at once. ``streams`` counts the streams started, ``gone`` those whose client went away.

In-process, serve it with ``conftest.LiveServer(SlowUpstream())``; on its own (the soak), run
``python tests/faults/slow_upstream.py --port 9000 [--tokens 12] [--token-delay 0.02]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

PROMPT_TOKENS = 10


class SlowUpstream:
    def __init__(self, tokens: int = 12, token_delay: float = 0.02, prompt_tokens: int = PROMPT_TOKENS):
        self.tokens = tokens
        self.token_delay = token_delay
        self.prompt_tokens = prompt_tokens
        self.streams = 0
        self.gone = 0
        self._answering = True  # False while hanging

    def hang(self) -> None:
        self._answering = False

    def resume(self) -> None:
        self._answering = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["method"] == "GET" and scope["path"].endswith("/models"):
            await _json(send, {"object": "list", "data": [{"id": "slow", "object": "model"}]})
            return
        request = json.loads(await _body(receive) or b"{}")
        if not request.get("stream"):
            await _json(send, _completion(self.prompt_tokens))
            return
        self.streams += 1
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch(receive, gone))
        try:
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if await self._stream(request, send, gone):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                self.gone += 1
        finally:
            watcher.cancel()

    async def _stream(self, request: dict[str, Any], send: Any, gone: asyncio.Event) -> bool:
        """Send the answer; False when the client went away first."""
        await _event(send, _chunk({"role": "assistant", "content": ""}))
        count = min(int(request.get("max_tokens") or self.tokens), self.tokens)
        for i in range(count):
            if i and not await self._pause(gone, self.token_delay):
                return False
            while not self._answering:  # hanging: nothing until resumed or the client leaves
                if not await self._pause(gone, 0.05):
                    return False
            await _event(send, _chunk({"content": f" w{i}" if i else f"w{i}"}))
        await _event(send, _chunk({}, finish_reason="length" if count == request.get("max_tokens") else "stop"))
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": count}
            usage["total_tokens"] = self.prompt_tokens + count
            await _event(send, {"id": "slow", "object": "chat.completion.chunk", "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        return True

    @staticmethod
    async def _pause(gone: asyncio.Event, seconds: float) -> bool:
        """Wait ``seconds``; False when the client went away meanwhile."""
        try:
            await asyncio.wait_for(gone.wait(), seconds)
        except TimeoutError:
            return True
        return False


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "slow",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "slow",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _completion(prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": "slow",
        "object": "chat.completion",
        "created": 0,
        "model": "slow",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "w0"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


async def _watch(receive: Any, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _event(send: Any, payload: dict[str, Any]) -> None:
    body = b"data: " + json.dumps(payload).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _json(send: Any, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


async def _body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--token-delay", type=float, default=0.02)
    args = parser.parse_args()
    app = SlowUpstream(args.tokens, args.token_delay)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on")
