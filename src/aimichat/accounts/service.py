"""Tiers and accounts: plain functions over a SQLAlchemy session, shared by the CLI, API and web pages."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aimichat.audit import service as audit
from aimichat.store.clock import utcnow
from aimichat.store.models import Account, Tier

COST_RULES = ("per_request", "per_token")
DEFAULT_DAILY_CREDITS = 100  # the daily allotment of the tier a fresh database starts with
MIN_PASSWORD = 8
MAX_PER_PAGE = 200
# argon2id at OWASP's recommended minimum (19 MiB, 2 passes): the library default (64 MiB) times a
# thread pool of sign-ups and log-ins would let a burst of them take gigabytes.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


class AccountError(ValueError):
    """A request the store refuses: unknown email, duplicate account, weak password, unknown tier."""


class UnknownAccount(AccountError, LookupError):
    """No account has that id."""


# -- tiers ---------------------------------------------------------------------------------------


def set_tier(
    session: Session,
    name: str,
    *,
    daily_credits: int,
    monthly_credits: int | None = None,
    cost_rule: str = "per_request",
    credits_per_1k_tokens: int = 1,
) -> Tier:
    """Create or update a tier."""
    if cost_rule not in COST_RULES:
        raise AccountError(f"unknown cost rule {cost_rule!r}; use one of {', '.join(COST_RULES)}")
    if daily_credits < 0 or (monthly_credits is not None and monthly_credits < 0):
        raise AccountError("credit limits cannot be negative")
    if credits_per_1k_tokens < 1:
        raise AccountError("credits per 1k tokens must be at least 1")
    tier = session.scalar(select(Tier).where(Tier.name == name)) or Tier(name=name)
    tier.daily_credits = daily_credits
    tier.monthly_credits = monthly_credits
    tier.cost_rule = cost_rule
    tier.credits_per_1k_tokens = credits_per_1k_tokens
    session.add(tier)
    session.flush()
    detail = {"daily_credits": daily_credits, "monthly_credits": monthly_credits, "cost_rule": cost_rule}
    audit.note(session, "tier.saved", f"tier:{name}", {**detail, "credits_per_1k_tokens": credits_per_1k_tokens})
    return tier


def tier_as_json(tier: Tier) -> dict[str, Any]:
    """A tier's settings as JSON: what `aimichat tiers list --json` prints and the admin API answers."""
    return {
        "name": tier.name,
        "daily_credits": tier.daily_credits,
        "monthly_credits": tier.monthly_credits,
        "cost_rule": tier.cost_rule,
        "credits_per_1k_tokens": tier.credits_per_1k_tokens,
        "rpm": tier.rpm,
        "tpm": tier.tpm,
        "max_keys": tier.max_keys,
        "max_concurrent": tier.max_concurrent,
        "max_prompt_tokens": tier.max_prompt_tokens,
        "max_n": tier.max_n,
        "models": tier.models,
    }


TIER_CREDITS = ("daily_credits", "monthly_credits", "cost_rule", "credits_per_1k_tokens")


def save_tier(session: Session, name: str, changes: Mapping[str, Any]) -> Tier:
    """Create a tier, or change the fields named in ``changes`` of an existing one (the others keep their
    values): the credits of :func:`set_tier` and the limits of :func:`set_tier_limits`. A new tier needs
    ``daily_credits``. What the CLI's ``tiers set`` and the admin API both do."""
    unknown = sorted(set(changes) - {*TIER_CREDITS, *TIER_LIMITS})
    if unknown:
        raise AccountError(f"unknown tier field {unknown[0]!r}")
    existing = session.scalar(select(Tier).where(Tier.name == name))
    credits = {f: changes[f] for f in TIER_CREDITS if f in changes}
    if credits.get("daily_credits", 0) is None or (existing is None and "daily_credits" not in credits):
        raise AccountError("a new tier needs daily credits" if existing is None else "daily credits cannot be empty")
    empty = [f for f in ("cost_rule", "credits_per_1k_tokens") if f in credits and credits[f] is None]
    if empty:  # only monthly_credits may be removed (no monthly limit); these always have a value
        raise AccountError(f"{empty[0].replace('_', ' ')} cannot be empty")
    if existing is None or credits:
        current = {f: getattr(existing, f) for f in TIER_CREDITS} if existing is not None else {}
        set_tier(session, name, **{**current, **credits})
    limits = {f: changes[f] for f in TIER_LIMITS if f in changes}
    if limits:
        set_tier_limits(session, name, **limits)
    return get_tier(session, name)


TIER_LIMITS = ("rpm", "tpm", "max_keys", "max_concurrent", "max_prompt_tokens", "max_n")


