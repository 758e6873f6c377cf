"""The API keys page: generate (shown once), list, revoke and regenerate, as plain HTML forms."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Path, Request

from aimichat.keys import service as keys
from aimichat.keys.service import CreatedKey

from .deps import Visitor, WebError, require_user, user_form
from .render import WebRoute, base_url, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)
KeyId = Path(ge=1, le=2**31 - 1)


def _list(request: Request, visitor: Visitor) -> list:
    with request.app.state.db.session() as db:
        return keys.list_keys(db, visitor.account.id)


def _keys_page(request: Request, visitor: Visitor, *, status: int = 200, created: CreatedKey | None = None, **context):
    # The one response that carries a key in full is the one returned right after it is made.
    return page(request, visitor, "keys.html", status=status, title="API keys", keys=_list(request, visitor),
                created=created, base=base_url(request), status_of=keys.key_status, **context)


@router.get("/keys")
def keys_list(request: Request, visitor: Visitor = Depends(require_user), revoked: int | None = None):
    return _keys_page(request, visitor, revoked_id=revoked)


@router.post("/keys")
def keys_generate(request: Request, visitor: Visitor = Depends(user_form), name: str = Form("")):
    with request.app.state.db.session() as db:
        try:
            created = keys.create_key(db, visitor.account, name)
        except ValueError as exc:
            return _keys_page(request, visitor, status=400, error=f"{str(exc)[:1].upper()}{str(exc)[1:]}.", name=name)
        db.commit()
    return _keys_page(request, visitor, status=201, created=created)


@router.post("/keys/{key_id}/revoke")
def keys_revoke(request: Request, key_id: int = KeyId, visitor: Visitor = Depends(user_form), confirm: str = Form("")):
    with request.app.state.db.session() as db:
        key = _own_key(db, key_id, visitor)
        if confirm != "yes":  # without JavaScript, the confirmation is a page of its own
            return page(request, visitor, "confirm.html", title="Revoke key", key=key, action="revoke")
        keys.revoke_key(db, key_id, visitor.account.id)
        db.commit()
    return redirect(f"/keys?revoked={key_id}")


@router.post("/keys/{key_id}/regenerate")
def keys_regenerate(request: Request, key_id: int = KeyId, visitor: Visitor = Depends(user_form), confirm: str = Form("")):
    with request.app.state.db.session() as db:
        key = _own_key(db, key_id, visitor)
        if confirm != "yes":
            return page(request, visitor, "confirm.html", title="Regenerate key", key=key, action="regenerate")
        created = keys.regenerate_key(db, key_id, visitor.account.id)
        db.commit()
    return _keys_page(request, visitor, status=201, created=created, regenerated=key)


def _own_key(db, key_id: int, visitor: Visitor):
    try:
        return keys.get_key(db, key_id, visitor.account.id)
    except keys.UnknownKey:
        # Another account's key looks exactly like a missing one: ids reveal nothing.
        raise WebError(404, "Key not found", "There is no key with that id in your account.") from None
