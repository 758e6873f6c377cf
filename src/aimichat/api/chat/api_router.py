"""Routes of the chat API, and the one place a chat result becomes an HTTP answer.

The routes are thin: ``serving.ChatService`` decides; :func:`chat_response` writes its typed result as
HTTP (the playground's stream uses it too).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from aimichat.api.auth import require_key
from aimichat.api.idempotency import OPENAPI, idempotent
from aimichat.api.responses import quota_exceeded, rate_limit_headers
from aimichat.idempotency.retries import account_owner
from aimichat.keys.service import Principal
from aimichat.quota.ledger import Refusal

from .protocol import ChatCompletion, ChatCompletionRequest
from .serving import CallRecord, ChatResult, ClientGone, Completion, CompletionStream

router = APIRouter()

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


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_RESPONSES, openapi_extra=OPENAPI)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, principal: Principal = Depends(require_key)
) -> Response:
    record = CallRecord()
    request.state.call = record  # read by the access log once the answer is sent

    async def answer() -> Response:
        result = await request.app.state.chat.complete(principal, body, record, client_gone=request.is_disconnected)
        return chat_response(result)

    # With an Idempotency-Key, a retry gets the first answer and is charged once (docs/idempotency.md).
    return await idempotent(request, account_owner(principal.account_id), answer)


def chat_response(result: ChatResult) -> Response:
    """The HTTP answer for a chat result: JSON, a stream of events, the spec's 429, or nothing at all."""
    if isinstance(result, Completion):
        return JSONResponse(result.body, headers=rate_limit_headers(result.rate_limit))
    if isinstance(result, CompletionStream):
        headers = rate_limit_headers(result.rate_limit) | _STREAM_HEADERS
        return StreamingResponse(result.events, media_type="text/event-stream", headers=headers)
    if isinstance(result, Refusal):
        return quota_exceeded(result)
    assert isinstance(result, ClientGone)
    return Response(status_code=CLIENT_CLOSED_REQUEST)
