"""Routes of the chat API, and the one place a chat result becomes an HTTP answer.

The routes are thin: ``serving.ChatService`` decides; :func:`chat_response` writes its typed result as
HTTP (the playground's stream uses it too).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from aimichat.api.auth import require_key
from aimichat.api.idempotency import OPENAPI, idempotent
from aimichat.api.responses import quota_exceeded, rate_limit_headers
from aimichat.idempotency.retries import account_owner
from aimichat.keys.service import Principal
from aimichat.quota.ledger import Refusal

from .protocol import ChatCompletion, ChatCompletionRequest
from .serving import CallRecord, ChatResult, ClientGone, Completion, CompletionStream, Settlement

router = APIRouter()

PATH = "/v1/chat/completions"

CLIENT_CLOSED_REQUEST = 499  # nginx's status for the access log: the client hung up; nothing is sent
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The answer; with `stream: true`, server-sent `chat.completion.chunk` events ending in "
        "`data: [DONE]`.",
        "content": {"text/event-stream": {}},
    },
    429: {"description": "The account's daily or monthly credits are spent (the API document's body)."},
}


@router.post(PATH, response_model=ChatCompletion, responses=_RESPONSES, openapi_extra=OPENAPI)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, principal: Principal = Depends(require_key)
) -> Response:
    """The route as FastAPI declares it: its OpenAPI entry, and the reference the fast path (``fast_path``,
    which answers it in a running server) is tested against."""
    return await answer(request, body, principal)


async def answer(request: Request, body: ChatCompletionRequest, principal: Principal) -> Response:
    """The answer to a validated chat request of an authenticated caller."""
    record = CallRecord()
    request.state.call = record  # read by the access log once the answer is sent

    settle: Settlement | None = None

    async def run() -> Response:
        nonlocal settle
        result = await request.app.state.chat.complete(
            principal, body, record, client_gone=request.is_disconnected, settle_later=True
        )
        if isinstance(result, Completion | CompletionStream):
            settle = result.settle
        return chat_response(result)

    # With an Idempotency-Key, a retry gets the first answer and is charged once (docs/idempotency.md).
    try:
        return await idempotent(request, account_owner(principal.account_id), run)
    except BaseException:
        if settle is not None:  # no answer will be sent, so none will settle: settle here (it is shielded)
            await settle()
        raise


def chat_response(result: ChatResult) -> Response:
    """The HTTP answer for a chat result: JSON, a stream of events, the spec's 429, or nothing at all.
    A result to settle later (``settle_later``) is settled once its answer has been sent."""
    if isinstance(result, Completion):
        if result.settle is not None:
            return _JSONThenSettle(result.body, rate_limit_headers(result.rate_limit), result.settle)
        return JSONResponse(result.body, headers=rate_limit_headers(result.rate_limit))
    if isinstance(result, CompletionStream):
        headers = rate_limit_headers(result.rate_limit) | _STREAM_HEADERS
        if result.settle is not None:
            return _StreamThenSettle(result.events, headers, result.settle)
        return StreamingResponse(result.events, media_type="text/event-stream", headers=headers)
    if isinstance(result, Refusal):
        return quota_exceeded(result)
    assert isinstance(result, ClientGone)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


class _ThenSettle(Response):
    """An answer whose settlement is written once it has been sent, however the sending ends (``settle`` is
    shielded: a cancelled request still settles). Mixed in before the response class it extends."""

    settle: Settlement

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.settle()


class _JSONThenSettle(_ThenSettle, JSONResponse):
    """A whole answer, then its settlement."""

    def __init__(self, content: Any, headers: dict[str, str], settle: Settlement) -> None:
        super().__init__(content, headers=headers)
        self.settle = settle


class _StreamThenSettle(_ThenSettle, StreamingResponse):
    """A stream, then its settlement (once the stream has ended, however it ends)."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str], settle: Settlement) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.settle = settle
