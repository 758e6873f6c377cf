"""The API keys pages: generate (with optional limits), list (revoked keys of long ago behind "Show revoked
keys"), a page per key (its limits and where it stands), rename, edit limits, revoke and regenerate (with a
grace period), as plain HTML forms.

A new key follows post/redirect/get: the POST hands the secret off to the browser session
(``key_handoff``) and redirects to ``/keys?shown=<token>``, the one page that shows it. Reloading that
page, or going back to the form, shows the list again and makes nothing.

A key form posted after the session lapsed is not lost: the log-in page carries it (``key_input.draft_target``)
and after the log-in these pages show it filled in (``?draft=1&...&at=...&sig=...``), to be sent again with a
fresh CSRF token. Nothing is made or changed until then. A draft is made only from this site's own forms and
shown only in the browser that signed it, for 30 minutes (``key_input.genuine_draft``); its notice, not the
form's button, has focus, so no single key press sends values the person has not looked at.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from aimichat.keys import service as keys
from aimichat.quota import ledger
from aimichat.store.models import ApiKey

from . import key_actions, key_handoff, key_input
from .deps import PRE_COOKIE, PostedForm, RequestSession, User, UserForm, Visitor, WebError, cookie_name
from .key_input import GRACE_CHOICES, LimitsForm
from .render import WebRoute, base_url, page, redirect, time_ago
from .usage_pages import credits_spent

router = APIRouter(route_class=WebRoute, include_in_schema=False)
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _sentence(exc: Exception) -> str:
    """The service's message as a sentence for the page."""
    text = str(exc.args[0] if exc.args else exc)
    return f"{text[:1].upper()}{text[1:]}."


def _offered(request: Request, visitor: Visitor) -> list[str]:
    """The models this account's plan may use: the choices of a key's model scope."""
    return [spec.name for spec in request.app.state.models.catalog.visible(visitor.user.tier.name)]


def _draft(request: Request, visitor: Visitor, draft: str, page: str) -> tuple[str, LimitsForm] | None:
    """The key form as typed before a log-in (``?draft=1&name=...&at=...&sig=...``) when this browser signed
    it for ``page`` not long ago; None without one, and for a draft crafted, edited, old or from elsewhere
    (the plain page is shown then: see ``key_input.genuine_draft``)."""
    if draft != "1":
        return None
    key = request.cookies.get(cookie_name(PRE_COOKIE, visitor.secure))  # the pre-log-in CSRF secret
    now = request.app.state.clock()
    typed = key_input.genuine_draft(page, request.query_params.multi_items(), key, now)
    if typed is None:
        return None
    name = typed.get("name", "")
    return name if isinstance(name, str) else "", LimitsForm.from_form(typed)


def _keys_page(
    request: Request,
    session: Session,
    visitor: Visitor,
    *,
    status: int = 200,
    values: LimitsForm | None = None,
    show_revoked: bool = False,
    **context: Any,
) -> Response:
    now = request.app.state.clock()
    listing = key_actions.key_list(keys.list_keys(session, visitor.user.id), now, show_revoked=show_revoked)
    return page(
        request,
        visitor,
        "keys.html",
        status=status,
        title="API keys",
        keys=listing.keys,
        old_revoked=listing.old_revoked,
        show_revoked=show_revoked,
        recent_days=key_actions.RECENTLY_REVOKED.days,
        since=lambda moment: time_ago(moment, now, coarse=True),
        base=base_url(request),
        status_of=keys.key_status,
        summary_of=key_input.summary,
        grace_choices=GRACE_CHOICES,
        values=values or LimitsForm(),
        offered=_offered(request, visitor),
        tier=visitor.user.tier,
        spent=_spent(request, session, visitor),
        **context,
    )


def _spent(request: Request, session: Session, visitor: Visitor) -> str:
    now = request.app.state.clock()
    spent = credits_spent(ledger.summary(session, keys.principal_for(visitor.user), now), now)
    return spent.message if spent else ""


