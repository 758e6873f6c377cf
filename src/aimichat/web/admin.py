"""Admin pages (accounts flagged ``is_admin``): list accounts, change a tier, disable or enable."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.responses import Response

from aimichat.accounts import service as accounts
from aimichat.store.models import Account, ApiKey

from . import sessions
from .deps import Admin, AdminForm, RequestSession, WebError
from .render import WebRoute, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)
AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/admin")
def admin_page(request: Request, session: RequestSession, visitor: Admin, updated: int | None = None) -> Response:
    live_keys = (
        select(ApiKey.account_id, func.count(ApiKey.id)).where(ApiKey.revoked_at.is_(None)).group_by(ApiKey.account_id)
    )
    key_counts = {account_id: count for account_id, count in session.execute(live_keys)}
    return page(
        request,
        visitor,
        "admin.html",
        title="Admin",
        rows=accounts.list_accounts(session),
        tiers=accounts.list_tiers(session),
        key_counts=key_counts,
        updated=updated,
    )


@router.post("/admin/accounts/{account_id}/tier")
def admin_set_tier(
    session: RequestSession, account_id: AccountId, visitor: AdminForm, tier: str = Form("")
) -> Response:
    account = _account(session, account_id)
    try:
        accounts.set_account_tier(session, account.email, tier)
    except accounts.AccountError as exc:
        raise WebError(400, "Unknown tier", str(exc)) from None
    return redirect(f"/admin?updated={account_id}")


@router.post("/admin/accounts/{account_id}/disable")
def admin_disable(session: RequestSession, account_id: AccountId, visitor: AdminForm) -> Response:
    if account_id == visitor.user.id:
        raise WebError(
            400, "Not allowed", "You cannot disable your own account: ask another admin, or use the command line."
        )
    account = _account(session, account_id)
    accounts.set_disabled(session, account.email, True)
    sessions.end_all(session, account.id)  # its keys stop at once (authentication checks); so do its browsers
    return redirect(f"/admin?updated={account_id}")


@router.post("/admin/accounts/{account_id}/enable")
def admin_enable(session: RequestSession, account_id: AccountId, visitor: AdminForm) -> Response:
    accounts.set_disabled(session, _account(session, account_id).email, False)
    return redirect(f"/admin?updated={account_id}")


def _account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise WebError(404, "Account not found", "There is no account with that id.")
    return account
