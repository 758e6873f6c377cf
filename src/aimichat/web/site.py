"""Plugs the account pages into the app: routers, static files and the pages' error handlers."""

from __future__ import annotations

from dataclasses import replace

from fastapi import Depends, FastAPI, Request
from sqlalchemy import inspect as sa_inspect
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from aimichat.store.models import Account

from . import (
    account_api,
    admin,
    admin_models,
    alerts_pages,
    auth,
    docs_page,
    keys_pages,
    not_found,
    pages,
    password_reset,
    playground,
    usage_pages,
    verify,
)
from .deps import CsrfFailed, LoginRequired, Visitor, WebError, apply_pre_cookie, is_secure
from .render import STATIC, CachedStaticFiles, page, redirect


def install(app: FastAPI) -> None:
    """Add the pages, the account API, the static files and the pages' error handlers to ``app``."""
    for module in (pages, docs_page, usage_pages, alerts_pages, admin, admin_models, password_reset, verify):
        app.include_router(module.router)
    # With AIMICHAT_EMAIL_VERIFICATION on, making keys and spending credits wait for a confirmed email.
    for module in (keys_pages, playground):
        app.include_router(module.router, dependencies=[Depends(verify.verified_page)])
    app.include_router(account_api.router, dependencies=[Depends(verify.verified_api)])
    app.add_exception_handler(verify.VerificationRequired, verify.verification_required)
    app.mount("/static", CachedStaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(CsrfFailed, _csrf_failed)
    app.add_exception_handler(WebError, _web_error)
    app.state.not_found_page = not_found.not_found_page  # api.handlers' 404 asks it first (browsers get a page)
    app.state.error_page = error_page  # NUL safety net: api.handlers' 400 for a page's request is a page


def _visitor(request: Request) -> Visitor:
    # Set by get_visitor earlier in this request; anonymous if the failure came before it ran.
    visitor = getattr(request.state, "visitor", None)
    return visitor or Visitor(None, None, "", is_secure(request))


async def _login_required(request: Request, _: Exception) -> Response:
    visitor = _visitor(request)
    # A GET's page; a key form's page, filled in, for a POST: the draft is signed with this browser's
    # pre-log-in CSRF secret (what a logged-out visitor's token is), so it comes back in this browser only.
    target = await auth.return_target(request, draft_key=visitor.csrf_token if visitor.account is None else None)
    response = redirect(auth.login_url(target, expired=visitor.session_expired))
    apply_pre_cookie(response, visitor)  # a new secret must reach the browser now: the draft was signed with it
    return response


async def _csrf_failed(request: Request, _: Exception) -> Response:
    message = (
        "This form has expired or did not come from this site, so nothing was changed. Reload the page and try again."
    )
    return page(request, _visitor(request), "error.html", status=403, title="Form expired", message=message)


async def _web_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)  # registered for WebError only
    return page(request, _visitor(request), "error.html", status=exc.status, title=exc.title, message=exc.message)


# -- NUL safety net: the error page api.handlers shows for a page's request ------------------------------


async def error_page(request: Request, status: int, title: str, message: str) -> Response | None:
    """The pages' error page for an error ``api.handlers`` answers; None on the JSON APIs' paths, whose
    callers are programs (``/v1/``, ``/admin/v1/``, ``/api/``: OpenAI's error shape)."""
    if request.url.path.startswith(not_found.API_PREFIXES):
        return None
    visitor = await run_in_threadpool(_visitor_readable, request)
    return page(request, visitor, "error.html", status=status, title=title, message=message)


def _visitor_readable(request: Request) -> Visitor:
    """The visitor, with their account read again when the failure expired it: a flush that fails rolls the
    request's session back, which expires what it loaded, and that session is closed by now."""
    visitor = _visitor(request)
    state = sa_inspect(visitor.account) if visitor.account is not None else None
    if state is None or not state.expired_attributes or state.identity is None:
        return visitor
    with request.app.state.database.session() as session:
        return replace(visitor, account=session.get(Account, state.identity[0]))  # None: shown as logged out
