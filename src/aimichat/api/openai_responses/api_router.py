"""Route of the Responses API; it answers through the chat route's own pieces (429, headers, errors)."""

from __future__ import annotations

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


@router.post("/v1/responses")
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
