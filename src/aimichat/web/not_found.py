"""A mistyped page address in a browser gets an HTML 404 with the site's header and ways back; API paths
(and anything not asked for as a page) keep OpenAI's JSON error. ``api.handlers`` asks this module through
``app.state.not_found_page``, so the API layer never imports the pages."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from aimichat.store.errors import STORE_UNAVAILABLE

from .deps import Visitor, get_visitor, is_secure
from .render import page

# Paths whose callers are programs: their 404 stays JSON whatever the Accept header says.
API_PREFIXES = ("/v1/", "/admin/v1/", "/api/")


def wants_page(method: str, path: str, accept: str) -> bool:
    """Whether a 404 for this request is a person's browser asking for a page."""
    if method not in ("GET", "HEAD"):
        return False
    if path.startswith(API_PREFIXES) or path.rstrip("/") in ("/v1", "/admin/v1", "/api"):
        return False
    return "text/html" in accept.lower()


async def not_found_page(request: Request, meant: str | None) -> Response | None:
    """The 404 page (with ``meant``, the same path without its trailing slash, when that is a page), or None
    when the JSON error is the answer."""
    if not wants_page(request.method, request.url.path, request.headers.get("accept", "")):
        return None
    visitor = await run_in_threadpool(_visitor, request)
    return page(request, visitor, "not_found.html", status=404, title="Page not found", meant=meant)


def _visitor(request: Request) -> Visitor:
    """Who is at the browser, so the header shows their menu; anonymous when the store cannot say (a 404
    page is no reason for a 503)."""
    session = request.app.state.database.session()
    try:
        return get_visitor(request, session)
    except STORE_UNAVAILABLE:
        return Visitor(None, None, "", is_secure(request))
    finally:
        session.close()
