"""The admin page of the audit log (``/admin/audit``: newest first, filtered by actor, action and target),
and the middleware that tells the audit log who is at the browser.

The web pages change accounts and keys through the same services as the CLI and the admin API, and those
record each change with the actor of the session (``audit.actor_of``). A web request's session does not
know its visitor when it opens (the visitor is looked up through it), so :class:`WebActor` gives the audit
log, for each request, a function that reads the visitor ``deps.get_visitor`` found: its account.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from aimichat.audit import service as audit

from .deps import Admin, RequestSession, WebError
from .render import WebRoute, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)
PER_PAGE = 50


class WebActor:
    """Pure ASGI middleware: during a request, the audit log's actor is its logged-in visitor's account."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # request.state is this dict: get_visitor stores the visitor there, later in the request.
        state = scope.setdefault("state", {})

        def visitor_actor() -> str | None:
            visitor = state.get("visitor")
            account = getattr(visitor, "account", None)
            return audit.account_actor(account.id) if account is not None else None

        token = audit.request_actor.set(visitor_actor)
        try:
            await self.app(scope, receive, send)
        finally:
            audit.request_actor.reset(token)


Filter = Annotated[str, Query(max_length=200)]


@router.get("/admin/audit")
def audit_page(
    request: Request,
    session: RequestSession,
    visitor: Admin,
    actor: Filter = "",
    action: Filter = "",
    target: Filter = "",
    page_number: Annotated[int, Query(alias="page", ge=1, le=2**31 - 1)] = 1,
) -> Response:
    filters = {"actor": actor.strip(), "action": action.strip(), "target": target.strip()}
    try:
        found = audit.list_events(session, **filters, page=page_number, per_page=PER_PAGE)
    except ValueError as exc:
        raise WebError(400, "Bad filter", str(exc)) from None
    given = {k: v for k, v in filters.items() if v}
    return page(
        request,
        visitor,
        "admin_audit.html",
        title="Audit log",
        found=found,
        filters=filters,
        newer=f"/admin/audit?{urlencode({**given, 'page': page_number - 1})}" if page_number > 1 else None,
        older=f"/admin/audit?{urlencode({**given, 'page': page_number + 1})}" if found.has_more else None,
    )
