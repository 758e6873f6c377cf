"""Sign-up, log-in, log-out, the account page (password change) and the plan (its credits, and the models it
includes with what each costs)."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Form, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from aimichat.accounts import service as accounts

from . import auth, devices, sessions, verify
from .deps import (
    AnyForm,
    AnyVisitor,
    RequestSession,
    User,
    UserForm,
    Visitor,
    clear_session_cookie,
    client_address,
    known_device_cookie,
    set_known_device_cookie,
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
    request: Request,
    session: RequestSession,
    visitor: AnyForm,
    background: BackgroundTasks,
    email: str = Form(""),
    password: str = Form(""),
) -> Response:
    """Sign up, then log in. The answer is the same whether the email was free (the account is made) or
    already had an account (nothing is done): a redirect to the log-in page, which says what to do either
    way. Telling "that email is taken" would tell anybody which emails have accounts (docs/web.md)."""
    state = request.app.state
    try:
        account = auth.sign_up(
            session,
            email,
            password,
            tier=state.settings.default_tier,
            now=state.clock(),
            address=client_address(request),
        )
    except auth.Refused as exc:
        session.rollback()  # nothing of a refused sign-up is kept
        field = field_at_fault(email, password) if exc.status == 400 else None
        response = page(
            request,
            visitor,
            "signup.html",
            status=exc.status,
            title="Sign up",
            error=exc.message,
            error_field=field,
            email=email,
        )
        if exc.retry_after:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    verify.send_first(request, session, account, background)  # the confirmation link, when verification is on
    return redirect("/login?signed_up=1")


def field_at_fault(email: str, password: str) -> str | None:
    """The sign-up field a refusal concerns, so the page says it next to that field: "email" or "password"
    (the accounts' rules, checked in the order sign-up checks them), None when both pass."""
    try:
        accounts.normalize_email(email)
    except accounts.AccountError:
        return "email"
    try:
        accounts.check_password_strength(password)
    except accounts.AccountError:
        return "password"
    return None


@router.get("/login")
def login_page(
    request: Request, visitor: AnyVisitor, next: str = "", signed_up: bool = False, reason: str = ""
) -> Response:
    if visitor.account:
        return redirect(safe_next(next))
    target = safe_next(next, "")
    notice = auth.login_notice(target, reason)
    return page(request, visitor, "login.html", title="Log in", next=target, signed_up=signed_up, notice=notice)


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
    known = known_device_cookie(request, visitor)
    try:
        account, token = auth.log_in(
            session,
            email,
            password,
            address=client_address(request),
            now=state.clock(),
            old_token=visitor.session_token,
            known=known,
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
    done = _logged_in(visitor, token, safe_next(next))
    set_known_device_cookie(done, visitor, devices.remember(account, known))
    return done


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
    known = known_device_cookie(request, visitor)
    try:
        token = auth.change_password(
            session,
            visitor.user,
            current_password,
            new_password,
            address=client_address(request),
            now=request.app.state.clock(),
            known=known,
            session_token=visitor.session_token,
        )
    except auth.Refused as exc:
        session.rollback()  # a wrong current password was already committed as a failed try
        response = page(request, visitor, "account.html", status=exc.status, title="Account", error=exc.message)
        if exc.retry_after:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    done = _logged_in(visitor, token, "/account?changed=1")
    # The new password's hash signs this browser's known-device entry anew; every other browser's is void.
    set_known_device_cookie(done, visitor, devices.remember(visitor.user, known))
    return done


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
