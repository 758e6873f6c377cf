"""Sign-up email verification (``AIMICHAT_EMAIL_VERIFICATION``): the page that asks for it (with a resend
button), the page the emailed link opens, and the gates that keep an unverified account from making keys
or spending credits (added to those routers in ``site.install``). Rules: ``email_flows``; docs/email.md.
"""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Form, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from aimichat.api.errors import APIError
from aimichat.mail.links import VERIFY, LinkRefused, check
from aimichat.store.models import Account

from . import email_flows
from .deps import AnyForm, AnyVisitor, LoginRequired, RequestSession, UserForm, Visitor
from .render import WebRoute, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)

UNVERIFIED_API = (
    "Confirm your email address first: open the link we emailed you (the /verify page sends a new one). "
    "Until then this account cannot make API keys or use the playground."
)


class VerificationRequired(Exception):
    """A page that makes keys or spends credits, asked for by an account whose email is not confirmed yet."""


def verified_page(request: Request, visitor: AnyVisitor) -> None:
    """Router dependency of the key pages and the playground: their GETs lead to /verify, their forms get a 403
    page, their JSON calls (the playground's stream) a 403 in the API's error shape."""
    if email_flows.needs_verification(request.app.state.settings, visitor.account):
        if request.headers.get("content-type", "").startswith("application/json"):
            raise APIError(403, UNVERIFIED_API, code="email_not_verified")
        raise VerificationRequired()


def verified_api(request: Request, visitor: AnyVisitor) -> None:
    """Router dependency of the JSON account API: 403 ``email_not_verified`` in the API's error shape."""
    if email_flows.needs_verification(request.app.state.settings, visitor.account):
        raise APIError(403, UNVERIFIED_API, code="email_not_verified")


async def verification_required(request: Request, _: Exception) -> Response:
    """The answer to VerificationRequired (registered in ``site.install``)."""
    if request.method in ("GET", "HEAD"):
        return redirect("/verify")
    visitor: Visitor = request.state.visitor  # set by verified_page's visitor lookup
    return _page(request, visitor, status=403, blocked=True)


def _page(request: Request, visitor: Visitor, *, status: int = 200, **context: object) -> Response:
    state = request.app.state
    return page(
        request,
        visitor,
        "verify.html",
        status=status,
        title="Confirm your email",
        needed=email_flows.needs_verification(state.settings, visitor.account),
        mail_on=state.mailer.enabled,
        **context,
    )


@router.get("/verify")
def verify_page(request: Request, visitor: AnyVisitor, sent: bool = False, done: bool = False) -> Response:
    if visitor.account is None and not done:
        raise LoginRequired()
    return _page(request, visitor, sent=sent, done=done)


@router.post("/verify/resend")
def resend(request: Request, session: RequestSession, visitor: UserForm, background: BackgroundTasks) -> Response:
    state = request.app.state
    if not email_flows.needs_verification(state.settings, visitor.user):
        return redirect("/verify")
    try:
        letter = email_flows.verification_letter(
            session,
            visitor.user,
            base=email_flows.link_base(state.settings),
            now=state.clock(),
            mail_on=state.mailer.enabled,
        )
    except email_flows.Throttled as exc:
        session.rollback()
        response = _page(request, visitor, status=429, error=exc.message)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if letter is None:  # email is off: nothing was made or sent; the page says whom to ask
        return redirect("/verify")
    background.add_task(email_flows.deliver, state.mailer, letter)
    return redirect("/verify?sent=1")


def send_first(request: Request, session: Session, account: Account | None, background: BackgroundTasks) -> None:
    """After a sign-up made ``account`` (None: the email had one already): mail its first link, when
    verification is on. Called by the sign-up route; the mail leaves after the response, so a taken email's
    answer takes as long as a free one's."""
    state = request.app.state
    if account is None or not email_flows.needs_verification(state.settings, account):
        return
    letter = email_flows.verification_letter(
        session, account, base=email_flows.link_base(state.settings), now=state.clock(), mail_on=state.mailer.enabled
    )
    if letter is not None:
        background.add_task(email_flows.deliver, state.mailer, letter)


@router.get("/verify/email")
def confirm_page(request: Request, session: RequestSession, visitor: AnyVisitor, token: str = "") -> Response:
    """The page the emailed link opens. It does not confirm by itself (mail scanners open links): its button does."""
    try:
        check(session, token, VERIFY, request.app.state.clock())
    except LinkRefused as exc:
        return _confirm_page(request, visitor, refused=exc)
    return _confirm_page(request, visitor, token=token)


@router.post("/verify/email")
def confirm(request: Request, session: RequestSession, visitor: AnyForm, token: str = Form("")) -> Response:
    try:
        email_flows.verify(session, token, request.app.state.clock())
    except LinkRefused as exc:
        session.rollback()
        return _confirm_page(request, visitor, refused=exc)
    return redirect("/verify?done=1")


def _confirm_page(
    request: Request, visitor: Visitor, *, refused: LinkRefused | None = None, token: str = ""
) -> Response:
    status = 200 if refused is None else 400 if refused.reason == "unknown" else 410
    message = refused.message if refused else ""
    return page(
        request, visitor, "verify_email.html", status=status, title="Confirm your email", refused=message, token=token
    )
