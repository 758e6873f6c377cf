"""Route of the Responses API; it answers through the chat route's own pieces (429, headers, errors)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from aimichat.api.auth import require_key
from aimichat.api.chat.api_router import chat_response
from aimichat.api.chat.serving import CallRecord
from aimichat.api.responses import rate_limit_headers
from aimichat.keys.service import Principal

from .protocol import ResponsesRequest
from .serving import ResponseBody, ResponseStream, reshape

router = APIRouter()


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The response object; with `stream: true`, OpenAI's server-sent events (`response.created` … "
        "`response.completed`).",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    429: {"description": "The account's daily or monthly credits are spent (the API document's body)."},
}


@router.post("/v1/responses", responses=_RESPONSES)
async def create_response(
    request: Request, body: ResponsesRequest, principal: Principal = Depends(require_key)
) -> Response:
    """OpenAI's Responses API, stateless: the same keys, credits, limits and 429 as chat completions."""
    record = CallRecord()
    request.state.call = record
    chat = body.chat_request()
    result = reshape(body, await request.app.state.chat.complete(principal, chat, record, request.is_disconnected))
    if isinstance(result, ResponseBody):
        return JSONResponse(result.body, headers=rate_limit_headers(result.rate_limit))
    if isinstance(result, ResponseStream):
        headers = rate_limit_headers(result.rate_limit) | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(result.events, media_type="text/event-stream", headers=headers)
    return chat_response(result)
