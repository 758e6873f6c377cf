"""Admin pages (accounts flagged ``is_admin``): list accounts, change a tier, disable or enable."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Path, Request
from sqlalchemy import func, select

from aimichat.accounts import service as accounts
from aimichat.store.models import Account, ApiKey

from . import sessions
from .deps import Visitor, WebError, admin_form, require_admin
from .render import WebRoute, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)
AccountId = Path(ge=1, le=2**31 - 1)


@router.get("/admin")
def admin_page(request: Request, visitor: Visitor = Depends(require_admin), updated: int | None = None):
    with request.app.state.db.session() as db:
        rows = accounts.list_accounts(db)
        key_counts = dict(db.execute(
            select(ApiKey.account_id, func.count(ApiKey.id)).where(ApiKey.revoked_at.is_(None)).group_by(ApiKey.account_id)
        ).all())
        tiers = accounts.list_tiers(db)
    return page(request, visitor, "admin.html", title="Admin", rows=rows, tiers=tiers, key_counts=key_counts, updated=updated)


@router.post("/admin/accounts/{account_id}/tier")
def admin_set_tier(request: Request, account_id: int = AccountId, visitor: Visitor = Depends(admin_form), tier: str = Form("")):
    with request.app.state.db.session() as db:
        account = _account(db, account_id)
        try:
            accounts.set_account_tier(db, account.email, tier)
        except accounts.AccountError as exc:
            raise WebError(400, "Unknown tier", str(exc)) from None
        db.commit()
    return redirect(f"/admin?updated={account_id}")


@router.post("/admin/accounts/{account_id}/disable")
def admin_disable(request: Request, account_id: int = AccountId, visitor: Visitor = Depends(admin_form)):
    if account_id == visitor.account.id:
        raise WebError(400, "Not allowed", "You cannot disable your own account: ask another admin, or use the command line.")
    with request.app.state.db.session() as db:
        account = _account(db, account_id)
        accounts.set_disabled(db, account.email, True)
        sessions.end_all(db, account.id)  # its keys stop at once (authentication checks); so do its browsers
        db.commit()
    return redirect(f"/admin?updated={account_id}")


@router.post("/admin/accounts/{account_id}/enable")
def admin_enable(request: Request, account_id: int = AccountId, visitor: Visitor = Depends(admin_form)):
    with request.app.state.db.session() as db:
        accounts.set_disabled(db, _account(db, account_id).email, False)
        db.commit()
    return redirect(f"/admin?updated={account_id}")


def _account(db, account_id: int) -> Account:
    account = db.get(Account, account_id)
    if account is None:
        raise WebError(404, "Account not found", "There is no account with that id.")
    return account
