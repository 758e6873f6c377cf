"""The talk playground: a logged-in person chats with the same engine, charged to the same credits.

The page streams through ``POST /playground/stream`` (JSON in, the API's own SSE out, so the last
chunk carries ``x_ratelimit.remaining``). Without JavaScript the same form posts to ``/playground``
and the reply comes back in a fresh page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from aimichat.api.chat.api_router import chat_response
from aimichat.api.chat.protocol import ChatCompletionRequest, first_lone_surrogate
from aimichat.api.chat.serving import Completion
from aimichat.api.errors import APIError, engine_error
from aimichat.engines.base import EngineError
from aimichat.keys import service as keys
from aimichat.quota import ledger
from aimichat.quota.ledger import Refusal
from aimichat.store.clock import iso_utc

from .deps import ApiWrite, RequestSession, User, UserForm, Visitor, posted_form
from .render import WebRoute, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)
MAX_MESSAGES = 40  # a conversation is resent whole each turn; keep it bounded
MAX_CHARS = 8000
MAX_TOKENS = 512  # the playground is for trying things; long essays belong to the API
TEMPERATURE = 0.7  # the spec's example value; the API's default of 1.0 makes a small model ramble


Turn = dict[str, str]  # {"role": "user" | "assistant", "content": ...}


def conversation(raw: object) -> list[Turn]:
    """The user and assistant turns the page sent, checked; ValueError says what is wrong."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("Send at least one message.")
    turns: list[Turn] = []
    for message in raw[-MAX_MESSAGES:]:
        if not isinstance(message, dict):
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str) or len(content) > MAX_CHARS:
            raise ValueError(f"Messages are user or assistant turns of at most {MAX_CHARS} characters.")
        if first_lone_surrogate(content) is not None:  # JSON can carry one ("\\ud800"); it is no text
            raise ValueError("Messages must be valid Unicode text.")
        turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError("Type a message first.")
    return turns


def chat_request(turns: list[Turn], stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "messages": turns,
            "max_tokens": MAX_TOKENS,
            "temperature": TEMPERATURE,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
    )


def _page(
    request: Request,
    visitor: Visitor,
    session: Session,
    *,
    turns: Sequence[Turn] = (),
    error: str = "",
    status: int = 200,
    remaining: int | None = None,
) -> Response:
    account = visitor.user
    s = ledger.summary(session, keys.principal_for(account), request.app.state.clock())
    left = s.rate_limit.remaining if remaining is None else remaining
    return page(
        request,
        visitor,
        "playground.html",
        status=status,
        title="Playground",
        turns=list(turns),
        error=error,
        remaining=left,
        limit=s.daily_limit,
        tier=account.tier,
    )


@router.get("/playground")
def playground(request: Request, session: RequestSession, visitor: User) -> Response:
    return _page(request, visitor, session)


@router.post("/playground/stream")
async def playground_stream(request: Request, visitor: ApiWrite) -> Response:
    try:
        turns = conversation((await request.json()).get("messages"))
    except (ValueError, AttributeError) as exc:
        message = (
            str(exc) if isinstance(exc, ValueError) and str(exc).endswith(".") else 'Send JSON: {"messages": [...]}.'
        )
        raise APIError(400, message, param="messages") from None
    principal = keys.principal_for(visitor.user)  # key_id None: the playground
    return chat_response(await request.app.state.chat.complete(principal, chat_request(turns, stream=True)))


@router.post("/playground")
async def playground_post(
    request: Request, session: RequestSession, visitor: UserForm, message: Annotated[str, Form()] = ""
) -> Response:
    """The no-JavaScript path: earlier turns ride along as hidden fields."""
    form = await posted_form(request)
    raw = [{"role": r, "content": c} for r, c in zip(form.getlist("role"), form.getlist("content"), strict=False)]
    raw.append({"role": "user", "content": message})
    try:
        turns = conversation(raw)
    except ValueError as exc:
        return await _answer(
            request,
            visitor,
            session,
            turns=[t for t in raw[:-1] if isinstance(t["content"], str)],
            error=str(exc),
            status=400,
        )
    principal = keys.principal_for(visitor.user)
    try:
        result = await request.app.state.chat.complete(principal, chat_request(turns, stream=False))
    except (APIError, EngineError) as exc:  # e.g. a conversation grown past the context window
        failure = exc if isinstance(exc, APIError) else engine_error(exc)
        return await _answer(request, visitor, session, turns=turns, error=failure.message, status=failure.status)
    if isinstance(result, Refusal):
        error = f"{result.message}. Credits come back at {iso_utc(result.reset_at)}."
        return await _answer(request, visitor, session, turns=turns, error=error, status=429)
    assert isinstance(result, Completion)  # no hang-up check was asked for
    turns.append({"role": "assistant", "content": result.body["choices"][0]["message"]["content"]})
    return await _answer(request, visitor, session, turns=turns, remaining=result.rate_limit.remaining)


async def _answer(request: Request, visitor: Visitor, session: Session, **kwargs: Any) -> Response:
    return await run_in_threadpool(lambda: _page(request, visitor, session, **kwargs))
