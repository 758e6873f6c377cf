"""The pieces every HTTP answer of the API is built from: error bodies, the spec's 429, rate-limit headers.

One place for each, so the 413 the middleware writes, the 400 of a validation error and the 503 of
an engine failure have the same shape, and ``X-RateLimit-*`` is spelt once.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from aimichat.quota.ledger import RateLimit, Refusal
from aimichat.store.clock import iso_utc

from .errors import APIError, error_type


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def rate_limit_headers(rate_limit: RateLimit) -> dict[str, str]:
    """``X-RateLimit-*`` (the allotment that will refuse first; ``X-RateLimit-Scope`` says whose), and
    OpenAI's ``x-ratelimit-*-requests`` / ``-tokens`` for a key with per-minute limits."""
    headers = {
        "X-RateLimit-Limit": str(rate_limit.limit),
        "X-RateLimit-Remaining": str(rate_limit.remaining),
        "X-RateLimit-Reset": iso_utc(rate_limit.reset_at),
        "X-RateLimit-Scope": rate_limit.scope,
    }
    for name, window in (("requests", rate_limit.requests), ("tokens", rate_limit.tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{name}"] = f"{window.reset_seconds}s"
    return headers


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, type=type or error_type(status), code=code, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def api_error_response(error: APIError) -> JSONResponse:
    headers = rate_limit_headers(error.rate_limit) if error.rate_limit else {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return error_response(
        error.status, error.message, code=error.code, param=error.param, type=error.type, headers=headers
    )


def quota_exceeded(refusal: Refusal) -> JSONResponse:
    """The spec's 429 body, exactly, with ``Retry-After`` and the rate-limit headers."""
    body = {
        "error": "Rate limit exceeded",
        "message": refusal.message,
        "limit": refusal.limit,
        "used": refusal.used,
        "resetAt": iso_utc(refusal.reset_at),
    }
    headers = {"Retry-After": str(refusal.retry_after), **rate_limit_headers(refusal.rate_limit)}
    return JSONResponse(body, status_code=429, headers=headers)
