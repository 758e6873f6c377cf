"""Exception handlers: the only place that maps exceptions to HTTP answers.

Every error leaves the API in OpenAI's shape (see ``api.responses``); the one exception is the spec's
credits-spent 429 body, which the chat router answers without raising.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from aimichat.engines.base import EngineError
from aimichat.quota.fairness import TooManyConcurrent
from aimichat.store.clock import iso_utc
from aimichat.store.errors import STORE_UNAVAILABLE
from aimichat.store.text import holds_nul

from .auth import presented_key, require_key
from .chat.protocol import INVALID_TEXT, UNSUPPORTED_PARAMETER
from .errors import APIError, engine_error, mode_not_allowed
from .responses import api_error_response, error_response

log = logging.getLogger(__name__)

_HTTP_MESSAGES = {404: "Not found. See /v1/models and /v1/chat/completions.", 405: "Method not allowed."}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large"}


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """The 400's message and ``param`` for the first thing wrong with a request body."""
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request. Send valid JSON.", None
    if first.get("type") in (UNSUPPORTED_PARAMETER, INVALID_TEXT):  # our own refusals carry their parameter
        return first["msg"], first["ctx"]["param"]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing" and param is None:
        return "The request body is empty: send a JSON object (for chat, with 'messages').", None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    return (f"Invalid value for '{param}': {msg}." if param else f"Invalid request body: {msg}."), param


async def _refuse_key_outside_talk_mode(request: Request) -> JSONResponse | None:
    """A valid key asking for an API we do not offer is told keys are for talk mode only."""
    try:
        if presented_key(request, request.app.state.settings.allow_query_key) is None:
            return None
        await require_key(request)
    except APIError as exc:
        return api_error_response(exc)
    return api_error_response(mode_not_allowed(f"{request.method} {request.url.path}"))


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return api_error_response(exc)


async def _engine_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return api_error_response(engine_error(exc))


async def _validation(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(list(exc.errors()))
    return error_response(400, message, param=param)


def _without_trailing_slash(request: Request) -> str | None:
    """The route path a 404's path names but for a trailing slash, if there is one."""
    path = request.url.path
    if not path.endswith("/") or path == "/":
        return None
    wanted = path.rstrip("/")
    scope = {**request.scope, "path": wanted, "raw_path": wanted.encode()}
    matched = any(route.matches(scope)[0] is not Match.NONE for route in request.app.router.routes)
    return wanted if matched else None


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    meant = _without_trailing_slash(request) if exc.status_code == 404 else None
    # A browser's mistyped page address gets the web pages' HTML 404 (web/not_found.py; None: answer JSON).
    not_found_page = getattr(request.app.state, "not_found_page", None)
    if exc.status_code == 404 and not_found_page is not None and (shown := await not_found_page(request, meant)):
        return cast(Response, shown)
    if meant is not None:
        return error_response(404, f"Not found. Did you mean {meant} (without the trailing slash)?", code="not_found")
    if exc.status_code == 404 and request.url.path.startswith("/v1/"):
        refused = await _refuse_key_outside_talk_mode(request)
        if refused is not None:
            return refused
    status = exc.status_code
    message = _HTTP_MESSAGES.get(status) or (exc.detail if isinstance(exc.detail, str) else str(exc.detail))
    headers = dict(exc.headers) if exc.headers else None
    return error_response(status, message, code=_HTTP_CODES.get(status), headers=headers)


async def _too_many_concurrent(request: Request, exc: Exception) -> Response:
    """The spec's 429 body (as for spent credits): the account's tier runs this many requests at once."""
    assert isinstance(exc, TooManyConcurrent)
    retry_at = request.app.state.clock() + dt.timedelta(seconds=exc.retry_after)
    body = {
        "error": "Rate limit exceeded",
        "message": exc.message,
        "limit": exc.limit,
        "used": exc.running,
        "resetAt": iso_utc(retry_at),
    }
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(exc.retry_after)})


async def _store_unavailable(_: Request, exc: Exception) -> Response:
    log.error("store unavailable: %s", type(exc).__name__)
    return error_response(
        503,
        "The service's data store is unavailable; nothing was charged. Retry shortly.",
        code="store_unavailable",
        headers={"Retry-After": "2"},
    )


NUL_TITLE = "Text with a NUL character"
NUL_MESSAGE = (
    "The request holds a NUL character (U+0000) in its text, which cannot be stored or looked up. "
    "Remove it and try again."
)


async def _data_error(request: Request, exc: Exception) -> Response:
    """A value the database refused. NUL in a text parameter (PostgreSQL's text cannot hold it; psycopg
    refuses it before sending) comes from the caller's input: a 400, in the shape of the path's family (the
    pages' HTML error page, through ``app.state.error_page``; the APIs' JSON). The services refuse control
    characters where their text comes in; this is the net under any input they do not check yet. Any other
    DataError is the server's: re-raised, it becomes the 500 of :func:`_unexpected`."""
    assert isinstance(exc, sa_exc.DataError)
    if not holds_nul(exc.params):
        raise exc
    log.warning("refused a NUL character in %s %s", request.method, request.url.path)
    error_page = getattr(request.app.state, "error_page", None)  # web/site.py's (None: no pages installed)
    if error_page is not None and (shown := await error_page(request, 400, NUL_TITLE, NUL_MESSAGE)):
        return cast(Response, shown)
    return error_response(400, NUL_MESSAGE, code="invalid_text")


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "The server had an error while processing your request.", type="server_error")


_ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


_API_ERRORS = {
    "400": "Invalid request.",
    "401": "No valid API key.",
    "403": "The key or account may not do this (disabled account, key scopes, mode).",
    "404": "Unknown model or path.",
    "408": "The request body was not received in time.",
    "413": "The request body is too large.",
    "503": "The model or the data store is unavailable; retry after `Retry-After` seconds.",
}
_RATE_LIMITED = (
    "Credits spent, a key's rate limit, or too many concurrent requests for the account's plan "
    "(the API document's body: error, message, limit, used, resetAt)."
)


def document_errors(app: FastAPI) -> None:
    """The OpenAPI document says what the server answers: a bad body is a 400 in OpenAI's error shape
    (FastAPI's default document promises a 422 with its own shape, which this server never sends)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        error = {"$ref": "#/components/schemas/Error"}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault(
                        "400",
                        {"description": "Invalid request", "content": {"application/json": {"schema": error}}},
                    )
                if path.startswith("/v1/"):  # what any API call may answer (found by tests/fuzz)
                    for status, description in _API_ERRORS.items():
                        content = {"application/json": {"schema": error}}
                        responses.setdefault(status, {"description": description, "content": content})
                    responses.setdefault("429", {"description": _RATE_LIMITED})
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Error"] = _ERROR_SCHEMA
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    document_errors(app)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(TooManyConcurrent, _too_many_concurrent)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    for exc_class in STORE_UNAVAILABLE:
        app.add_exception_handler(exc_class, _store_unavailable)
    app.add_exception_handler(sa_exc.DataError, _data_error)
    app.add_exception_handler(Exception, _unexpected)
