"""API key lifecycle (create, list, revoke, regenerate) and authentication of a presented key."""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from aimichat.audit import service as audit
from aimichat.store.clock import iso_utc, utcnow
from aimichat.store.models import Account, ApiKey, Tier, UsageEvent
from aimichat.store.text import control_refusal

from . import tokens

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


class UnknownKey(LookupError):
    """Unknown key id (or one that belongs to another account)."""


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the full key: shown once, never stored


@dataclass(frozen=True)
class KeyLimits:
    """What a key may do inside its account's pool; None everywhere: as much as the account may."""

    daily_cap: int | None = None  # credits a UTC day
    monthly_cap: int | None = None  # credits a UTC month
    rpm: int | None = None  # requests a minute (None: the tier's default, if any)
    tpm: int | None = None  # prompt + completion tokens a minute (idem)
    expires_at: dt.datetime | None = None
    models: tuple[str, ...] | None = None  # the public model names it may use
    ips: tuple[str, ...] | None = None  # CIDR ranges it may be used from

    def as_json(self) -> dict[str, Any]:
        return {
            "daily_cap": self.daily_cap,
            "monthly_cap": self.monthly_cap,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "expires_at": iso_utc(self.expires_at) if self.expires_at else None,
            "models": list(self.models) if self.models is not None else None,
            "ips": list(self.ips) if self.ips is not None else None,
        }


NO_LIMITS = KeyLimits()
DEFAULT_MAX_N = 4  # choices (n) a request may ask for where its tier sets no max_n


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
    limits: KeyLimits = NO_LIMITS  # the key's own, with the tier's rpm/tpm where the key sets none
    key_name: str | None = None
    grace_until: dt.datetime | None = None  # authenticated by the secret a rotation replaced, valid until then
    max_n: int = DEFAULT_MAX_N  # the most choices one request of the tier may ask for

    @property
    def has_key_limits(self) -> bool:
        """Does reserving for this caller touch the key's own counters (caps, rates)?"""
        limits = self.limits
        return self.key_id is not None and any(
            v is not None for v in (limits.daily_cap, limits.monthly_cap, limits.rpm, limits.tpm)
        )


def create_key(session: Session, account: Account, name: str, limits: KeyLimits = NO_LIMITS) -> CreatedKey:
    """A new key of ``account``; refused when the tier's ``max_keys`` active keys exist already."""
    name = clean_name(name)
    limits = check_limits(limits)
    tier = account.tier
    if tier.max_keys is not None:
        active = session.scalar(
            select(func.count(ApiKey.id)).where(ApiKey.account_id == account.id, ApiKey.revoked_at.is_(None))
        )
        if (active or 0) >= tier.max_keys:
            raise ValueError(f"the {tier.name} plan allows {tier.max_keys} active keys; revoke one to make another")
    secret = tokens.generate_key()
    key = ApiKey(
        account_id=account.id,
        name=name,
        key_hash=tokens.hash_key(secret),
        prefix=tokens.display_prefix(secret),
        scope="talk",
        created_at=utcnow(),
    )
    _store_limits(key, limits)
    session.add(key)
    session.flush()
    shown = {k: v for k, v in limits.as_json().items() if v is not None}
    audit.note(session, "key.created", f"key:{key.id}", {"account_id": account.id, "name": name, **shown})
    return CreatedKey(key, secret)


