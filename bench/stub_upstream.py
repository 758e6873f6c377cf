"""A zero-latency OpenAI-compatible upstream for gateway benchmarks: a bare ASGI app, nothing else.

    python bench/stub_upstream.py --port 9000

Answers ``POST /v1/chat/completions`` at once: JSON, or SSE with five content chunks and a usage chunk.
"""

from __future__ import annotations

import argparse
import json

import uvicorn

WORDS = ["Hello", "!", " How", " can", " I"]
USAGE = {"prompt_tokens": 12, "completion_tokens": len(WORDS), "total_tokens": 12 + len(WORDS)}


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    body = {
        "id": "stub",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "stub",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = b"".join(
    [_chunk({"role": "assistant", "content": ""})]
    + [_chunk({"content": w}) for w in WORDS]
    + [_chunk({}, "stop")]
    + [
        b"data: "
        + json.dumps({"id": "stub", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}).encode()
        + b"\n\n"
    ]
    + [b"data: [DONE]\n\n"]
)
PLAIN = json.dumps(
    {
        "id": "stub",
        "object": "chat.completion",
        "created": 0,
        "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
).encode()


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/models"):
        await _send(send, 200, b"application/json", b'{"object":"list","data":[{"id":"stub","object":"model"}]}')
        return
    stream = b'"stream":true' in body.replace(b" ", b"")
    if stream:
        await _send(send, 200, b"text/event-stream", STREAM)
    else:
        await _send(send, 200, b"application/json", PLAIN)


async def _send(send, status: int, content_type: bytes, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
