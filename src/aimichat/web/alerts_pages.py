"""Usage alerts and webhooks for the account holder: the thresholds form (shown on the usage page) and the
webhooks page (endpoints, their secret shown once, a test event, the last deliveries with their status)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from aimichat.alerts import service as alerts

from .deps import RequestSession, User, UserForm, Visitor, WebError
from .render import WebRoute, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)
EndpointId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.post("/usage/alerts")
def save_thresholds(
    request: Request,
    session: RequestSession,
    visitor: UserForm,
    percents: str = Form(""),
    email: str | None = Form(None),
) -> Response:
    try:
        alerts.set_alert_config(
            session,
            visitor.user.id,
            request.app.state.clock(),
            percents=alerts.parse_percents(percents),
            email=email is not None,
        )
    except ValueError as exc:
        raise WebError(400, "Alerts not saved", f"{_sentence(exc)} Go back and enter, say, 80, 100.") from None
    request.app.state.alerts.forget(visitor.user.id)
    return redirect("/usage?alerts=saved#alerts-title")


def _webhooks_page(
    request: Request, session: Session, visitor: Visitor, *, status: int = 200, **context: Any
) -> Response:
    account_id = visitor.user.id
    mailer = getattr(request.app.state, "mailer", None)
    return page(
        request,
        visitor,
        "webhooks.html",
        status=status,
        title="Alerts and webhooks",
        config=alerts.alert_config(session, account_id),
        endpoints=alerts.list_endpoints(session, account_id),
        deliveries=alerts.recent_deliveries(session, account_id),
        endpoint_urls={e.id: e.url for e in alerts.list_endpoints(session, account_id)},
        email_on=bool(mailer is not None and mailer.enabled),
        **context,
    )


@router.get("/webhooks")
def webhooks(request: Request, session: RequestSession, visitor: User, tested: int | None = None) -> Response:
    return _webhooks_page(request, session, visitor, tested=tested)


@router.post("/webhooks")
def add_webhook(request: Request, session: RequestSession, visitor: UserForm, url: str = Form("")) -> Response:
    state = request.app.state
    try:
        created = alerts.add_endpoint(
            session, visitor.user.id, url, state.clock(), allow_private=state.settings.webhook_allow_private
        )
    except ValueError as exc:
        return _webhooks_page(request, session, visitor, status=400, error=_sentence(exc), url=url)
    # The one answer that carries the secret; a reload of it would add another endpoint, not show this one.
    return _webhooks_page(request, session, visitor, created=created)


@router.post("/webhooks/{endpoint_id}/test")
def test_webhook(request: Request, session: RequestSession, visitor: UserForm, endpoint_id: EndpointId) -> Response:
    if endpoint_id not in {e.id for e in alerts.list_endpoints(session, visitor.user.id)}:
        raise WebError(404, "No such webhook", "This account has no webhook endpoint with that id.")
    now = request.app.state.clock()
    # Each test event may hold one of the replica's few senders for a whole deadline: a few a minute.
    wait = alerts.test_retry_after(session, visitor.user.id, now)
    if wait is not None:
        error = f"Too many test events: send another in {wait} s."
        return _webhooks_page(request, session, visitor, status=429, error=error)
    alerts.queue_event(session, visitor.user.id, alerts.test_event(now), now, email=False, endpoint_id=endpoint_id)
    session.commit()  # before the worker looks for it
    request.app.state.alerts.wake()
    return redirect(f"/webhooks?tested={endpoint_id}")


@router.post("/webhooks/{endpoint_id}/delete")
def delete_webhook(request: Request, session: RequestSession, visitor: UserForm, endpoint_id: EndpointId) -> Response:
    try:
        alerts.remove_endpoint(session, visitor.user.id, endpoint_id)
    except LookupError:
        raise WebError(404, "No such webhook", "This account has no webhook endpoint with that id.") from None
    return redirect("/webhooks")


def _sentence(exc: Exception) -> str:
    text = str(exc.args[0] if exc.args else exc)
    return f"{text[:1].upper()}{text[1:]}."
