"""The request's database session, who is at the browser, and the CSRF rules, as FastAPI dependencies.

- Every web request gets one ORM session (:data:`RequestSession`), committed when the handler returns.
- A logged-in visitor's CSRF token is derived from the session token (see ``sessions.csrf_for``).
- Before log-in there is no session, so the log-in and sign-up forms use a double-submit token: a
  random value in an HttpOnly cookie that the form must echo. That stops log-in CSRF (a forged
  form logging the victim into the attacker's account) without a database row per anonymous visitor.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.responses import Response

from aimichat.api.auth import presented_key
from aimichat.api.errors import APIError, mode_not_allowed
from aimichat.store.models import Account

from . import devices, sessions

SESSION_COOKIE = "aimichat_session"
PRE_COOKIE = "aimichat_csrf"


class LoginRequired(Exception):
    """A page needs a logged-in visitor: answered with a redirect to the log-in page."""


class CsrfFailed(Exception):
    """A state-changing form came without the right CSRF token: 403, nothing done."""


class WebError(Exception):
    """An error page with a status (404 for another account's key, 403 for non-admins, ...)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


@dataclass
class Visitor:
    account: Account | None
    session_token: str | None  # the raw cookie value of a live session
    csrf_token: str
    secure: bool
    new_pre_token: bool = False  # the pre-log-in CSRF cookie must be (re)set on this response
    session_id: int | None = None  # the web_sessions row of a logged-in visitor (new keys are handed off to it)
    session_expired: bool = False  # a session cookie came but no live session has it: log-in says so

    @property
    def is_admin(self) -> bool:
        return bool(self.account and self.account.is_admin)

    @property
    def user(self) -> Account:
        """The logged-in account, for handlers behind ``require_user``; LoginRequired if there is none."""
        if self.account is None:
            raise LoginRequired()
        return self.account


def is_secure(request: Request) -> bool:
    return (request.app.state.settings.public_url or "").lower().startswith("https://")


def cookie_name(base: str, secure: bool) -> str:
    # "__Host-" makes the browser insist on Secure, Path=/ and no Domain: no subdomain can plant it.
    return f"__Host-{base}" if secure else base


def client_address(request: Request) -> str:
    # uvicorn already applied X-Forwarded-For from trusted proxies (127.0.0.1 by default) to this.
    return (request.client.host if request.client else "") or "unknown"


# -- the request's database session ----------------------------------------------------------------


def db_session(request: Request) -> Iterator[Session]:
    """The one ORM session of a web request, shared by the handler and every dependency that asks.

    Committed when the handler returns normally; when it raises, the transaction is rolled back. A
    sync generator, so FastAPI opens, commits and closes it in its thread pool, off the event loop.
    """
    session = request.app.state.database.session()
    try:
        yield session
        session.commit()
    finally:
        # On an exception this ends the transaction with a rollback. Unlike rollback(), close() leaves
        # loaded objects as they are (detached), so the error page can still show the visitor's account.
        session.close()


# scope="function": commit as soon as the handler returns, before the response is sent, so a redirect
# after a write (log-in, new key) never reaches the browser ahead of the write itself.
RequestSession = Annotated[Session, Depends(db_session, scope="function")]


# -- who is at the browser ---------------------------------------------------------------------------


def get_visitor(request: Request, session: RequestSession) -> Visitor:
    """The visitor of this request (looked up once, then cached on ``request.state``).

    Sync, so FastAPI runs the lookup in its thread pool. The lookup is committed at once: the session's
    last-seen time is kept even if the handler fails, and SQLite's write lock (taken when a
    transaction begins) is not held through a slow handler such as a streamed playground reply.
    """
    cached: Visitor | None = getattr(request.state, "visitor", None)
    if cached is not None:
        return cached
    state = request.app.state
    secure = is_secure(request)
    token = request.cookies.get(cookie_name(SESSION_COOKIE, secure))
    user = None
    if token:
        user = sessions.lookup(session, token, state.clock())
        session.commit()
    if user is not None:
        visitor = Visitor(user.account, token, user.csrf_token, secure, session_id=user.session_id)
    else:
        pre = request.cookies.get(cookie_name(PRE_COOKIE, secure)) or ""
        fresh = not (32 <= len(pre) <= 128)
        token_value = secrets.token_urlsafe(32) if fresh else pre
        visitor = Visitor(None, None, token_value, secure, new_pre_token=fresh, session_expired=bool(token))
    request.state.visitor = visitor
    return visitor


# Handler parameters typed with these aliases get the visitor once it passed the named check.
AnyVisitor = Annotated[Visitor, Depends(get_visitor)]


def csrf_ok(visitor: Visitor, submitted: object) -> bool:
    return isinstance(submitted, str) and bool(submitted) and secrets.compare_digest(submitted, visitor.csrf_token)


# -- pages ---------------------------------------------------------------------------------------


async def posted_form(request: Request) -> FormData:
    return await request.form()  # Starlette caches it, so Form(...) parameters read the same data


PostedForm = Annotated[FormData, Depends(posted_form)]


def any_form(visitor: AnyVisitor, form: PostedForm) -> Visitor:
    """A POSTed form from anybody (log-in, sign-up): the CSRF token must match."""
    if not csrf_ok(visitor, form.get("csrf_token")):
        raise CsrfFailed()
    return visitor


def require_user(visitor: AnyVisitor) -> Visitor:
    """A logged-in visitor; anybody else is sent to the log-in page."""
    if visitor.account is None:
        raise LoginRequired()
    return visitor


def user_form(visitor: Annotated[Visitor, Depends(require_user)], form: PostedForm) -> Visitor:
    """A POSTed form from a logged-in visitor with the right CSRF token."""
    if not csrf_ok(visitor, form.get("csrf_token")):
        raise CsrfFailed()
    return visitor


def require_admin(visitor: Annotated[Visitor, Depends(require_user)]) -> Visitor:
    """A logged-in admin; other visitors get a 403 page."""
    if not visitor.is_admin:
        raise WebError(403, "Admins only", "This page is for administrators of this server.")
    return visitor


def admin_form(visitor: Annotated[Visitor, Depends(user_form)]) -> Visitor:
    """A POSTed form from a logged-in admin with the right CSRF token."""
    return require_admin(visitor)


AnyForm = Annotated[Visitor, Depends(any_form)]
User = Annotated[Visitor, Depends(require_user)]
UserForm = Annotated[Visitor, Depends(user_form)]
Admin = Annotated[Visitor, Depends(require_admin)]
AdminForm = Annotated[Visitor, Depends(admin_form)]


# -- JSON ----------------------------------------------------------------------------------------


# The playground shows this with a log-in link (static/playground.js, by its code "session_required").
LOGGED_OUT = "You are not logged in, or your session expired. Log in at /login, then try again."


def api_user(request: Request, session: RequestSession) -> Visitor:
    """The account API takes a browser session; an API key is refused outright (keys are talk-only)."""
    if presented_key(request, allow_query=True):
        raise mode_not_allowed("The account API")
    visitor = get_visitor(request, session)
    if visitor.account is None:
        raise APIError(401, LOGGED_OUT, code="session_required")
    return visitor


def api_write(request: Request, visitor: Annotated[Visitor, Depends(api_user)]) -> Visitor:
    """A state-changing account API call: the page's CSRF token must come in ``X-CSRF-Token``."""
    if not csrf_ok(visitor, request.headers.get("x-csrf-token")):
        raise APIError(
            403,
            "Missing or wrong X-CSRF-Token header: send the token from the page's csrf-token meta tag.",
            code="csrf_failed",
        )
    return visitor


ApiUser = Annotated[Visitor, Depends(api_user)]
ApiWrite = Annotated[Visitor, Depends(api_write)]


# -- cookies -------------------------------------------------------------------------------------


def set_session_cookie(response: Response, visitor: Visitor, token: str) -> None:
    response.set_cookie(
        cookie_name(SESSION_COOKIE, visitor.secure),
        token,
        max_age=int(sessions.LIFETIME.total_seconds()),
        path="/",
        httponly=True,
        samesite="lax",
        secure=visitor.secure,
    )


def clear_session_cookie(response: Response, visitor: Visitor) -> None:
    response.delete_cookie(
        cookie_name(SESSION_COOKIE, visitor.secure), path="/", httponly=True, samesite="lax", secure=visitor.secure
    )


def apply_pre_cookie(response: Response, visitor: Visitor) -> None:
    if visitor.new_pre_token and visitor.account is None:
        response.set_cookie(
            cookie_name(PRE_COOKIE, visitor.secure),
            visitor.csrf_token,
            path="/",
            httponly=True,
            samesite="lax",
            secure=visitor.secure,
        )


def known_device_cookie(request: Request, visitor: Visitor) -> str | None:
    """The browser's known-device cookie (see ``devices.py``), as sent."""
    return request.cookies.get(cookie_name(devices.COOKIE, visitor.secure))


def set_known_device_cookie(response: Response, visitor: Visitor, value: str) -> None:
    # Long-lived, and kept at log-out: it is what lets this browser in while others' failures lock the email.
    response.set_cookie(
        cookie_name(devices.COOKIE, visitor.secure),
        value,
        max_age=int(devices.LIFETIME.total_seconds()),
        path="/",
        httponly=True,
        samesite="lax",
        secure=visitor.secure,
    )