def set_tier_limits(session: Session, name: str, **limits: int | None) -> Tier:
    """Set a tier's key defaults (``rpm``, ``tpm``: per key and minute), its ``max_keys`` active keys per
    account, its ``max_concurrent`` requests running at once per account and its ``max_prompt_tokens``; a
    None removes one, a name left out keeps it."""
    tier = get_tier(session, name)
    for field, value in limits.items():
        if field not in TIER_LIMITS:
            raise AccountError(f"unknown tier limit {field!r}")
        if value is not None and value < (0 if field == "max_keys" else 1):
            raise AccountError(f"{field} must be at least {0 if field == 'max_keys' else 1}")
        setattr(tier, field, value)
    session.flush()
    audit.note(session, "tier.limits_changed", f"tier:{name}", dict(limits))
    return tier


def get_tier(session: Session, name: str) -> Tier:
    """The tier called ``name``; AccountError if there is none."""
    tier = session.scalar(select(Tier).where(Tier.name == name))
    if tier is None:
        known = ", ".join(t.name for t in list_tiers(session)) or "none yet"
        raise AccountError(f"unknown tier {name!r} (tiers: {known})")
    return tier


def list_tiers(session: Session) -> list[Tier]:
    return list(session.scalars(select(Tier).order_by(Tier.id)))


def ensure_default_tier(session: Session, name: str = "free", daily_credits: int = DEFAULT_DAILY_CREDITS) -> bool:
    """Create the default tier on a fresh database; True if it was created."""
    if session.scalar(select(Tier).where(Tier.name == name)) is not None:
        return False
    try:
        with session.begin_nested():  # replicas starting together race to create it: one wins, no one fails
            set_tier(session, name, daily_credits=daily_credits)
    except IntegrityError:
        return False
    return True


# -- accounts ------------------------------------------------------------------------------------


def normalize_email(email: str) -> str:
    """The email trimmed and lower-cased; AccountError if it does not look like an address."""
    email = email.strip().lower()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or " " in email or len(email) > 320:
        raise AccountError(f"not a valid email address: {email!r}")
    return email


def create_account(
    session: Session, email: str, password: str, *, tier: str = "free", is_admin: bool = False
) -> Account:
    """A new account (the CLI's and the admin's way); AccountError if the email already has one. Its email
    counts as verified: the operator who made it vouches for it (docs/email.md)."""
    email = normalize_email(email)
    check_password_strength(password)
    tier_row = get_tier(session, tier)
    if session.scalar(select(Account.id).where(Account.email == email)) is not None:
        raise AccountError(f"an account for {email} already exists")
    try:
        # A savepoint: another request may insert the same email between the check above and this insert;
        # the loser is told as above, not with the unique index's error (and its session stays usable).
        with session.begin_nested():
            account = _insert(session, email, _hasher.hash(password), tier_row, is_admin=is_admin, verified=True)
    except IntegrityError:
        raise AccountError(f"an account for {email} already exists") from None
    _created(session, account, audit.SYSTEM)
    return account


def register(session: Session, email: str, password: str, *, tier: str = "free") -> Account | None:
    """Sign-up without telling whether the email is taken: the new account, or None when the email already
    has one (which is left exactly as it was).

    Both ways do the same work (the argon2 hash, the expensive part, is computed either way), so neither the
    answer nor its timing tells them apart. A malformed email or a weak password is an AccountError either way.
    """
    email = normalize_email(email)
    check_password_strength(password)
    tier_row = get_tier(session, tier)
    password_hash = _hasher.hash(password)
    if session.scalar(select(Account.id).where(Account.email == email)) is not None:
        return None
    try:
        with session.begin_nested():  # two sign-ups racing for one free email: one account, no error
            account = _insert(session, email, password_hash, tier_row)
            _created(session, account, audit.account_actor(account.id))  # no one is logged in: it made itself
            return account
    except IntegrityError:
        return None


def _created(session: Session, account: Account, default_actor: str) -> None:
    detail = {"email": account.email, "tier": account.tier.name, "admin": account.is_admin}
    audit.note(session, "account.created", f"account:{account.id}", detail, default=default_actor)


def _insert(
    session: Session, email: str, password_hash: str, tier: Tier, *, is_admin: bool = False, verified: bool = False
) -> Account:
    now = utcnow()
    account = Account(
        email=email,
        password_hash=password_hash,
        tier=tier,
        is_admin=is_admin,
        disabled=False,
        created_at=now,
        email_verified_at=now if verified else None,
    )
    session.add(account)
    session.flush()
    return account


def get_account(session: Session, email: str) -> Account:
    """The account of ``email`` (any case); AccountError if there is none."""
    account = session.scalar(select(Account).where(Account.email == normalize_email(email)))
    if account is None:
        raise AccountError(f"no account for {email.strip().lower()}")
    return account


