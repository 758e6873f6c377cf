"""Plugs the account pages into the app: routers, static files and the pages' error handlers."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from starlette.responses import Response

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
from .deps import CsrfFailed, LoginRequired, Visitor, WebError, is_secure
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


def _visitor(request: Request) -> Visitor:
    # Set by get_visitor earlier in this request; anonymous if the failure came before it ran.
    visitor = getattr(request.state, "visitor", None)
    return visitor or Visitor(None, None, "", is_secure(request))


async def _login_required(request: Request, _: Exception) -> Response:
    target = request.url.path if request.method == "GET" else ""
    return redirect(auth.login_url(target, expired=_visitor(request).session_expired))


async def _csrf_failed(request: Request, _: Exception) -> Response:
    message = (
        "This form has expired or did not come from this site, so nothing was changed. Reload the page and try again."
    )
    return page(request, _visitor(request), "error.html", status=403, title="Form expired", message=message)


async def _web_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)  # registered for WebError only
    return page(request, _visitor(request), "error.html", status=exc.status, title=exc.title, message=exc.message)
