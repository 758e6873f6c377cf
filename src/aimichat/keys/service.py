"""API key lifecycle (create, list, revoke, regenerate) and authentication of a presented key."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, func, select, update
from sqlalchemy.orm import Session

from aimichat.store.clock import utcnow
from aimichat.store.models import Account, ApiKey, Tier, UsageEvent

from . import tokens

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


class UnknownKey(LookupError):
    """Unknown key id (or one that belongs to another account)."""


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the full key: shown once, never stored


@dataclass(frozen=True)
class Principal:
    """Who a request is from, with what the quota layer needs, read in one query."""

    account_id: int
    account_email: str
    account_disabled: bool
    key_id: int | None
    key_prefix: str | None
    key_last_used_at: dt.datetime | None
    tier_name: str
    daily_credits: int
    monthly_credits: int | None
    cost_rule: str
    credits_per_1k_tokens: int


def create_key(session: Session, account: Account, name: str) -> CreatedKey:
    name = clean_name(name)
    secret = tokens.generate_key()
    key = ApiKey(
        account_id=account.id,
        name=name,
        key_hash=tokens.hash_key(secret),
        prefix=tokens.display_prefix(secret),
        scope="talk",
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return CreatedKey(key, secret)


def clean_name(name: str) -> str:
    name = " ".join(name.split())
    if not name:
        raise ValueError("a key needs a name")
    if len(name) > 100:
        raise ValueError("key names are at most 100 characters")
    return name


def list_keys(session: Session, account_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.id)))


def get_key(session: Session, key_id: int, account_id: int | None = None) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None or (account_id is not None and key.account_id != account_id):
        raise UnknownKey(f"no API key with id {key_id}")
    return key


def revoke_key(session: Session, key_id: int, account_id: int | None = None) -> ApiKey:
    key = get_key(session, key_id, account_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def regenerate_key(session: Session, key_id: int, account_id: int | None = None) -> CreatedKey:
    """Revoke a key and make a new one with the same name."""
    old = revoke_key(session, key_id, account_id)
    return create_key(session, old.account, old.name)


def key_status(key: ApiKey) -> str:
    return "revoked" if key.revoked_at else "active"


@dataclass(frozen=True)
class KeyUse:
    """What one key spent on one UTC day. ``id`` and ``prefix`` are None for use without a key (the
    playground), which :func:`use_by_key` leaves out."""

    id: int | None
    name: str
    prefix: str | None
    requests: int
    credits: int
    last_used_at: dt.datetime | None
    revoked: bool


def use_by_key(session: Session, account_id: int, day: dt.date) -> list[KeyUse]:
    """Every key of the account, revoked ones too, in creation order, with its requests and credits
    on ``day`` (0 for a key unused that day)."""
    # Plain columns, not the ApiKey entity: its eager-loaded account would break the GROUP BY.
    columns = (ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.last_used_at, ApiKey.revoked_at)
    rows = session.execute(
        select(*columns, func.coalesce(func.sum(UsageEvent.credits), 0), func.count(UsageEvent.id))
        .join(UsageEvent, (UsageEvent.api_key_id == ApiKey.id) & (UsageEvent.day == day), isouter=True)
        .where(ApiKey.account_id == account_id)
        .group_by(*columns)
        .order_by(ApiKey.id)
    ).all()
    return [
        KeyUse(key_id, name, prefix, int(requests), int(credits), last_used, revoked is not None)
        for key_id, name, prefix, last_used, revoked, credits, requests in rows
    ]


# Plain columns, not ORM entities, in a statement built once: this runs on every request.
_PRINCIPAL = (
    select(
        ApiKey.id,
        ApiKey.key_hash,
        ApiKey.prefix,
        ApiKey.last_used_at,
        Account.id.label("account_id"),
        Account.email,
        Account.disabled,
        Tier.name,
        Tier.daily_credits,
        Tier.monthly_credits,
        Tier.cost_rule,
        Tier.credits_per_1k_tokens,
    )
    .join(Account, Account.id == ApiKey.account_id)
    .join(Tier, Tier.id == Account.tier_id)
    .where(ApiKey.key_hash == bindparam("p_digest"), ApiKey.revoked_at.is_(None))
)


def authenticate(conn: Connection | Session, presented: str) -> Principal | None:
    """The principal for a live key, or None. Malformed keys are refused before any query.

    The lookup is by SHA-256 of the key; comparing hashes in the index leaks nothing useful about
    the key itself, and the final equality check is constant-time.
    """
    if not tokens.is_well_formed(presented):
        return None
    digest = tokens.hash_key(presented)
    row = conn.execute(_PRINCIPAL, {"p_digest": digest}).first()
    if row is None or not secrets.compare_digest(row.key_hash, digest):
        return None
    return Principal(
        account_id=row.account_id,
        account_email=row.email,
        account_disabled=row.disabled,
        key_id=row.id,
        key_prefix=row.prefix,
        key_last_used_at=row.last_used_at,
        tier_name=row.name,
        daily_credits=row.daily_credits,
        monthly_credits=row.monthly_credits,
        cost_rule=row.cost_rule,
        credits_per_1k_tokens=row.credits_per_1k_tokens,
    )


def principal_for(
    account: Account,
    *,
    key_id: int | None = None,
    key_prefix: str | None = None,
    last_used: dt.datetime | None = None,
) -> Principal:
    """The principal of an account on its tier; without a key (the web pages, the CLI), key_id is None."""
    tier = account.tier
    return Principal(
        account_id=account.id,
        account_email=account.email,
        account_disabled=account.disabled,
        key_id=key_id,
        key_prefix=key_prefix,
        key_last_used_at=last_used,
        tier_name=tier.name,
        daily_credits=tier.daily_credits,
        monthly_credits=tier.monthly_credits,
        cost_rule=tier.cost_rule,
        credits_per_1k_tokens=tier.credits_per_1k_tokens,
    )


_TOUCH = update(ApiKey).where(ApiKey.id == bindparam("p_key")).values(last_used_at=bindparam("p_now"))


def touch_last_used(conn: Connection, principal: Principal, now: dt.datetime) -> None:
    """Record use at most once a minute per key, so a busy key costs no extra write per request."""
    if last_use_is_stale(principal, now):
        conn.execute(_TOUCH, {"p_key": principal.key_id, "p_now": now})


def last_use_is_stale(principal: Principal, now: dt.datetime) -> bool:
    last = principal.key_last_used_at
    return principal.key_id is not None and (last is None or now - last >= LAST_USED_RESOLUTION)
