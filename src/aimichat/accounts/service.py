"""Tiers and accounts: plain functions over a SQLAlchemy session, shared by the CLI, API and web pages."""

from __future__ import annotations

import secrets
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aimichat.store.clock import utcnow
from aimichat.store.models import Account, Tier

COST_RULES = ("per_request", "per_token")
DEFAULT_DAILY_CREDITS = 100  # the daily allotment of the tier a fresh database starts with
MIN_PASSWORD = 8
# argon2id at OWASP's recommended minimum (19 MiB, 2 passes): the library default (64 MiB) times a
# thread pool of sign-ups and log-ins would let a burst of them take gigabytes.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


class AccountError(ValueError):
    """A request the store refuses: unknown email, duplicate account, weak password, unknown tier."""


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
    return tier


def set_tier_limits(session: Session, name: str, **limits: int | None) -> Tier:
    """Set a tier's key defaults (``rpm``, ``tpm``: per key and minute) and its ``max_keys`` active keys
    per account; a None removes one, a name left out keeps it."""
    tier = get_tier(session, name)
    for field, value in limits.items():
        if field not in ("rpm", "tpm", "max_keys"):
            raise AccountError(f"unknown tier limit {field!r}")
        if value is not None and value < (0 if field == "max_keys" else 1):
            raise AccountError(f"{field} must be at least {0 if field == 'max_keys' else 1}")
        setattr(tier, field, value)
    session.flush()
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
    """A new account (the CLI's and the admin's way); AccountError if the email already has one."""
    email = normalize_email(email)
    check_password_strength(password)
    tier_row = get_tier(session, tier)
    if session.scalar(select(Account.id).where(Account.email == email)) is not None:
        raise AccountError(f"an account for {email} already exists")
    return _insert(session, email, _hasher.hash(password), tier_row, is_admin=is_admin)


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
            return _insert(session, email, password_hash, tier_row)
    except IntegrityError:
        return None


def _insert(session: Session, email: str, password_hash: str, tier: Tier, *, is_admin: bool = False) -> Account:
    account = Account(
        email=email,
        password_hash=password_hash,
        tier=tier,
        is_admin=is_admin,
        disabled=False,
        created_at=utcnow(),
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


def list_accounts(session: Session) -> list[Account]:
    return list(session.scalars(select(Account).order_by(Account.id)))


def set_account_tier(session: Session, email: str, tier: str) -> Account:
    account = get_account(session, email)
    account.tier = get_tier(session, tier)
    session.flush()
    return account


def set_disabled(session: Session, email: str, disabled: bool = True) -> Account:
    account = get_account(session, email)
    account.disabled = disabled
    session.flush()
    return account


def set_admin(session: Session, email: str, is_admin: bool = True) -> Account:
    account = get_account(session, email)
    account.is_admin = is_admin
    session.flush()
    return account


# -- passwords -----------------------------------------------------------------------------------


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password must be at least {MIN_PASSWORD} characters")


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
