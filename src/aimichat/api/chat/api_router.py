"""Routes of the chat API: thin, they hand over to ``serving.ChatService``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from aimichat.api.auth import require_key
from aimichat.keys.service import Principal

from .protocol import ChatCompletion, ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True)
async def chat_completions(request: Request, body: ChatCompletionRequest, principal: Principal = Depends(require_key)):
    return await request.app.state.chat.complete(principal, body, log_state=request.state,
                                                 client_gone=lambda: _client_gone(request))


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. The body is read by now, so the next ASGI message is
    ``http.disconnect``, sent when the connection drops (or once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
