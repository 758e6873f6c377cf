"""Jinja2 pages with autoescaping, the security headers every page carries, and static asset URLs."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable, Coroutine
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from aimichat.config import PUBLIC_MODEL_ID

from .deps import Visitor, apply_pre_cookie
from .support import contact

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# No inline scripts or styles anywhere: a stored-XSS payload that slips past escaping still cannot run.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _utc(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else ""


def _iso(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else ""


def time_ago(moment: dt.datetime, now: dt.datetime, *, coarse: bool = False) -> str:
    """How long ago ``moment`` was: "just now" (a moment a little ahead, from another replica's clock, too),
    "5 min ago", then "3 h 12 min ago" and "2 d 5 h ago" in the words of /usage's ``time_left``; or, ``coarse``
    (the keys list), in one unit: "3 h ago", "12 d ago", and the date (UTC) from 60 days on. The exact time
    is the title of the ``<time>`` around it."""
    secs = int((now - moment).total_seconds())
    if secs < 60:
        return "just now"
    if secs < 3600:
        return f"{secs // 60} min ago"
    hours, days = secs // 3600, secs // 86400
    if coarse:
        if days < 1:
            return f"{hours} h ago"
        return f"{days} d ago" if days < 60 else moment.strftime("%Y-%m-%d")
    if days < 1:
        return f"{hours} h {(secs % 3600) // 60} min ago"
    return f"{days} d {hours % 24} h ago"


env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True)
env.filters["utc"] = _utc
env.filters["iso"] = _iso
env.filters["thousands"] = lambda n: f"{n:,}"
env.globals["model_id"] = PUBLIC_MODEL_ID  # the model id people put in requests, on any page


@cache
def asset_version() -> str:
    """A hash of the static files, so their URLs change when they do and can be cached for a year."""
    digest = hashlib.sha256()
    for path in sorted(p for p in STATIC.rglob("*") if p.is_file()):  # static/vendor/ too (the playground's)
        digest.update(path.relative_to(STATIC).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def static_url(name: str) -> str:
    return f"/static/{name}?v={asset_version()}"


env.globals["static"] = static_url


def base_url(request: Request) -> str:
    """This server's public base URL, for the examples people copy."""
    public = request.app.state.settings.public_url
    return (public or str(request.base_url)).rstrip("/")


AnyResponse = TypeVar("AnyResponse", bound=Response)


def security_headers(response: AnyResponse, *, cache: bool = False) -> AnyResponse:
    """``response`` with the headers every page and API answer carries (no-store unless ``cache``)."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    if not cache:
        # A shown-once key must not come back from a cache or the back/forward cache.
        headers.setdefault("Cache-Control", "no-store")
    return response


def page(
    request: Request, visitor: Visitor, template: str, *, status: int = 200, title: str, **context: Any
) -> HTMLResponse:
    """``template`` rendered for ``visitor``, with the security headers (and a fresh pre-log-in CSRF cookie
    when the visitor needs one)."""
    html = env.get_template(template).render(
        request_path=request.url.path,
        visitor=visitor,
        account=visitor.account,
        csrf_token=visitor.csrf_token,
        title=title,
        support=contact(request.app.state.settings),  # the plan, docs and error pages name it when set
        **context,
    )
    response = HTMLResponse(html, status_code=status)
    apply_pre_cookie(response, visitor)
    return security_headers(response)


class CachedStaticFiles(StaticFiles):
    """Static files with long caching for versioned URLs (``?v=``), so a slow phone fetches them once."""

    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        versioned = b"v=" in scope.get("query_string", b"")
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable" if versioned else "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


class WebRoute(APIRoute):
    """Routes of the account pages and account API: every answer gets the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_headers(request: Request) -> Response:
            return security_headers(await handler(request))

        return with_headers


def redirect(url: str) -> RedirectResponse:
    return security_headers(RedirectResponse(url, status_code=303))  # 303: the browser follows with GET


MAX_NEXT = 2048  # a log-in's way back; a key form kept through a log-in fits (key_input.MAX_DRAFT_QUERY)


def safe_next(target: str | None, default: str = "/keys") -> str:
    """Only local paths: ``next=//evil.example`` must not turn log-in into an open redirect. Bounded too, and
    printable: a browser drops tabs and newlines from a URL, so "/", a tab, "/evil.example" reads as "//..."."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or "\\" in target:
        return default
    if len(target) > MAX_NEXT or not target.isprintable():  # keys pages' drafts: key_input.MAX_DRAFT_QUERY
        return default
    return target