@router.get("/keys")
def keys_list(
    request: Request,
    session: RequestSession,
    visitor: User,
    revoked: int | None = None,
    shown: str | None = None,
    show: str = "",
    draft: str = "",
) -> Response:
    # The one response that carries a key in full: the page the POST that made it redirected to, once.
    handoff = key_handoff.take(session, visitor, shown, request.app.state.clock()) if shown else None
    shown_key = session.get(ApiKey, handoff.key_id) if handoff else None
    if shown_key is not None and shown_key.account_id != visitor.user.id:
        handoff = shown_key = None
    gone = bool(shown) and handoff is None  # a reload of that page: the key is not shown twice
    typed = _draft(request, visitor, draft, "/keys")
    return _keys_page(
        request,
        session,
        visitor,
        revoked_id=revoked,
        handoff=handoff,
        shown_key=shown_key,
        gone=gone,
        show_revoked=show == "revoked",
        draft=typed is not None,
        name=typed[0] if typed else "",
        values=typed[1] if typed else None,
    )


@router.post("/keys")
def keys_generate(
    request: Request, session: RequestSession, visitor: UserForm, form: PostedForm, name: str = Form("")
) -> Response:
    values = LimitsForm.from_form(form)
    now = request.app.state.clock()
    try:
        clean = key_input.key_name(name)
        limits = values.limits(now, _offered(request, visitor))
        created = keys.create_key(session, visitor.user, clean, limits)
    except ValueError as exc:  # a bad name or limit, refused before anything is written
        return _keys_page(
            request,
            session,
            visitor,
            status=400,
            error=_sentence(exc),
            error_field=key_input.field_of(exc),
            name=name,
            values=values,
        )
    token = key_handoff.put(session, visitor, created, now, kind="created")
    return redirect(f"/keys?shown={token}")


# -- one key -------------------------------------------------------------------------------------


def _key_page(
    request: Request,
    session: Session,
    visitor: Visitor,
    key: ApiKey,
    *,
    status: int = 200,
    values: LimitsForm | None = None,
    **context: Any,
) -> Response:
    now = request.app.state.clock()
    offered = _offered(request, visitor)
    session.commit()  # nothing is pending here; see key_actions.standing for why the transaction ends now
    return page(
        request,
        visitor,
        "key.html",
        status=status,
        title=f"Key “{key.name}”",
        key=key,
        status_of=keys.key_status,
        figures=key_actions.standing(session, request.app.state.quota, key, now),
        grace_until=key_actions.grace_until(key, now),
        expired=key.expires_at is not None and key.expires_at <= now,
        values=values or LimitsForm.of(keys.key_limits(key)),
        offered=offered + sorted(set(key.models or ()) - set(offered)),  # a scope's model no longer offered stays
        grace_choices=GRACE_CHOICES,
        tier=visitor.user.tier,
        **context,
    )


@router.get("/keys/{key_id}")
def key_detail(
    request: Request,
    session: RequestSession,
    key_id: KeyId,
    visitor: User,
    saved: int = 0,
    renamed: int = 0,
    draft: str = "",
) -> Response:
    key = _own_key(session, key_id, visitor)
    typed = _draft(request, visitor, draft, f"/keys/{key_id}")
    if typed is None:
        return _key_page(request, session, visitor, key, saved=bool(saved), renamed=bool(renamed))
    name, values = typed
    # The rename form's draft is a name alone; the limits form's has limits (an emptied form keeps no draft).
    # Its notice, above that form, has focus: the person reads it and the values before anything is sent.
    if values.any:
        return _key_page(request, session, visitor, key, draft="limits", values=values)
    return _key_page(request, session, visitor, key, draft="rename", rename_value=name or None)


