"""``POST /v1/chat/completions`` as a plain ASGI endpoint, ahead of FastAPI's routing and dependency solving.

Every chat request used to go through FastAPI's whole stack: the web pages' audit middleware, the exception
middleware, FastAPI's exit-stack middleware, the router's match over some 150 routes, then FastAPI's
request handler (body parsing, dependency solving, validation with error regeneration). A py-spy profile
of sequential requests (docs/benchmarks.md, issue 14) put FastAPI's dependency solving and validation at 9 %
and its and Starlette's layers at another 9 % of the request's 2.4 ms of CPU. Here the request goes from
``RequestMiddleware`` (size limit, request id, access log) straight to the same steps, done by hand in the
order FastAPI does them: the body parsed as JSON (a 400 before anything else), the key checked
(:func:`~aimichat.api.auth.require_key`), the body validated, then :func:`api_router.answer`, the
route's own code. Errors become answers through the app's own exception handlers.

The FastAPI route (``api_router.chat_completions``) stays declared: it is the route's OpenAPI entry and
the reference implementation; ``tests/api/test_chat_fast_path.py`` sends both the same requests, good and
bad, and compares the answers.
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Callable, Mapping
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from aimichat.api.auth import require_key

from . import api_router
from .protocol import ChatCompletionRequest

EMPTY = object()  # no body at all (a JSON ``null`` is None, and is refused as a body that is not an object)


class ChatFastPath:
    """Pure ASGI middleware: ``POST /v1/chat/completions`` is answered here; everything else goes on to
    ``app``. ``handlers`` are the app's exception handlers (``app.exception_handlers``); ``route`` the
    FastAPI route, named in ``scope["route"]`` for the request metrics."""

    def __init__(self, app: ASGIApp, handlers: Mapping[Any, Callable[..., Any]], route: BaseRoute | None = None):
        self.app = app
        self.route = route
        # The 500 handler stays with Starlette's ServerErrorMiddleware, outside this one, as for any route.
        errors = {key: handler for key, handler in handlers.items() if key not in (500, Exception)}
        self.endpoint = ExceptionMiddleware(request_response(_chat), handlers=errors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and _route_path(scope) == api_router.PATH:
            scope["route"] = self.route
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _chat(request: Request) -> Response:
    raw = await _json_body(request)
    principal = await require_key(request)  # after the JSON, before validation: as FastAPI orders them
    return await api_router.answer(request, _validated(raw), principal)


async def _json_body(request: Request) -> Any:
    """The body as FastAPI reads a JSON body parameter (its strict content type): EMPTY when empty, decoded
    JSON when the content type is JSON, the raw bytes otherwise (which validation then refuses)."""
    raw = await request.body()
    if not raw:
        return EMPTY
    message = email.message.Message()
    message["content-type"] = request.headers.get("content-type") or ""
    subtype = message.get_content_subtype()
    if not request.headers.get("content-type") or message.get_content_maintype() != "application":
        return raw
    if not (subtype == "json" or subtype.endswith("+json")):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([error | {"ctx": {"error": exc.msg}}], body=exc.doc) from None
    except Exception as exc:  # e.g. bytes that are not UTF-8
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc


def _validated(raw: Any) -> ChatCompletionRequest:
    if raw is EMPTY:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        return ChatCompletionRequest.model_validate(raw, from_attributes=True)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=raw) from None


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the ``root_path`` a proxy mounted the app under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