def check_limits(limits: KeyLimits) -> KeyLimits:
    """``limits`` with its CIDR ranges normalised; ValueError with a message for people if one is wrong."""
    for label, value in (("daily cap", limits.daily_cap), ("monthly cap", limits.monthly_cap)):
        if value is not None and value < 0:
            raise ValueError(f"the {label} cannot be negative")
    for label, value in (("requests per minute", limits.rpm), ("tokens per minute", limits.tpm)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be at least 1")
    ips = None
    if limits.ips is not None:
        try:
            ips = tuple(str(ipaddress.ip_network(cidr.strip(), strict=False)) for cidr in limits.ips if cidr.strip())
        except ValueError as exc:
            raise ValueError(f"not an IP range (CIDR): {exc}") from None
    models = None
    if limits.models is not None:
        models = tuple(sorted({m.strip() for m in limits.models if m.strip()}))
    return replace(limits, ips=ips, models=models)


def _store_limits(key: ApiKey, limits: KeyLimits) -> None:
    key.daily_cap, key.monthly_cap = limits.daily_cap, limits.monthly_cap
    key.rpm, key.tpm, key.expires_at = limits.rpm, limits.tpm, limits.expires_at
    key.models = list(limits.models) if limits.models is not None else None
    key.ips = list(limits.ips) if limits.ips is not None else None


def key_limits(key: ApiKey) -> KeyLimits:
    """The limits a key carries itself (not the tier's defaults)."""
    return KeyLimits(
        daily_cap=key.daily_cap,
        monthly_cap=key.monthly_cap,
        rpm=key.rpm,
        tpm=key.tpm,
        expires_at=key.expires_at,
        models=tuple(key.models) if key.models is not None else None,
        ips=tuple(key.ips) if key.ips is not None else None,
    )


def set_limits(session: Session, key_id: int, account_id: int | None = None, **changes: Any) -> ApiKey:
    """Change some of a key's limits (``daily_cap=None`` removes that one); the others stay."""
    key = get_key(session, key_id, account_id)
    unknown = set(changes) - set(KeyLimits.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown limit(s): {', '.join(sorted(unknown))}")
    limits = check_limits(replace(key_limits(key), **changes))
    _store_limits(key, limits)
    session.flush()
    changed = {k: v for k, v in limits.as_json().items() if k in changes}
    audit.note(session, "key.limits_changed", f"key:{key.id}", {"account_id": key.account_id, **changed})
    return key


def rotate_key(
    session: Session,
    key_id: int,
    account_id: int | None = None,
    *,
    grace: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> CreatedKey:
    """A new secret for the same key: its name, limits, scopes and usage so far stay (a rotation never
    resets a cap). With ``grace``, the old secret keeps working until then; without, it stops at once."""
    key = get_key(session, key_id, account_id)
    if key.revoked_at is not None:
        raise ValueError("a revoked key cannot be rotated; create a new one")
    now = now or utcnow()
    secret = tokens.generate_key()
    if grace and grace > dt.timedelta(0):
        key.previous_hash, key.previous_valid_until = key.key_hash, now + grace
    else:
        key.previous_hash, key.previous_valid_until = None, None
    key.key_hash, key.prefix = tokens.hash_key(secret), tokens.display_prefix(secret)
    session.flush()
    until = iso_utc(key.previous_valid_until) if key.previous_valid_until else None
    audit.note(session, "key.rotated", f"key:{key.id}", {"account_id": key.account_id, "old_valid_until": until})
    return CreatedKey(key, secret)


def expired(principal: Principal, now: dt.datetime) -> bool:
    expires = principal.limits.expires_at
    return expires is not None and now >= expires


def address_allowed(principal: Principal, address: str | None) -> bool:
    """Is ``address`` inside one of the key's CIDR ranges (always, for a key without any)?"""
    ranges = principal.limits.ips
    if ranges is None:
        return True
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(cidr) for cidr in ranges)


def model_allowed(principal: Principal, model: str) -> bool:
    models = principal.limits.models
    return models is None or model in models


def clean_name(name: str) -> str:
    """A key's name as stored: runs of white space (tabs and line breaks too) become one space; ValueError for
    an empty or long name, or one holding another control character (NUL: PostgreSQL's text cannot hold it)."""
    name = " ".join(name.split())
    if not name:
        raise ValueError("a key needs a name")
    if len(name) > 100:
        raise ValueError("key names are at most 100 characters")
    if (refused := control_refusal(name, "key names")) is not None:
        raise ValueError(refused)
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
        audit.note(session, "key.revoked", f"key:{key.id}", {"account_id": key.account_id, "name": key.name})
    return key


def regenerate_key(
    session: Session,
    key_id: int,
    account_id: int | None = None,
    grace: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> CreatedKey:
    """A new secret for a live key (see :func:`rotate_key`: same key, limits and usage; the old secret
    stops at once unless ``grace``); for a revoked key, a new key with its name and limits."""
    key = get_key(session, key_id, account_id)
    if key.revoked_at is not None:
        limits = key_limits(key)
        if limits.expires_at is not None and limits.expires_at <= utcnow():
            limits = replace(limits, expires_at=None)  # the new key is not born expired
        return create_key(session, key.account, key.name, limits)
    return rotate_key(session, key_id, account_id, grace=grace, now=now)


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
        ApiKey.name.label("key_name"),
        ApiKey.last_used_at,
        ApiKey.daily_cap,
        ApiKey.monthly_cap,
        ApiKey.rpm,
        ApiKey.tpm,
        ApiKey.expires_at,
        ApiKey.models,
        ApiKey.ips,
        ApiKey.previous_hash,
        ApiKey.previous_valid_until,
        Tier.rpm.label("tier_rpm"),
        Tier.tpm.label("tier_tpm"),
        Tier.max_n.label("tier_max_n"),
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
    .where(
        or_(ApiKey.key_hash == bindparam("p_digest"), ApiKey.previous_hash == bindparam("p_digest")),
        ApiKey.revoked_at.is_(None),
    )
)


def authenticate(conn: Connection | Session, presented: str, now: dt.datetime | None = None) -> Principal | None:
    """The principal for a live key, or None. Malformed keys are refused before any query.

    The lookup is by SHA-256 of the key; comparing hashes in the index leaks nothing useful about
    the key itself, and the final equality check is constant-time. The secret a rotation replaced
    still authenticates until its grace period ends (``now``). An expired key is still returned (the
    caller says why it is refused: :func:`expired`).
    """
    if not tokens.is_well_formed(presented):
        return None
    digest = tokens.hash_key(presented)
    for row in conn.execute(_PRINCIPAL, {"p_digest": digest}):
        if secrets.compare_digest(row.key_hash, digest):
            return _principal(row, None)
        previous, until = row.previous_hash, row.previous_valid_until
        if previous and until and secrets.compare_digest(previous, digest) and (now or utcnow()) < until:
            return _principal(row, until)
    return None


def _principal(row: Any, grace_until: dt.datetime | None) -> Principal:
    limits = KeyLimits(
        daily_cap=row.daily_cap,
        monthly_cap=row.monthly_cap,
        rpm=row.rpm if row.rpm is not None else row.tier_rpm,
        tpm=row.tpm if row.tpm is not None else row.tier_tpm,
        expires_at=row.expires_at,
        models=tuple(row.models) if row.models is not None else None,
        ips=tuple(row.ips) if row.ips is not None else None,
    )
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
        limits=limits,
        key_name=row.key_name,
        grace_until=grace_until,
        max_n=row.tier_max_n or DEFAULT_MAX_N,
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
        max_n=tier.max_n or DEFAULT_MAX_N,
    )


_TOUCH = update(ApiKey).where(ApiKey.id == bindparam("p_key")).values(last_used_at=bindparam("p_now"))


def touch_last_used(conn: Connection, principal: Principal, now: dt.datetime) -> None:
    """Record use at most once a minute per key, so a busy key costs no extra write per request."""
    if last_use_is_stale(principal, now):
        conn.execute(_TOUCH, {"p_key": principal.key_id, "p_now": now})


def last_use_is_stale(principal: Principal, now: dt.datetime) -> bool:
    last = principal.key_last_used_at
    return principal.key_id is not None and (last is None or now - last >= LAST_USED_RESOLUTION)
