"""Password reset by emailed link: the forgot-password form, and the page the link opens (docs/email.md).

The rules are in ``email_flows``; these routes only read forms and render pages. The mail leaves in a
background task after the response, so neither the answer nor its timing depends on whether one left.
"""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Form, Request
from starlette.responses import Response

from aimichat.accounts import service as accounts
from aimichat.mail.links import LinkRefused

from . import email_flows
from .deps import AnyForm, AnyVisitor, RequestSession, Visitor, clear_session_cookie, client_address
from .render import WebRoute, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)


def _forgot_page(request: Request, visitor: Visitor, *, status: int = 200, **context: object) -> Response:
    mail_on = request.app.state.mailer.enabled
    return page(request, visitor, "forgot.html", status=status, title="Reset your password", mail_on=mail_on, **context)


@router.get("/password/forgot")
def forgot_page(request: Request, visitor: AnyVisitor, sent: bool = False) -> Response:
    return _forgot_page(request, visitor, sent=sent)


@router.post("/password/forgot")
def forgot(
    request: Request,
    session: RequestSession,
    visitor: AnyForm,
    background: BackgroundTasks,
    email: str = Form(""),
) -> Response:
    """Always the same answer for a well-formed address: a redirect to "if an account exists, we sent a link"."""
    state = request.app.state
    try:
        accounts.normalize_email(email)  # a typo is said at once; it tells nothing about accounts
        letter = email_flows.reset_letter(
            session,
            email,
            address=client_address(request),
            base=email_flows.link_base(state.settings),
            now=state.clock(),
            mail_on=state.mailer.enabled,
        )
    except accounts.AccountError:
        return _forgot_page(request, visitor, status=400, error="That is not an email address.", email=email)
    except email_flows.Throttled as exc:
        session.rollback()
        response = _forgot_page(request, visitor, status=429, error=exc.message, email=email)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if letter is not None:
        background.add_task(email_flows.deliver, state.mailer, letter)
    return redirect("/password/forgot?sent=1")


def _reset_page(request: Request, visitor: Visitor, *, status: int = 200, **context: object) -> Response:
    return page(request, visitor, "reset.html", status=status, title="Choose a new password", **context)


def _refused(request: Request, visitor: Visitor, exc: LinkRefused) -> Response:
    # 410 for a link that worked once (spent or expired), 400 for one that never did.
    return _reset_page(request, visitor, status=400 if exc.reason == "unknown" else 410, refused=exc.message)


@router.get("/password/reset")
def reset_page(
    request: Request, session: RequestSession, visitor: AnyVisitor, token: str = "", done: bool = False
) -> Response:
    """The page the emailed link opens: a form for the new password. Opening it does not spend the link
    (mail scanners open links); posting the form does."""
    if done:
        return page(request, visitor, "reset.html", title="Password changed", done=True)
    try:
        account = email_flows.reset_account(session, token, request.app.state.clock())
    except LinkRefused as exc:
        return _refused(request, visitor, exc)
    return _reset_page(request, visitor, token=token, email=account.email)


@router.post("/password/reset")
def reset(
    request: Request, session: RequestSession, visitor: AnyForm, token: str = Form(""), password: str = Form("")
) -> Response:
    now = request.app.state.clock()
    try:
        account = email_flows.reset_password(session, token, password, now)
    except LinkRefused as exc:
        session.rollback()
        return _refused(request, visitor, exc)
    except accounts.AccountError as exc:  # a weak password: the form again, the link not spent
        session.rollback()
        try:
            shown = email_flows.reset_account(session, token, now)
        except LinkRefused as refused:  # and a bad link as well: that is what to fix first
            return _refused(request, visitor, refused)
        error = f"{str(exc).capitalize()}."
        return _reset_page(request, visitor, status=400, error=error, token=token, email=shown.email)
    response = redirect("/password/reset?done=1")
    if visitor.account is not None and visitor.account.id == account.id:
        clear_session_cookie(response, visitor)  # its session is gone with the others
    return response
