"""The audit log: one row per change to accounts, tiers, prices, models and keys, written in the same
transaction as the change (so a change rolled back leaves no row, and a change kept always has one).

Who did it is an *actor* string: ``account:7`` (a person on the web pages or the account API),
``admin_key:2`` (the admin API), ``cli`` (the ``aimichat`` command), ``system`` (start-up's default tier),
``report`` (a leaked-key report). The services record their own changes with :func:`note`, which reads the
actor from the session (:func:`act_as`, set by the CLI and the admin API) or, for the web pages, from the
request being served (:data:`request_actor`); so every way in is audited without each caller saying so.

A detail is a small JSON object. It never holds a secret: :func:`record` refuses field names that would.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aimichat.store.clock import iso_utc, utcnow
from aimichat.store.models import AuditEvent

CLI = "cli"
SYSTEM = "system"
REPORT = "report"
MAX_PER_PAGE = 200
_ACTOR = "aimichat.audit.actor"  # the key in Session.info
# Field names a detail must never carry: a slip that put a secret there would keep it for good.
_SECRET_FIELDS = frozenset({"key", "secret", "password", "token", "key_hash", "password_hash", "previous_hash"})

# The web pages find their visitor only after the request's session is open, so the actor of a web
# request is looked up when a change is recorded: ``web.admin_audit``'s middleware sets, per request,
# a function that answers it from the request. A ContextVar, not a global: each request (and the
# thread-pool calls made for it, which copy the context) sees its own.
request_actor: ContextVar[Callable[[], str | None] | None] = ContextVar("aimichat_request_actor", default=None)


def account_actor(account_id: int) -> str:
    return f"account:{account_id}"


def admin_key_actor(key_id: int) -> str:
    return f"admin_key:{key_id}"


def act_as(session: Session, actor: str) -> None:
    """Record the changes made through ``session`` as ``actor``'s."""
    session.info[_ACTOR] = actor


def actor_of(session: Session, default: str = SYSTEM) -> str:
    """Who is changing things through ``session``: set by :func:`act_as`, else the web request's visitor."""
    actor = session.info.get(_ACTOR)
    if isinstance(actor, str):
        return actor
    resolve = request_actor.get()
    return (resolve() if resolve else None) or default


def record(session: Session, actor: str, action: str, target: str, detail: dict[str, Any] | None = None) -> AuditEvent:
    """Add one audit row to ``session``'s transaction (the caller commits it with the change)."""
    detail = dict(detail or {})
    secret = sorted(_SECRET_FIELDS & set(detail))
    if secret:
        raise ValueError(f"an audit detail must not carry {secret[0]!r}")
    event = AuditEvent(created_at=utcnow(), actor=actor[:64], action=action[:64], target=target[:200], detail=detail)
    session.add(event)
    return event


def note(
    session: Session, action: str, target: str, detail: dict[str, Any] | None = None, *, default: str = SYSTEM
) -> AuditEvent:
    """What the services call: :func:`record` as the session's actor (``default`` when none is known)."""
    return record(session, actor_of(session, default), action, target, detail)


def key_reported_leaked(session: Session, key_id: int, reported_from: str | None = None) -> AuditEvent:
    """A key revoked because it was reported leaked (``POST /v1/keys/report``); ``reported_from`` is where
    it was found (a URL), when the report says. The revocation itself is audited by ``keys.revoke_key``."""
    detail = {"reported_from": reported_from[:500]} if reported_from else {}
    return record(session, REPORT, "key.reported_leaked", f"key:{key_id}", detail)


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPage:
    """One page of audit rows, newest first."""

    events: list[AuditEvent]
    page: int
    per_page: int
    total: int

    @property
    def has_more(self) -> bool:
        return self.page * self.per_page < self.total


def list_events(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    page: int = 1,
    per_page: int = 50,
) -> AuditPage:
    """The rows matching every filter given (each an exact value), newest first; ValueError for a page or
    page size out of range."""
    if page < 1:
        raise ValueError("page starts at 1")
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise ValueError(f"per_page must be between 1 and {MAX_PER_PAGE}")
    conditions = [
        column == value
        for column, value in ((AuditEvent.actor, actor), (AuditEvent.action, action), (AuditEvent.target, target))
        if value
    ]
    total = session.scalar(select(func.count(AuditEvent.id)).where(*conditions)) or 0
    rows = session.scalars(
        select(AuditEvent)
        .where(*conditions)
        .order_by(AuditEvent.id.desc())
        .limit(per_page)
        .offset((page - 1) * per_page)
    )
    return AuditPage(list(rows), page, per_page, int(total))


def event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "object": "audit_event",
        "id": event.id,
        "created": iso_utc(event.created_at),
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "detail": event.detail,
    }
