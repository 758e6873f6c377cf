"""Sign-up, log-in, log-out, the account page (password change) and the plan (its credits, and the models it
includes with what each costs)."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from . import auth, sessions
from .deps import (
    AnyForm,
    AnyVisitor,
    RequestSession,
    User,
    UserForm,
    Visitor,
    clear_session_cookie,
    client_address,
    set_session_cookie,
)
from .models_view import current_catalog, offers
from .render import WebRoute, base_url, page, redirect, safe_next

router = APIRouter(route_class=WebRoute, include_in_schema=False)


@router.get("/")
def home(request: Request, visitor: AnyVisitor) -> Response:
    if visitor.account:
        return redirect("/keys")
    return page(request, visitor, "signup.html", title="AimiChat", landing=True, base=base_url(request))


# -- sign up / log in / log out -------------------------------------------------------------------


@router.get("/signup")
def signup_page(request: Request, visitor: AnyVisitor) -> Response:
    if visitor.account:
        return redirect("/keys")
    return page(request, visitor, "signup.html", title="Sign up")


@router.post("/signup")
def signup(
    request: Request, session: RequestSession, visitor: AnyForm, email: str = Form(""), password: str = Form("")
) -> Response:
    state = request.app.state
    try:
        _, token = auth.sign_up(
            session,
            email,
            password,
            tier=state.settings.default_tier,
            now=state.clock(),
            old_token=visitor.session_token,
            address=client_address(request),
        )
    except auth.Refused as exc:
        session.rollback()  # nothing of a refused sign-up is kept
        return page(request, visitor, "signup.html", status=exc.status, title="Sign up", error=exc.message, email=email)
    return _logged_in(visitor, token, "/keys")


@router.get("/login")
def login_page(request: Request, visitor: AnyVisitor, next: str = "") -> Response:
    if visitor.account:
        return redirect(safe_next(next))
    return page(request, visitor, "login.html", title="Log in", next=safe_next(next, ""))


@router.post("/login")
def login(
    request: Request,
    session: RequestSession,
    visitor: AnyForm,
    email: str = Form(""),
    password: str = Form(""),
    next: str = Form(""),
) -> Response:
    state = request.app.state
    try:
        _, token = auth.log_in(
            session,
            email,
            password,
            address=client_address(request),
            now=state.clock(),
            old_token=visitor.session_token,
        )
    except auth.Refused as exc:
        session.rollback()  # auth.log_in has already committed the failure it counts
        response = page(
            request,
            visitor,
            "login.html",
            status=exc.status,
            title="Log in",
            error=exc.message,
            email=email,
            next=safe_next(next, ""),
        )
        if exc.retry_after:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return _logged_in(visitor, token, safe_next(next))


def _logged_in(visitor: Visitor, token: str, target: str) -> Response:
    response = redirect(target)
    set_session_cookie(response, visitor, token)  # always a new token: a planted session id is worthless
    return response


@router.post("/logout")
def logout(session: RequestSession, visitor: UserForm) -> Response:
    if visitor.session_token:
        sessions.end(session, visitor.session_token)
    response = redirect("/login")
    clear_session_cookie(response, visitor)
    return response


# -- account -------------------------------------------------------------------------------------


@router.get("/account")
def account_page(request: Request, visitor: User, changed: bool = False) -> Response:
    return page(request, visitor, "account.html", title="Account", changed=changed)


@router.post("/account/password")
def change_password(
    request: Request,
    session: RequestSession,
    visitor: UserForm,
    current_password: str = Form(""),
    new_password: str = Form(""),
) -> Response:
    try:
        token = auth.change_password(
            session,
            visitor.user,
            current_password,
            new_password,
            address=client_address(request),
            now=request.app.state.clock(),
        )
    except auth.Refused as exc:
        session.rollback()  # a wrong current password was already committed as a failed try
        return page(request, visitor, "account.html", status=exc.status, title="Account", error=exc.message)
    return _logged_in(visitor, token, "/account?changed=1")


# -- plan ----------------------------------------------------------------------------------------


@router.get("/plan")
async def plan(request: Request, visitor: User) -> Response:
    catalog = await current_catalog(request)

    def render() -> Response:  # in the thread pool: the account's tier may be read from the database
        tier = visitor.user.tier
        models = offers(catalog, request.app.state.settings, tier)
        default = catalog.default_for(tier.name)
        return page(
            request,
            visitor,
            "plan.html",
            title="Plan",
            tier=tier,
            models=models,
            default_model=default.name if default is not None else "",
        )

    return await run_in_threadpool(render)