def get_account_by_id(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise UnknownAccount(f"no account with id {account_id}")
    return account


def list_accounts(session: Session) -> list[Account]:
    return list(session.scalars(select(Account).order_by(Account.id)))


@dataclass(frozen=True)
class AccountPage:
    """One page of accounts, oldest first."""

    accounts: list[Account]
    page: int
    per_page: int
    total: int

    @property
    def has_more(self) -> bool:
        return self.page * self.per_page < self.total


def search_accounts(session: Session, q: str = "", *, page: int = 1, per_page: int = 50) -> AccountPage:
    """The accounts whose email contains ``q`` (any case; every account for ""), a page at a time."""
    if page < 1:
        raise AccountError("page starts at 1")
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise AccountError(f"per_page must be between 1 and {MAX_PER_PAGE}")
    # The emails are stored lower-cased; the pattern's own % and _ are matched as themselves.
    pattern = "%" + q.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    matching = Account.email.like(pattern, escape="\\")
    total = session.scalar(select(func.count(Account.id)).where(matching)) or 0
    rows = session.scalars(
        select(Account).where(matching).order_by(Account.id).limit(per_page).offset((page - 1) * per_page)
    )
    return AccountPage(list(rows), page, per_page, int(total))


def set_account_tier(session: Session, email: str, tier: str) -> Account:
    account = get_account(session, email)
    before = account.tier.name
    account.tier = get_tier(session, tier)
    session.flush()
    if account.tier.name != before:
        audit.note(session, "account.tier_changed", f"account:{account.id}", {"from": before, "to": account.tier.name})
    return account


def set_disabled(session: Session, email: str, disabled: bool = True) -> Account:
    account = get_account(session, email)
    if account.disabled != disabled:
        account.disabled = disabled
        audit.note(session, "account.disabled" if disabled else "account.enabled", f"account:{account.id}")
    session.flush()
    return account


def set_admin(session: Session, email: str, is_admin: bool = True) -> Account:
    account = get_account(session, email)
    if account.is_admin != is_admin:
        account.is_admin = is_admin
        audit.note(session, "account.admin_granted" if is_admin else "account.admin_removed", f"account:{account.id}")
    session.flush()
    return account


# -- passwords -----------------------------------------------------------------------------------


COMMON_PASSWORDS = Path(__file__).with_name("common_passwords.txt")


@cache
def common_passwords() -> frozenset[str]:
    """The bundled list of the most common passwords (lower case), read once."""
    lines = COMMON_PASSWORDS.read_text(encoding="utf-8").splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


def check_password_strength(password: str) -> None:
    """The rules of every password set (sign-up, change, reset, the CLI): NIST SP 800-63B's length and no
    commonly used value, since those are what a guessing run tries first, whatever the throttling."""
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password must be at least {MIN_PASSWORD} characters")
    if password.lower() in common_passwords():
        raise AccountError("that password is one of the most common ones, which are guessed first: choose another")


def verify_password(account: Account, password: str) -> bool:
    return _verify(account.password_hash, password)


def verify_login(account: Account | None, password: str) -> bool:
    """The password check of a log-in, ``account`` None for an email without one: then a dummy hash made by
    the same hasher (so with the same argon2 parameters) is verified instead, and False returned. Both take
    the same time, so the answer's timing does not tell which emails have accounts."""
    if account is None:
        _verify(dummy_hash(), password)
        return False
    return verify_password(account, password)


def upgrade_hash(account: Account, password: str) -> bool:
    """After a successful log-in: rehash a password hashed with other argon2 parameters than the current
    ones (so every account's check takes as long as the dummy's); True if it was. The caller commits."""
    if not _hasher.check_needs_rehash(account.password_hash):
        return False
    account.password_hash = _hasher.hash(password)
    return True


@cache
def dummy_hash() -> str:
    """A hash of a random password nobody knows, made once by the accounts' own hasher."""
    return _hasher.hash(secrets.token_urlsafe(24))


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def change_password(session: Session, account: Account, current: str, new: str) -> None:
    if not verify_password(account, current):
        raise AccountError("the current password is wrong")
    check_password_strength(new)
    account.password_hash = _hasher.hash(new)
    session.flush()
    audit.note(session, "account.password_changed", f"account:{account.id}")


def set_password(session: Session, email: str, new: str) -> Account:
    """The operator sets a password for someone locked out (``aimichat accounts set-password``); the caller
    ends the account's browser sessions. Known devices go with the old hash (their entries are signed by it)."""
    account = get_account(session, email)
    check_password_strength(new)
    account.password_hash = _hasher.hash(new)
    session.flush()
    audit.note(session, "account.password_set", f"account:{account.id}")
    return account


def reset_password(session: Session, account: Account, new: str) -> None:
    """Set a new password without the current one: the caller has proved the email (an emailed link)."""
    check_password_strength(new)
    account.password_hash = _hasher.hash(new)
    session.flush()
    audit.note(session, "account.password_reset", f"account:{account.id}", default=audit.account_actor(account.id))
