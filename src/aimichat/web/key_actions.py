"""What the key pages and the account API do to a key beyond the service's single calls: regenerate on the
app's clock, rename, which keys the list shows, and where a key stands against its caps and its account's
(what ``GET /v1/key`` reports)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session

from aimichat.audit import service as audit
from aimichat.keys import service as keys
from aimichat.keys.json import grace_until as grace_until  # the key pages read it here
from aimichat.keys.service import CreatedKey, Principal
from aimichat.quota import ledger, periods
from aimichat.quota.backends import QuotaBackend
from aimichat.store.models import ApiKey

from .key_handoff import Kind
from .key_input import key_name

RECENTLY_REVOKED = dt.timedelta(days=7)  # the list keeps a revoked key in view this long, then hides it


@dataclass(frozen=True)
class Regenerated:
    created: CreatedKey
    kind: Kind  # "rotated": the same key, a new secret; "replaced": a new key for a revoked one
    old_prefix: str
    old_valid_until: dt.datetime | None  # when the replaced secret stops (None: it stopped at once)


def regenerate(
    session: Session, key_id: int, account_id: int, grace: dt.timedelta | None, now: dt.datetime
) -> Regenerated:
    """A new secret for a live key (the old one working for ``grace``), a new key for a revoked one.

    A live key is rotated here with ``now`` from the app's clock: ``keys.regenerate_key`` would start the
    grace period on the wall clock, which the clock that checks it (the app's) need not agree with.
    """
    key = keys.get_key(session, key_id, account_id)
    old_prefix = key.prefix
    if key.revoked_at is not None:
        return Regenerated(keys.regenerate_key(session, key_id, account_id), "replaced", old_prefix, None)
    created = keys.rotate_key(session, key_id, account_id, grace=grace, now=now)
    return Regenerated(created, "rotated", old_prefix, created.key.previous_valid_until)


def check_regenerable(key: ApiKey) -> None:
    """The key pages regenerate live keys only: "Regenerate" on a revoked key would quietly bring a credential
    its owner stopped back to life under the same name. ValueError for a revoked one."""
    if key.revoked_at is not None:
        raise ValueError("this key is revoked and stays revoked, so it cannot be regenerated; generate a new key")


def in_list_order(listed: list[ApiKey]) -> list[ApiKey]:
    """The keys list: active keys first, then revoked ones, newest first within each."""
    return sorted(listed, key=lambda key: (key.revoked_at is not None, -key.id))


@dataclass(frozen=True)
class KeyList:
    """What the keys list shows: ``keys`` in list order, and how many revoked keys the list leaves out unless
    asked for them ("Show revoked keys (N)"; with ``show_revoked``, what "Hide old revoked keys" hides)."""

    keys: list[ApiKey]
    old_revoked: int


def key_list(listed: list[ApiKey], now: dt.datetime, *, show_revoked: bool) -> KeyList:
    """The keys list: every active key, and the revoked ones revoked within :data:`RECENTLY_REVOKED` (so a key
    just revoked stays in view, marked so) or all of them with ``show_revoked``. Old revoked keys would
    otherwise bury the live ones as keys are rotated over the years."""
    ordered = in_list_order(listed)

    def old(key: ApiKey) -> bool:
        return key.revoked_at is not None and now - key.revoked_at >= RECENTLY_REVOKED

    kept = ordered if show_revoked else [key for key in ordered if not old(key)]
    return KeyList(kept, sum(1 for key in ordered if old(key)))


def rename(session: Session, key: ApiKey, name: str) -> bool:
    """Give ``key`` a new name, under the rules of a new key's (ValueError naming "name"); True when it changed.

    Only the name changes: the key's id, secret, limits and what it used stay, and so do past audit rows
    and usage (both refer to the key by id). A revoked key stays as it was revoked."""
    new = key_name(name)
    if key.revoked_at is not None:
        raise ValueError("this key is revoked and stays as it was; generate a new key")
    if new == key.name:
        return False
    old, key.name = key.name, new
    session.flush()
    audit.note(session, "key.renamed", f"key:{key.id}", {"account_id": key.account_id, "from": old, "to": new})
    return True


def principal_of(key: ApiKey) -> Principal:
    """The principal a request with ``key`` would have: its own limits, the tier's rpm/tpm where it sets none."""
    tier = key.account.tier
    own = keys.key_limits(key)
    limits = replace(
        own, rpm=own.rpm if own.rpm is not None else tier.rpm, tpm=own.tpm if own.tpm is not None else tier.tpm
    )
    base = keys.principal_for(key.account, key_id=key.id, key_prefix=key.prefix, last_used=key.last_used_at)
    return replace(base, limits=limits, key_name=key.name)


@dataclass(frozen=True)
class Figure:
    """One line of a key's standing: what was used of an allotment, its limit (None: none) and its reset."""

    id: str
    label: str
    used: int
    limit: int | None
    reset_at: dt.datetime | None
    inherited: bool = False  # the limit is the plan's default, not the key's own

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)


def standing(session: Session, quota: QuotaBackend, key: ApiKey, now: dt.datetime) -> list[Figure]:
    """The key's use today, this month and this minute against its own limits, then its account's
    day and month: the figures of ``GET /v1/key``, from the same sources (the ledger and the quota's
    minute counters).

    ``session`` must hold no transaction on entry (the caller commits): the quota reads its minute counters
    on a connection of its own, first, because on SQLite every transaction holds the write lock and that
    connection would wait for this session's.
    """
    principal = principal_of(key)  # from loaded rows: no query
    requests, tokens = quota.minute_use(principal, now) if key.revoked_at is None else (0, 0)
    summary = ledger.summary(session, principal, now)
    day, month = periods.day_start(now), periods.month_start(now)
    key_day = ledger.key_ledger_sum(session, key.id, day, day)
    key_month = ledger.key_ledger_sum(session, key.id, month, day)
    minute_reset = periods.next_minute(now)
    limits = principal.limits
    return [
        Figure("key-day", "This key today", key_day, key.daily_cap, summary.day_reset),
        Figure("key-month", "This key this month", key_month, key.monthly_cap, summary.month_reset),
        Figure("key-rpm", "Requests this minute", requests, limits.rpm, minute_reset, key.rpm is None),
        Figure("key-tpm", "Tokens this minute", tokens, limits.tpm, minute_reset, key.tpm is None),
        Figure("account-day", "Your account today", summary.day_used, summary.daily_limit, summary.day_reset),
        Figure(
            "account-month", "Your account this month", summary.month_used, summary.monthly_limit, summary.month_reset
        ),
    ]
