"""The public API documentation page: ``templates/docs.html`` with this server's base URL filled in."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from aimichat.accounts.service import DEFAULT_DAILY_CREDITS

from .deps import AnyVisitor
from .render import WebRoute, base_url, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)


@router.get("/docs")
def docs(request: Request, visitor: AnyVisitor) -> Response:
    # The rate-limit examples show the default tier's allotment, the one a new account gets.
    return page(
        request,
        visitor,
        "docs.html",
        title="API documentation",
        base=base_url(request),
        daily_credits=DEFAULT_DAILY_CREDITS,
    )