@router.post("/keys/{key_id}/rename")
def key_rename(
    request: Request, session: RequestSession, key_id: KeyId, visitor: UserForm, name: str = Form("")
) -> Response:
    """A new name for the key; nothing else about it changes (``key_actions.rename``)."""
    key = _own_key(session, key_id, visitor)
    if key.revoked_at is not None:
        raise WebError(409, "Revoked keys stay revoked", "This key is revoked and stays as it was revoked.")
    try:
        changed = key_actions.rename(session, key, name)
    except ValueError as exc:  # refused before anything is stored
        return _key_page(request, session, visitor, key, status=400, rename_error=_sentence(exc), rename_value=name)
    return redirect(f"/keys/{key_id}?renamed=1" if changed else f"/keys/{key_id}")


@router.post("/keys/{key_id}/limits")
def key_set_limits(
    request: Request, session: RequestSession, key_id: KeyId, visitor: UserForm, form: PostedForm
) -> Response:
    """Replace the key's limits with the form's (an empty field: no such limit)."""
    key = _own_key(session, key_id, visitor)
    values = LimitsForm.from_form(form)
    try:
        if key.revoked_at is not None:
            raise ValueError("this key is revoked: its limits no longer apply")
        limits = values.limits(request.app.state.clock(), _offered(request, visitor), keys.key_limits(key))
        keys.set_limits(session, key_id, visitor.user.id, **{f: getattr(limits, f) for f in key_input.LIMIT_FIELDS})
    except ValueError as exc:  # refused before anything is stored
        field = key_input.field_of(exc)
        return _key_page(
            request, session, visitor, key, status=400, error=_sentence(exc), error_field=field, values=values
        )
    return redirect(f"/keys/{key_id}?saved=1")


@router.post("/keys/{key_id}/revoke")
def keys_revoke(
    request: Request, session: RequestSession, key_id: KeyId, visitor: UserForm, confirm: str = Form("")
) -> Response:
    key = _own_key(session, key_id, visitor)
    if confirm != "yes":  # without JavaScript, the confirmation is a page of its own
        return page(request, visitor, "confirm.html", title="Revoke key", key=key, action="revoke")
    keys.revoke_key(session, key_id, visitor.user.id)
    return redirect(f"/keys?revoked={key_id}")


@router.post("/keys/{key_id}/regenerate")
def keys_regenerate(
    request: Request,
    session: RequestSession,
    key_id: KeyId,
    visitor: UserForm,
    confirm: str = Form(""),
    grace: str = Form(""),
) -> Response:
    key = _own_key(session, key_id, visitor)
    try:
        key_actions.check_regenerable(key)
    except ValueError as exc:  # refused before asking: there is nothing to confirm
        raise WebError(409, "Revoked keys stay revoked", _sentence(exc)) from None
    try:
        span = key_input.grace_choice(grace)
    except ValueError as exc:
        raise WebError(400, "Unknown grace period", _sentence(exc)) from None
    if confirm != "yes":
        return page(
            request,
            visitor,
            "confirm.html",
            title="Regenerate key",
            key=key,
            action="regenerate",
            grace=grace,
            grace_choices=GRACE_CHOICES,
        )
    now = request.app.state.clock()
    try:
        done = key_actions.regenerate(session, key_id, visitor.user.id, span, now)
    except ValueError as exc:  # a revoked key's replacement would pass the plan's number of keys
        raise WebError(400, "No new key made", _sentence(exc)) from None
    token = key_handoff.put(
        session,
        visitor,
        done.created,
        now,
        kind=done.kind,
        old_prefix=done.old_prefix,
        old_valid_until=done.old_valid_until,
    )
    return redirect(f"/keys?shown={token}")


def _own_key(session: Session, key_id: int, visitor: Visitor) -> ApiKey:
    try:
        return keys.get_key(session, key_id, visitor.user.id)
    except keys.UnknownKey:
        # Another account's key looks exactly like a missing one: ids reveal nothing.
        raise WebError(404, "Key not found", "There is no key with that id in your account.") from None
