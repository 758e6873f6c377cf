"""The API keys page: generate (shown once), list, revoke and regenerate, as plain HTML forms."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from aimichat.keys import service as keys
from aimichat.keys.service import CreatedKey
from aimichat.store.models import ApiKey

from .deps import RequestSession, User, UserForm, Visitor, WebError
from .render import WebRoute, base_url, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _keys_page(
    request: Request,
    session: Session,
    visitor: Visitor,
    *,
    status: int = 200,
    created: CreatedKey | None = None,
    **context: Any,
) -> Response:
    # The one response that carries a key in full is the one returned right after it is made.
    return page(
        request,
        visitor,
        "keys.html",
        status=status,
        title="API keys",
        keys=keys.list_keys(session, visitor.user.id),
        created=created,
        base=base_url(request),
        status_of=keys.key_status,
        **context,
    )


@router.get("/keys")
def keys_list(request: Request, session: RequestSession, visitor: User, revoked: int | None = None) -> Response:
    return _keys_page(request, session, visitor, revoked_id=revoked)


@router.post("/keys")
def keys_generate(request: Request, session: RequestSession, visitor: UserForm, name: str = Form("")) -> Response:
    try:
        created = keys.create_key(session, visitor.user, name)
    except ValueError as exc:  # a bad name, refused before anything is written
        error = f"{str(exc)[:1].upper()}{str(exc)[1:]}."
        return _keys_page(request, session, visitor, status=400, error=error, name=name)
    return _keys_page(request, session, visitor, status=201, created=created)


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
    request: Request, session: RequestSession, key_id: KeyId, visitor: UserForm, confirm: str = Form("")
) -> Response:
    key = _own_key(session, key_id, visitor)
    if confirm != "yes":
        return page(request, visitor, "confirm.html", title="Regenerate key", key=key, action="regenerate")
    created = keys.regenerate_key(session, key_id, visitor.user.id)
    return _keys_page(request, session, visitor, status=201, created=created, regenerated=key)


def _own_key(session: Session, key_id: int, visitor: Visitor) -> ApiKey:
    try:
        return keys.get_key(session, key_id, visitor.user.id)
    except keys.UnknownKey:
        # Another account's key looks exactly like a missing one: ids reveal nothing.
        raise WebError(404, "Key not found", "There is no key with that id in your account.") from None
