"""The talk playground: a logged-in person chats with the same engine, charged to the same credits.

The page streams through ``POST /playground/stream`` (JSON in, the API's own SSE out, so the last
chunk carries ``x_ratelimit.remaining``). Without JavaScript the same form posts to ``/playground``
and the reply comes back in a fresh page.

The page offers the models the account's tier may use, with what each costs it; the chosen one goes
with every turn (``model``, as in an API request), and each reply is labelled with the model that
wrote it (the stream's ``model``, the canonical name when an alias was picked).
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
from aimichat.registry.catalog import Catalog

from .deps import ApiWrite, RequestSession, User, UserForm, Visitor, posted_form
from .models_view import current_catalog, offers
from .render import WebRoute, page
from .usage_pages import credits_spent, time_left, utc

router = APIRouter(route_class=WebRoute, include_in_schema=False)
MAX_MESSAGES = 40  # a conversation is resent whole each turn; keep it bounded
MAX_CHARS = 8000
MAX_MODEL_CHARS = 128  # a model's name (or alias) is at most this long
MAX_TOKENS = 512  # the playground is for trying things; long essays belong to the API
TEMPERATURE = 0.7  # the spec's example value; the API's default of 1.0 makes a small model ramble


Turn = dict[str, str]  # {"role": "user" | "assistant", "content": ...}; an assistant turn may name its "model"


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
        turn = {"role": role, "content": content}
        label = message.get("model")
        if role == "assistant" and isinstance(label, str) and _is_label(label):
            turn["model"] = label  # only for the page's label: the API request carries role and content
        turns.append(turn)
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError("Type a message first.")
    return turns


def _is_label(text: str) -> bool:
    return 0 < len(text) <= MAX_MODEL_CHARS and first_lone_surrogate(text) is None


def model_name(raw: object) -> str | None:
    """The model a turn asks for: None (the tier's default) for nothing or a blank; ValueError for what
    no model could be called (the chat service answers unknown or unavailable names itself)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str) or len(raw) > MAX_MODEL_CHARS or first_lone_surrogate(raw) is not None:
        raise ValueError("Choose a model from the list.")
    return raw.strip()


def chat_request(turns: list[Turn], stream: bool, model: str | None = None) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": model,
            "messages": [{"role": t["role"], "content": t["content"]} for t in turns],
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
    catalog: Catalog,
    model: str | None = None,
    turns: Sequence[Turn] = (),
    error: str = "",
    status: int = 200,
    remaining: int | None = None,
) -> Response:
    account = visitor.user
    now = request.app.state.clock()
    s = ledger.summary(session, keys.principal_for(account), now)
    spent = credits_spent(s, now)
    left = s.rate_limit.remaining if remaining is None else remaining
    choices = offers(catalog, request.app.state.settings, account.tier)
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
        models=choices,
        chosen=_chosen(catalog, account.tier.name, model),
        spent=spent.message if spent else "",
    )


def _chosen(catalog: Catalog, tier: str, model: str | None) -> str | None:
    """The model the picker shows selected: the one asked for (an alias picks its model), else the tier's default."""
    spec = catalog.resolve(model) if model else None
    if spec is None or not catalog.may_use(tier, spec.name):
        spec = catalog.default_for(tier)
    return spec.name if spec is not None else None


@router.get("/playground")
async def playground(request: Request, session: RequestSession, visitor: User, model: str | None = None) -> Response:
    catalog = await current_catalog(request)
    return await _answer(request, visitor, session, catalog=catalog, model=model)


@router.post("/playground/stream")
async def playground_stream(request: Request, visitor: ApiWrite) -> Response:
    try:
        body = await request.json()
        turns = conversation(body.get("messages"))
    except (ValueError, AttributeError) as exc:
        message = (
            str(exc) if isinstance(exc, ValueError) and str(exc).endswith(".") else 'Send JSON: {"messages": [...]}.'
        )
        raise APIError(400, message, param="messages") from None
    try:
        model = model_name(body.get("model"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="model") from None
    principal = keys.principal_for(visitor.user)  # key_id None: the playground
    return chat_response(await request.app.state.chat.complete(principal, chat_request(turns, True, model)))


@router.post("/playground")
async def playground_post(
    request: Request,
    session: RequestSession,
    visitor: UserForm,
    message: Annotated[str, Form()] = "",
    model: Annotated[str, Form()] = "",
) -> Response:
    """The no-JavaScript path: earlier turns (and the model of each reply) ride along as hidden fields."""
    form = await posted_form(request)
    roles, contents, labels = form.getlist("role"), form.getlist("content"), form.getlist("turn_model")
    labels += [""] * (len(roles) - len(labels))
    raw = [{"role": r, "content": c, "model": m} for r, c, m in zip(roles, contents, labels, strict=False)]
    raw.append({"role": "user", "content": message})
    catalog = await current_catalog(request)
    try:
        turns = conversation(raw)
        chosen = model_name(model)
    except ValueError as exc:
        earlier = [t for t in raw[:-1] if isinstance(t["content"], str)]
        return await _answer(request, visitor, session, catalog=catalog, turns=earlier, error=str(exc), status=400)
    principal = keys.principal_for(visitor.user)
    shown: dict[str, Any] = {"catalog": catalog, "model": chosen, "turns": turns}
    try:
        result = await request.app.state.chat.complete(principal, chat_request(turns, False, chosen))
    except (APIError, EngineError) as exc:  # e.g. a conversation grown past the context window, an unknown model
        failure = exc if isinstance(exc, APIError) else engine_error(exc)
        return await _answer(request, visitor, session, **shown, error=failure.message, status=failure.status)
    if isinstance(result, Refusal):
        now = request.app.state.clock()
        error = f"{result.message}. Credits come back at {utc(result.reset_at)} ({time_left(result.reset_at, now)})."
        return await _answer(request, visitor, session, **shown, error=error, status=429)
    assert isinstance(result, Completion)  # no hang-up check was asked for
    reply = result.body["choices"][0]["message"]["content"] or ""
    turns.append({"role": "assistant", "content": reply, "model": str(result.body.get("model") or "")})
    return await _answer(request, visitor, session, **shown, remaining=result.rate_limit.remaining)


async def _answer(request: Request, visitor: Visitor, session: Session, **kwargs: Any) -> Response:
    return await run_in_threadpool(lambda: _page(request, visitor, session, **kwargs))
