"""The talk playground: a logged-in person chats with the same engine, charged to the same credits.

The page streams through ``POST /playground/stream`` (JSON in, the API's own SSE out, so the last
chunk carries ``x_ratelimit.remaining``). Without JavaScript the same form posts to ``/playground``
and the reply comes back in a fresh page.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Form, Request
from starlette.concurrency import run_in_threadpool

from aimichat.api.chat.protocol import ChatCompletionRequest
from aimichat.api.errors import APIError, engine_error
from aimichat.engines.base import EngineError
from aimichat.keys import service as keys
from aimichat.quota import ledger

from .deps import Visitor, api_write, posted_form, require_user, user_form
from .render import WebRoute, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)
MAX_MESSAGES = 40  # a conversation is resent whole each turn; keep it bounded
MAX_CHARS = 8000
MAX_TOKENS = 512  # the playground is for trying things; long essays belong to the API
TEMPERATURE = 0.7  # the spec's example value; the API's default of 1.0 makes a small model ramble


def conversation(raw: list[dict]) -> list[dict]:
    """The user and assistant turns the page sent, checked; ValueError says what is wrong."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("Send at least one message.")
    turns = [{"role": m.get("role"), "content": m.get("content")} for m in raw[-MAX_MESSAGES:] if isinstance(m, dict)]
    for turn in turns:
        if turn["role"] not in ("user", "assistant") or not isinstance(turn["content"], str) or len(turn["content"]) > MAX_CHARS:
            raise ValueError(f"Messages are user or assistant turns of at most {MAX_CHARS} characters.")
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError("Type a message first.")
    return turns


def chat_request(turns: list[dict], stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        messages=turns, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )


def _remaining(request: Request, visitor: Visitor) -> tuple[int, int]:
    state = request.app.state
    principal = keys.principal_for(visitor.account)
    with state.db.session() as db:
        s = ledger.summary(db, principal, state.clock())
    return max(0, s.daily_limit - s.day_used), s.daily_limit


def _page(request: Request, visitor: Visitor, *, turns: list[dict] = (), error: str = "", status: int = 200, remaining=None):
    left, limit = _remaining(request, visitor)
    return page(request, visitor, "playground.html", status=status, title="Playground", turns=list(turns), error=error,
                remaining=left if remaining is None else remaining, limit=limit, tier=visitor.account.tier)


@router.get("/playground")
def playground(request: Request, visitor: Visitor = Depends(require_user)):
    return _page(request, visitor)


@router.post("/playground/stream")
async def playground_stream(request: Request, visitor: Visitor = Depends(api_write)):
    try:
        turns = conversation((await request.json()).get("messages"))
    except (ValueError, AttributeError) as exc:
        message = str(exc) if isinstance(exc, ValueError) and str(exc).endswith(".") else "Send JSON: {\"messages\": [...]}."
        raise APIError(400, message, param="messages") from None
    principal = keys.principal_for(visitor.account)  # key_id None: the playground
    return await request.app.state.chat.complete(principal, chat_request(turns, stream=True))


@router.post("/playground")
async def playground_post(request: Request, visitor: Visitor = Depends(user_form), message: str = Form("")):
    """The no-JavaScript path: earlier turns ride along as hidden fields."""
    form = await posted_form(request)
    raw = [{"role": r, "content": c} for r, c in zip(form.getlist("role"), form.getlist("content"))]
    raw.append({"role": "user", "content": message})
    try:
        turns = conversation(raw)
    except ValueError as exc:
        error = str(exc)
        return await run_in_threadpool(lambda: _page(request, visitor, turns=raw[:-1], error=error, status=400))
    principal = keys.principal_for(visitor.account)
    try:
        response = await request.app.state.chat.complete(principal, chat_request(turns, stream=False))
    except (APIError, EngineError) as exc:  # e.g. a conversation grown past the context window
        failure = exc if isinstance(exc, APIError) else engine_error(exc)
        return await run_in_threadpool(lambda: _page(request, visitor, turns=turns, error=failure.message, status=failure.status))
    body = json.loads(response.body)
    if response.status_code != 200:  # credits spent: the spec's 429 body
        error = f"{body.get('message', 'Credit limit reached')}. Credits come back at {body.get('resetAt', '')}."
        return await run_in_threadpool(lambda: _page(request, visitor, turns=turns, error=error, status=response.status_code))
    turns.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    remaining = int(response.headers.get("x-ratelimit-remaining", 0))
    return await run_in_threadpool(lambda: _page(request, visitor, turns=turns, remaining=remaining))
