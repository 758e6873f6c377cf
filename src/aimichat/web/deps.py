"""Who is at the browser, and the CSRF rules, as FastAPI dependencies.

- A logged-in visitor's CSRF token is derived from the session token (see ``sessions.csrf_for``).
- Before log-in there is no session, so the log-in and sign-up forms use a double-submit token: a
  random value in an HttpOnly cookie that the form must echo. That stops log-in CSRF (a forged
  form logging the victim into the attacker's account) without a database row per anonymous visitor.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Depends, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from aimichat.api.auth import presented_key
from aimichat.api.errors import APIError, mode_not_allowed
from aimichat.store.models import Account

from . import sessions

SESSION_COOKIE = "aimichat_session"
PRE_COOKIE = "aimichat_csrf"


class LoginRequired(Exception):
    """A page needs a logged-in visitor: answered with a redirect to the log-in page."""


class CsrfFailed(Exception):
    """A state-changing form came without the right CSRF token: 403, nothing done."""


class WebError(Exception):
    """An error page with a status (404 for another account's key, 403 for non-admins, ...)."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


@dataclass
class Visitor:
    account: Account | None
    session_token: str | None  # the raw cookie value of a live session
    csrf_token: str
    secure: bool
    new_pre_token: bool = False  # the pre-log-in CSRF cookie must be (re)set on this response

    @property
    def is_admin(self) -> bool:
        return bool(self.account and self.account.is_admin)


def is_secure(request: Request) -> bool:
    return (request.app.state.settings.public_url or "").lower().startswith("https://")


def cookie_name(base: str, secure: bool) -> str:
    # "__Host-" makes the browser insist on Secure, Path=/ and no Domain: no subdomain can plant it.
    return f"__Host-{base}" if secure else base


def client_address(request: Request) -> str:
    # uvicorn already applied X-Forwarded-For from trusted proxies (127.0.0.1 by default) to this.
    return (request.client.host if request.client else "") or "unknown"


def get_visitor(request: Request) -> Visitor:
    """Sync, so FastAPI runs the database lookup in its thread pool."""
    cached = getattr(request.state, "visitor", None)
    if cached is not None:
        return cached
    state = request.app.state
    secure = is_secure(request)
    token = request.cookies.get(cookie_name(SESSION_COOKIE, secure))
    user = None
    if token:
        with state.db.session() as db:
            user = sessions.lookup(db, token, state.clock())
            db.commit()
    if user is not None:
        visitor = Visitor(user.account, token, user.csrf_token, secure)
    else:
        pre = request.cookies.get(cookie_name(PRE_COOKIE, secure)) or ""
        fresh = not (32 <= len(pre) <= 128)
        visitor = Visitor(None, None, secrets.token_urlsafe(32) if fresh else pre, secure, new_pre_token=fresh)
    request.state.visitor = visitor
    return visitor


def csrf_ok(visitor: Visitor, submitted: object) -> bool:
    return isinstance(submitted, str) and bool(submitted) and secrets.compare_digest(submitted, visitor.csrf_token)


# -- pages ---------------------------------------------------------------------------------------


async def posted_form(request: Request) -> FormData:
    return await request.form()  # Starlette caches it, so Form(...) parameters read the same data


def any_form(visitor: Visitor = Depends(get_visitor), form: FormData = Depends(posted_form)) -> Visitor:
    """A POSTed form from anybody (log-in, sign-up): the CSRF token must match."""
    if not csrf_ok(visitor, form.get("csrf_token")):
        raise CsrfFailed()
    return visitor


def require_user(visitor: Visitor = Depends(get_visitor)) -> Visitor:
    if visitor.account is None:
        raise LoginRequired()
    return visitor


def user_form(visitor: Visitor = Depends(require_user), form: FormData = Depends(posted_form)) -> Visitor:
    """A POSTed form from a logged-in visitor with the right CSRF token."""
    if not csrf_ok(visitor, form.get("csrf_token")):
        raise CsrfFailed()
    return visitor


def require_admin(visitor: Visitor = Depends(require_user)) -> Visitor:
    if not visitor.is_admin:
        raise WebError(403, "Admins only", "This page is for administrators of this server.")
    return visitor


def admin_form(visitor: Visitor = Depends(user_form)) -> Visitor:
    return require_admin(visitor)


# -- JSON ----------------------------------------------------------------------------------------


def api_user(request: Request) -> Visitor:
    """The account API takes a browser session; an API key is refused outright (keys are talk-only)."""
    if presented_key(request, allow_query=True):
        raise mode_not_allowed("The account API")
    visitor = get_visitor(request)
    if visitor.account is None:
        raise APIError(401, "Log in first: the account API takes a browser session, not an API key.", code="session_required")
    return visitor


def api_write(request: Request, visitor: Visitor = Depends(api_user)) -> Visitor:
    if not csrf_ok(visitor, request.headers.get("x-csrf-token")):
        raise APIError(403, "Missing or wrong X-CSRF-Token header: send the token from the page's csrf-token meta tag.", code="csrf_failed")
    return visitor


# -- cookies -------------------------------------------------------------------------------------


def set_session_cookie(response: Response, visitor: Visitor, token: str) -> None:
    response.set_cookie(
        cookie_name(SESSION_COOKIE, visitor.secure), token, max_age=int(sessions.LIFETIME.total_seconds()),
        path="/", httponly=True, samesite="lax", secure=visitor.secure,
    )


def clear_session_cookie(response: Response, visitor: Visitor) -> None:
    response.delete_cookie(cookie_name(SESSION_COOKIE, visitor.secure), path="/", httponly=True, samesite="lax", secure=visitor.secure)


def apply_pre_cookie(response: Response, visitor: Visitor) -> None:
    if visitor.new_pre_token and visitor.account is None:
        response.set_cookie(
            cookie_name(PRE_COOKIE, visitor.secure), visitor.csrf_token,
            path="/", httponly=True, samesite="lax", secure=visitor.secure,
        )
