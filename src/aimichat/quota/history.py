"""An account's ledger rows a page at a time, newest first (the usage page's "Recent requests").

Keyset paging on (created_at, id): a page is "the rows older than row X" or "the rows newer than row X", so
requests arriving while somebody reads never shift a page or show a row twice, and a deep page costs what
the first one does. The window (``since``) keeps the scan on the (account_id, day) index.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, TypeAlias

from sqlalchemy import ColumnElement, Row, Select, and_, exists, or_, select
from sqlalchemy.orm import Session

from aimichat.store.models import ApiKey, UsageEvent

from .ledger import LEGACY_MODEL

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

# Which requests: every one (None), one key's (its id) or the playground's (made without a key).
KeyFilter = int | Literal["playground"] | None
# A ledger row with its key's name, prefix and revoked_at (None for the playground: an outer join).
_Query: TypeAlias = "Select[UsageEvent, str, str, dt.datetime | None]"


class UnknownCursor(LookupError):
    """The row a page is anchored on is not one of the account's ledger rows."""


@dataclass(frozen=True)
class RequestRow:
    """One ledger row as the page lists it; ``key_id`` is None for the playground."""

    id: int
    created_at: dt.datetime
    key_id: int | None
    key_name: str | None
    key_prefix: str | None
    key_revoked: bool
    model: str
    status: str  # reserved | charged | released
    prompt_tokens: int
    completion_tokens: int
    credits: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestPage:
    """Rows newest first; ``older``/``newer`` are the cursors of the neighbouring pages (None: no such page)."""

    rows: list[RequestRow]
    older: int | None  # pass as ``before``
    newer: int | None  # pass as ``after``


def request_page(
    session: Session,
    account_id: int,
    since: dt.date,
    *,
    key: KeyFilter = None,
    before: int | None = None,
    after: int | None = None,
    size: int = PAGE_SIZE,
) -> RequestPage:
    """The account's requests made on ``since`` or later (UTC days), ``size`` a page: the newest ones, or
    those just older than row ``before``, or just newer than row ``after`` (at most one of the two).
    Raises UnknownCursor when the row named is not the account's."""
    if before is not None and after is not None:
        raise ValueError("before and after exclude each other")
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"size must be between 1 and {MAX_PAGE_SIZE}")
    base = _rows(account_id, since, key)
    if after is not None:
        page = _newer_page(session, base, _cursor(session, account_id, after), size)
        # Less than a page is newer than the cursor: the newest page itself, full, rather than a short one.
        return page or _older_page(session, base, None, size)
    return _older_page(session, base, _cursor(session, account_id, before) if before is not None else None, size)


def _older_page(session: Session, base: _Query, anchor: tuple[dt.datetime, int] | None, size: int) -> RequestPage:
    """The ``size`` rows just older than ``anchor`` (None: the newest rows), newest first."""
    query = base.order_by(UsageEvent.created_at.desc(), UsageEvent.id.desc()).limit(size + 1)
    if anchor is not None:
        query = query.where(_before(*anchor))
    found = [_row(r) for r in session.execute(query)]
    rows = found[:size]
    older = rows[-1].id if len(found) > size else None
    if anchor is None:
        return RequestPage(rows, older, None)
    # An empty page (nothing older than the cursor in this filter) still leads back to the newer rows.
    at, row_id = (rows[0].created_at, rows[0].id) if rows else anchor
    return RequestPage(rows, older, _if_any(session, base, _after(at, row_id), row_id))


def _newer_page(session: Session, base: _Query, anchor: tuple[dt.datetime, int], size: int) -> RequestPage | None:
    """The ``size`` rows just newer than ``anchor``, newest first; None when no more than that is newer."""
    query = base.where(_after(*anchor)).order_by(UsageEvent.created_at.asc(), UsageEvent.id.asc()).limit(size + 1)
    found = list(session.execute(query))
    if len(found) <= size:
        return None
    rows = [_row(r) for r in reversed(found[:size])]
    oldest = rows[-1]
    return RequestPage(rows, _if_any(session, base, _before(oldest.created_at, oldest.id), oldest.id), rows[0].id)


def _rows(account_id: int, since: dt.date, key: KeyFilter) -> _Query:
    query = (
        select(UsageEvent, ApiKey.name, ApiKey.prefix, ApiKey.revoked_at)
        .join(ApiKey, ApiKey.id == UsageEvent.api_key_id, isouter=True)
        .where(UsageEvent.account_id == account_id, UsageEvent.day >= since)
    )
    if key == "playground":
        return query.where(UsageEvent.api_key_id.is_(None))
    if key is not None:
        return query.where(UsageEvent.api_key_id == key)
    return query


def _cursor(session: Session, account_id: int, row_id: int) -> tuple[dt.datetime, int]:
    found = session.execute(
        select(UsageEvent.created_at, UsageEvent.id).where(UsageEvent.id == row_id, UsageEvent.account_id == account_id)
    ).one_or_none()
    if found is None:
        raise UnknownCursor(f"no request {row_id} in this account")
    return found[0], found[1]


def _before(at: dt.datetime, row_id: int) -> ColumnElement[bool]:
    return or_(UsageEvent.created_at < at, and_(UsageEvent.created_at == at, UsageEvent.id < row_id))


def _after(at: dt.datetime, row_id: int) -> ColumnElement[bool]:
    return or_(UsageEvent.created_at > at, and_(UsageEvent.created_at == at, UsageEvent.id > row_id))


def _if_any(session: Session, base: _Query, where: ColumnElement[bool], cursor: int) -> int | None:
    """``cursor`` when some row of ``base`` meets ``where`` (so the page it leads to has rows), else None."""
    return cursor if session.scalar(select(exists(base.where(where).subquery()))) else None


def _row(found: Row[UsageEvent, str, str, dt.datetime | None]) -> RequestRow:
    event, name, prefix, revoked_at = found
    return RequestRow(
        id=event.id,
        created_at=event.created_at,
        key_id=event.api_key_id,
        key_name=name,
        key_prefix=prefix,
        key_revoked=revoked_at is not None,
        model=event.model or LEGACY_MODEL,
        status=event.status,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        credits=event.credits,
    )
