"""The baseline for bench/gateway.py: the least an async Python proxy does per request. Starlette, one
pooled httpx.AsyncClient, no auth, no ledger; JSON and SSE answers relayed as they come.

    python bench/bare_proxy.py --port 9001 --upstream http://127.0.0.1:9000

Served by uvicorn exactly as ``aimichat serve`` serves AimiChat: one worker, loop and http "auto"
(uvloop and httptools when installed), access log off, the same log level.
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=32, keepalive_expiry=30)  # AimiChat's pool
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(60, read=None), limits=limits)

    async def relay(request: Request) -> Response:
        sent = client.build_request(
            request.method,
            request.url.path,
            content=await request.body(),
            headers={"content-type": request.headers.get("content-type", "application/json")},
        )
        answer = await client.send(sent, stream=True)
        kind = answer.headers.get("content-type", "application/json")
        if kind.startswith("text/event-stream"):
            return StreamingResponse(
                answer.aiter_raw(),
                answer.status_code,
                headers={"content-type": kind},
                background=BackgroundTask(answer.aclose),
            )
        body = await answer.aread()
        await answer.aclose()
        return Response(body, answer.status_code, headers={"content-type": kind})

    routes = [Route("/v1/chat/completions", relay, methods=["POST"]), Route("/v1/models", relay, methods=["GET"])]

    @asynccontextmanager
    async def lifespan(app: Starlette):
        async with client:
            yield

    return Starlette(routes=routes, lifespan=lifespan)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the stub's base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    # The options aimichat.cli.serve passes (one worker; loop/http left at "auto" as there).
    uvicorn.run(
        build(args.upstream),
        host="127.0.0.1",
        port=args.port,
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )
