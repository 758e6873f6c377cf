"""The talk playground: a logged-in person chats with the same engine, charged to the same credits.

The page streams through ``POST /playground/stream`` (JSON in, the API's own SSE out, so the last
chunk carries ``x_ratelimit.remaining``). Without JavaScript the same form posts to ``/playground``
and the reply comes back in a fresh page.

The page offers the models the account's tier may use, with what each costs it; the chosen one goes
with every turn (``model``, as in an API request), and each reply is labelled with the model that
wrote it (the stream's ``model``, the canonical name when an alias was picked).

The settings (a system prompt, the temperature, the most tokens a reply may take) go with every turn
too, on both paths; :func:`chat_settings` checks them and says, per field, what is wrong. Rendering
replies as Markdown, Stop, "View code" and keeping the conversation across reloads are the browser's
(``static/playground.js``): none of them needs the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
MAX_CHARS = 8000  # what a person types: a message, the system prompt
MAX_MODEL_CHARS = 128  # a model's name (or alias) is at most this long
DEFAULT_MAX_TOKENS = 512  # the playground is for trying things; long essays belong to the API
MAX_TOKENS = 2048  # the most a person may ask for in the settings
# Every reply goes back to the server with each later turn, so the check must pass what the model wrote: at
# most MAX_TOKENS tokens. English runs about 4 characters a token; code (runs of spaces, long names) and
# other scripts run more, hence twice that. A reply longer still is refused as a conversation that cannot
# go on (the page offers a new chat), not as a message to shorten; so are a conversation past the model's
# context window (context_length_exceeded) and a body past AIMICHAT_MAX_BODY_BYTES (413).
MAX_REPLY_CHARS = 4 * MAX_TOKENS * 2  # 16,384
TOO_LONG = "conversation_too_long"  # the stream's error code for ConversationTooLong (playground.js reads it)
TEMPERATURE = 0.7  # the spec's example value; the API's default of 1.0 makes a small model ramble
MAX_TEMPERATURE = 2.0  # the API's own bound


Turn = dict[str, str]  # {"role": "user" | "assistant", "content": ...}; an assistant turn may name its "model"


class ConversationTooLong(ValueError):
    """An earlier turn is longer than the page ever sends: this conversation cannot go on, a new chat can."""


def conversation(raw: object) -> list[Turn]:
    """The user and assistant turns the page sent, checked: a person's turns up to ``MAX_CHARS``, replies up
    to ``MAX_REPLY_CHARS``. ValueError says what is wrong; ConversationTooLong when no edit of the message
    being sent would help."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("Send at least one message.")
    messages = [message for message in raw[-MAX_MESSAGES:] if isinstance(message, dict)]
    turns = [_turn(message, last=index == len(messages) - 1) for index, message in enumerate(messages)]
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError("Type a message first.")
    return turns


def _turn(message: dict[Any, Any], *, last: bool) -> Turn:
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant") or not isinstance(content, str):
        raise ValueError("Messages are user or assistant turns of text.")
    limit = MAX_CHARS if role == "user" else MAX_REPLY_CHARS
    if len(content) > limit and last and role == "user":
        raise ValueError(f"Your message is longer than {MAX_CHARS:,} characters: shorten it, or send it in parts.")
    if len(content) > limit:
        raise ConversationTooLong(
            f"This conversation holds a message longer than {limit:,} characters, too long to send again: "
            "start a new chat to go on."
        )
    if first_lone_surrogate(content) is not None:  # JSON can carry one ("\\ud800"); it is no text
        raise ValueError("Messages must be valid Unicode text.")
    turn = {"role": role, "content": content}
    label = message.get("model")
    if role == "assistant" and isinstance(label, str) and _is_label(label):
        turn["model"] = label  # only for the page's label: the API request carries role and content
    return turn


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


@dataclass(frozen=True)
class ChatSettings:
    """What the settings panel sends with each turn."""

    system: str = ""  # a system prompt; blank: none (the model's own default applies)
    temperature: float = TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class SettingsRefused:
    """Settings that cannot be sent: what is wrong with each field (by its name), in the page's words."""

    errors: dict[str, str]


SETTING_FIELDS = ("system", "temperature", "max_tokens")
DEFAULT_FORM = {"system": "", "temperature": f"{TEMPERATURE:g}", "max_tokens": str(DEFAULT_MAX_TOKENS)}
SETTING_ERRORS = {
    "system": f"The system prompt must be text of at most {MAX_CHARS:,} characters.",
    "temperature": f"Temperature must be a number from 0 to {MAX_TEMPERATURE:g}.",
    "max_tokens": f"Max tokens must be a whole number from 1 to {MAX_TOKENS:,}.",
}


def chat_settings(raw: Mapping[str, object]) -> ChatSettings | SettingsRefused:
    """The settings of a turn, from JSON (numbers or strings) or a form (strings). A missing or blank
    field takes its default; every field that is wrong is named, so the page can say it next to it."""
    errors: dict[str, str] = {}
    system = raw.get("system")
    if system is None:
        system = ""
    if not isinstance(system, str) or len(system) > MAX_CHARS or first_lone_surrogate(system) is not None:
        errors["system"] = SETTING_ERRORS["system"]
    temperature = _number(raw.get("temperature"), TEMPERATURE)
    if temperature is None or not 0 <= temperature <= MAX_TEMPERATURE:
        errors["temperature"] = SETTING_ERRORS["temperature"]
    max_tokens = _number(raw.get("max_tokens"), DEFAULT_MAX_TOKENS)
    if max_tokens is None or not max_tokens.is_integer() or not 1 <= max_tokens <= MAX_TOKENS:
        errors["max_tokens"] = SETTING_ERRORS["max_tokens"]
    if errors:
        return SettingsRefused(errors)
    assert isinstance(system, str) and temperature is not None and max_tokens is not None
    return ChatSettings(system=system.strip(), temperature=temperature, max_tokens=int(max_tokens))


def _number(raw: object, default: float) -> float | None:
    """A finite number as JSON (a number) or a form (its text) sends it; ``default`` for nothing or a
    blank; None for anything else (true, "abc", NaN, 1e999)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return float(default)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (ValueError, OverflowError):  # an integer too large for a float overflows
        return None
    return value if math.isfinite(value) else None


def chat_request(
    turns: list[Turn], stream: bool, model: str | None = None, settings: ChatSettings | None = None
) -> ChatCompletionRequest:
    settings = settings or ChatSettings()
    system = [{"role": "system", "content": settings.system}] if settings.system else []
    return ChatCompletionRequest.model_validate(
        {
            "model": model,
            "messages": system + [{"role": t["role"], "content": t["content"]} for t in turns],
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
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
    form: Mapping[str, str] = DEFAULT_FORM,
    field_errors: Mapping[str, str] | None = None,
    draft: str = "",
) -> Response:
    """The page; ``form`` is what the settings fields show, ``field_errors`` what is wrong with them, and
    ``draft`` a message that was not sent (it stays in the box)."""
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
        form=form,
        field_errors=field_errors or {},
        draft=draft,
        max_chars=MAX_CHARS,
        max_tokens=MAX_TOKENS,
        max_temperature=MAX_TEMPERATURE,
        defaults=DEFAULT_FORM,  # what "View code" writes for a field left blank, as the server would take it
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
        code = TOO_LONG if isinstance(exc, ConversationTooLong) else None
        raise APIError(400, message, param="messages", code=code) from None
    try:
        model = model_name(body.get("model"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="model") from None
    settings = chat_settings(body)
    if isinstance(settings, SettingsRefused):  # the page puts the message next to the field `param` names
        param, message = next(iter(settings.errors.items()))
        raise APIError(400, message, param=param)
    principal = keys.principal_for(visitor.user)  # key_id None: the playground
    request_body = chat_request(turns, True, model, settings)
    return chat_response(await request.app.state.chat.complete(principal, request_body))


@router.post("/playground")
async def playground_post(
    request: Request,
    session: RequestSession,
    visitor: UserForm,
    message: Annotated[str, Form()] = "",
    model: Annotated[str, Form()] = "",
) -> Response:
    """The no-JavaScript path: earlier turns (and the model of each reply) ride along as hidden fields,
    the settings as the form's own fields."""
    form = await posted_form(request)
    roles, contents, labels = form.getlist("role"), form.getlist("content"), form.getlist("turn_model")
    labels += [""] * (len(roles) - len(labels))
    raw = [{"role": r, "content": c, "model": m} for r, c, m in zip(roles, contents, labels, strict=False)]
    raw.append({"role": "user", "content": message})
    typed = {name: value for name in SETTING_FIELDS if isinstance(value := form.get(name), str)}
    shown_form = DEFAULT_FORM | typed  # the fields show what was typed, right or wrong
    catalog = await current_catalog(request)
    earlier = [t for t in raw[:-1] if isinstance(t["content"], str)]
    settings = chat_settings(typed)
    if isinstance(settings, SettingsRefused):
        refused = {"form": shown_form, "field_errors": settings.errors, "draft": message, "status": 400}
        return await _answer(request, visitor, session, catalog=catalog, model=model or None, turns=earlier, **refused)
    try:
        turns = conversation(raw)
        chosen = model_name(model)
    except ValueError as exc:
        return await _answer(
            request, visitor, session, catalog=catalog, turns=earlier, form=shown_form, error=str(exc), status=400
        )
    principal = keys.principal_for(visitor.user)
    shown: dict[str, Any] = {"catalog": catalog, "model": chosen, "turns": turns, "form": shown_form}
    try:
        result = await request.app.state.chat.complete(principal, chat_request(turns, False, chosen, settings))
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
