"""The API's exception tree: what can go wrong with a request, as plain exceptions.

Services raise these; ``api.handlers`` alone turns them (and engine and store failures) into HTTP
answers in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

- :class:`APIError`: a refusal with an HTTP status, an OpenAI error ``type`` and ``code``, and the
  parameter it is about. Its ``rate_limit``, when set, adds the ``X-RateLimit-*`` headers.
- :func:`engine_error` maps an :class:`~aimichat.engines.base.EngineError` to the APIError the caller sees.
"""

from __future__ import annotations

from aimichat.engines.base import ContextLengthExceeded, EngineBusy, EngineError, InvalidRequest, UpstreamRejected
from aimichat.quota.ledger import RateLimit

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return _TYPES.get(status, "api_error")


class APIError(Exception):
    """A request the API refuses or cannot answer; never a stack trace."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: int | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status)
        self.retry_after = retry_after
        self.rate_limit = rate_limit


def invalid_api_key() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer aimichat_...', "
        "'X-API-Key: aimichat_...' or '?api_key=aimichat_...'.",
        code="invalid_api_key",
    )


def mode_not_allowed(what: str = "This endpoint") -> APIError:
    return APIError(
        403, f"{what} is not available to API keys: keys give talk mode (basic chat) only.", code="mode_not_allowed"
    )


def engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, EngineBusy):
        return APIError(503, str(exc), code="engine_overloaded", retry_after=exc.retry_after)
    if isinstance(exc, UpstreamRejected | InvalidRequest):  # the caller's request, not our failure
        return APIError(400, exc.reason, code=exc.code, param=exc.param)
    return APIError(
        503, "The model failed to answer; nothing was charged. Retry shortly.", code="engine_error", retry_after=1
    )
