"""Every error leaves the API in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

The one exception is the spec's credits-spent 429 body, built in ``quota_exceeded``. This module is
the only place that maps exceptions to HTTP answers.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import exceptions as redis_exc
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from aimichat.engines.base import ContextLengthExceeded, EngineBusy, EngineError, UpstreamRejected
from aimichat.quota import periods
from aimichat.quota.ledger import Refusal

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}

# The database cannot be reached (down, restarting, pool exhausted): fail closed and say when to retry.
STORE_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    redis_exc.BusyLoadingError,
)


_NAMED_REFUSAL = re.compile(r"^'(\w+)': ")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "api_error")
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, code=self.code, param=self.param, type=self.type, headers=self.headers)


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, type=type or _TYPES.get(status, "api_error"), code=code, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def invalid_api_key() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer aimichat_...', "
        "'X-API-Key: aimichat_...' or '?api_key=aimichat_...'.",
        code="invalid_api_key",
    )


def mode_not_allowed(what: str = "This endpoint") -> APIError:
    return APIError(403, f"{what} is not available to API keys: keys give talk mode (basic chat) only.", code="mode_not_allowed")


def quota_exceeded(refusal: Refusal) -> JSONResponse:
    """The spec's 429 body, exactly, with ``Retry-After`` and the rate-limit headers."""
    body = {
        "error": "Rate limit exceeded",
        "message": refusal.message,
        "limit": refusal.limit,
        "used": refusal.used,
        "resetAt": periods.iso_utc(refusal.reset_at),
    }
    headers = {
        "Retry-After": str(refusal.retry_after),
        "X-RateLimit-Limit": str(refusal.daily_limit),
        "X-RateLimit-Remaining": str(max(0, refusal.daily_limit - refusal.day_used)) if refusal.message.startswith("Monthly") else "0",
        "X-RateLimit-Reset": periods.iso_utc(refusal.daily_reset_at),
    }
    return JSONResponse(body, status_code=429, headers=headers)


def engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, EngineBusy):
        return APIError(503, str(exc), code="engine_overloaded", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, UpstreamRejected):  # the upstream's 4xx: the caller's request, not our failure
        return APIError(400, exc.reason, code=exc.code, param=exc.param)
    return APIError(503, "The model failed to answer; nothing was charged. Retry shortly.", code="engine_error", headers={"Retry-After": "1"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request. Send valid JSON.", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    named = _NAMED_REFUSAL.match(msg)
    if named and not param:  # our own refusals name the field they are about
        return msg, named.group(1)
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    return (f"Invalid value for '{param}': {msg}." if param else f"Invalid request body: {msg}."), param


async def _refuse_key_outside_talk_mode(request: Request) -> JSONResponse | None:
    """A valid key asking for an API we do not offer is told keys are for talk mode only."""
    from .auth import presented_key, require_key

    if presented_key(request, request.app.state.settings.allow_query_key) is None:
        return None
    try:
        await require_key(request)
    except APIError as exc:
        return exc.response()
    return mode_not_allowed(f"{request.method} {request.url.path}").response()


async def _store_unavailable(_: Request, exc: Exception) -> JSONResponse:
    log.error("store unavailable: %s", type(exc).__name__)
    return error_response(
        503,
        "The service's data store is unavailable; nothing was charged. Retry shortly.",
        code="store_unavailable",
        headers={"Retry-After": "2"},
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError):
        return engine_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404 and request.url.path.startswith("/v1/"):
            refused = await _refuse_key_outside_talk_mode(request)
            if refused is not None:
                return refused
        messages = {404: "Not found. See /v1/models and /v1/chat/completions.", 405: "Method not allowed."}
        message = exc.detail if isinstance(exc.detail, str) and exc.status_code not in messages else messages.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))

    for exc_class in STORE_UNAVAILABLE:
        app.add_exception_handler(exc_class, _store_unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "The server had an error while processing your request.", type="server_error")
