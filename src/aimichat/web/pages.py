"""Sign-up, log-in, log-out, the account page (password change), the plan and the API docs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request

from . import auth, docs_page, sessions
from .deps import Visitor, any_form, client_address, clear_session_cookie, get_visitor, require_user, set_session_cookie, user_form
from .render import WebRoute, base_url, page, redirect, safe_next

router = APIRouter(route_class=WebRoute, include_in_schema=False)


@router.get("/")
def home(request: Request, visitor: Visitor = Depends(get_visitor)):
    if visitor.account:
        return redirect("/keys")
    return page(request, visitor, "signup.html", title="AimiChat", landing=True, base=base_url(request))


# -- sign up / log in / log out -------------------------------------------------------------------


@router.get("/signup")
def signup_page(request: Request, visitor: Visitor = Depends(get_visitor)):
    if visitor.account:
        return redirect("/keys")
    return page(request, visitor, "signup.html", title="Sign up")


@router.post("/signup")
def signup(request: Request, visitor: Visitor = Depends(any_form), email: str = Form(""), password: str = Form("")):
    state = request.app.state
    with state.db.session() as db:
        try:
            _, token = auth.sign_up(db, email, password, tier=state.settings.default_tier, now=state.clock(),
                                    old_token=visitor.session_token, address=client_address(request))
            db.commit()
        except auth.Refused as exc:
            db.rollback()
            return page(request, visitor, "signup.html", status=exc.status, title="Sign up", error=exc.message, email=email)
    return _logged_in(visitor, token, "/keys")


@router.get("/login")
def login_page(request: Request, visitor: Visitor = Depends(get_visitor), next: str = ""):
    if visitor.account:
        return redirect(safe_next(next))
    return page(request, visitor, "login.html", title="Log in", next=safe_next(next, ""))


@router.post("/login")
def login(request: Request, visitor: Visitor = Depends(any_form), email: str = Form(""), password: str = Form(""), next: str = Form("")):
    state = request.app.state
    with state.db.session() as db:
        try:
            _, token = auth.log_in(db, email, password, address=client_address(request), now=state.clock(), old_token=visitor.session_token)
            db.commit()
        except auth.Refused as exc:
            db.rollback()
            response = page(request, visitor, "login.html", status=exc.status, title="Log in", error=exc.message, email=email, next=safe_next(next, ""))
            if exc.retry_after:
                response.headers["Retry-After"] = str(exc.retry_after)
            return response
    return _logged_in(visitor, token, safe_next(next))


def _logged_in(visitor: Visitor, token: str, target: str):
    response = redirect(target)
    set_session_cookie(response, visitor, token)  # always a new token: a planted session id is worthless
    return response


@router.post("/logout")
def logout(request: Request, visitor: Visitor = Depends(user_form)):
    with request.app.state.db.session() as db:
        sessions.end(db, visitor.session_token)
        db.commit()
    response = redirect("/login")
    clear_session_cookie(response, visitor)
    return response


# -- account -------------------------------------------------------------------------------------


@router.get("/account")
def account_page(request: Request, visitor: Visitor = Depends(require_user), changed: bool = False):
    return page(request, visitor, "account.html", title="Account", changed=changed)


@router.post("/account/password")
def change_password(request: Request, visitor: Visitor = Depends(user_form), current_password: str = Form(""), new_password: str = Form("")):
    state = request.app.state
    with state.db.session() as db:
        try:
            token = auth.change_password(db, visitor.account, current_password, new_password, address=client_address(request), now=state.clock())
            db.commit()
        except auth.Refused as exc:
            db.rollback()
            return page(request, visitor, "account.html", status=exc.status, title="Account", error=exc.message)
    return _logged_in(visitor, token, "/account?changed=1")


# -- plan and docs -------------------------------------------------------------------------------


@router.get("/plan")
def plan(request: Request, visitor: Visitor = Depends(require_user)):
    return page(request, visitor, "plan.html", title="Plan", tier=visitor.account.tier)


@router.get("/docs")
def docs(request: Request, visitor: Visitor = Depends(get_visitor)):
    base = base_url(request)
    return page(request, visitor, "docs.html", title="API documentation", base=base, sections=docs_page.sections(base),
                placeholder=docs_page.PLACEHOLDER, model=request.app.state.engine.model_id)

