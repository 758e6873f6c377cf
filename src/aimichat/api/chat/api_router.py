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
                                                 client_gone=request.is_disconnected)
