"""The public API documentation page: ``templates/docs.html`` with this server's base URL filled in, and the
models the reader may use with their prices (an anonymous reader sees what a new account would get)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from aimichat.accounts.service import DEFAULT_DAILY_CREDITS
from aimichat.store.models import Tier

from .deps import AnyVisitor, RequestSession
from .models_view import current_catalog, offers
from .render import WebRoute, base_url, page

router = APIRouter(route_class=WebRoute, include_in_schema=False)


@router.get("/docs")
async def docs(request: Request, session: RequestSession, visitor: AnyVisitor) -> Response:
    catalog = await current_catalog(request)

    def render() -> Response:  # in the thread pool: the tier is read from the database
        tier = visitor.account.tier if visitor.account is not None else _default_tier(request, session)
        # The rate-limit examples show the default tier's allotment, the one a new account gets.
        return page(
            request,
            visitor,
            "docs.html",
            title="API documentation",
            base=base_url(request),
            daily_credits=DEFAULT_DAILY_CREDITS,
            models=offers(catalog, request.app.state.settings, tier),
            price_tier=tier.name if tier is not None else None,
        )

    return await run_in_threadpool(render)


def _default_tier(request: Request, session: Session) -> Tier | None:
    """The tier new accounts get: its models and prices are what a reader without an account can expect."""
    name = request.app.state.settings.default_tier
    return session.scalar(select(Tier).where(Tier.name == name))
