"""Plugs the account pages into the app: routers, static files and the pages' error handlers."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from starlette.responses import Response

from . import account_api, admin, admin_models, docs_page, keys_pages, pages, playground, usage_pages
from .deps import CsrfFailed, LoginRequired, Visitor, WebError, is_secure
from .render import STATIC, CachedStaticFiles, page, redirect


def install(app: FastAPI) -> None:
    """Add the pages, the account API, the static files and the pages' error handlers to ``app``."""
    for module in (pages, docs_page, keys_pages, usage_pages, playground, admin, admin_models, account_api):
        app.include_router(module.router)
    app.mount("/static", CachedStaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(CsrfFailed, _csrf_failed)
    app.add_exception_handler(WebError, _web_error)


def _visitor(request: Request) -> Visitor:
    # Set by get_visitor earlier in this request; anonymous if the failure came before it ran.
    visitor = getattr(request.state, "visitor", None)
    return visitor or Visitor(None, None, "", is_secure(request))


async def _login_required(request: Request, _: Exception) -> Response:
    target = request.url.path if request.method == "GET" else ""
    return redirect("/login" + (f"?next={quote(target)}" if target and target != "/" else ""))


async def _csrf_failed(request: Request, _: Exception) -> Response:
    message = (
        "This form has expired or did not come from this site, so nothing was changed. Reload the page and try again."
    )
    return page(request, _visitor(request), "error.html", status=403, title="Form expired", message=message)


async def _web_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)  # registered for WebError only
    return page(request, _visitor(request), "error.html", status=exc.status, title=exc.title, message=exc.message)
