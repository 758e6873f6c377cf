"""SQLAlchemy 2 models. Every schema change comes with an Alembic migration in ``migrations/versions``.

Times are naive UTC datetimes throughout (SQLite has no time zones); ``store.clock.utcnow`` makes them.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tier(Base):
    __tablename__ = "tiers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    daily_credits: Mapped[int] = mapped_column(Integer)
    monthly_credits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost_rule: Mapped[str] = mapped_column(String(16), default="per_request")  # or "per_token"
    credits_per_1k_tokens: Mapped[int] = mapped_column(Integer, default=1)
    # The public model names this tier may use; None: every model.
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True, default=None)
    # Defaults for each key of the tier's accounts (a key's own limits win), and the most active keys.
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    max_keys: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Stored lower-cased, which makes the unique constraint case-insensitive on every database.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    tier_id: Mapped[int] = mapped_column(ForeignKey("tiers.id"))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)

    tier: Mapped[Tier] = relationship(lazy="joined")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256 of the full key
    prefix: Mapped[str] = mapped_column(String(32))  # "aimichat_AbCd", shown in lists
    scope: Mapped[str] = mapped_column(String(16), default="talk")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # Limits inside the account's pool (None: none of its own). See quota/ledger.py and docs/quota.md.
    daily_cap: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    monthly_cap: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, default=None)
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True, default=None)
    ips: Mapped[list[str] | None] = mapped_column(JSON, nullable=True, default=None)  # CIDR ranges
    # Rotation with a grace period: the secret it replaced keeps working until then (same key, same usage).
    previous_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, default=None, index=True)
    previous_valid_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, default=None)

    account: Mapped[Account] = relationship(lazy="joined")


class UsageCounter(Base):
    """Credits used by one account in one period; kept in step with the ledger in the same transaction."""

    __tablename__ = "usage_counters"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)  # "day" | "month"
    period_start: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    used: Mapped[int] = mapped_column(BigInteger, default=0)


class KeyCounter(Base):
    """What one key used in its current window of one kind: its day, its month, its minute's requests
    and its minute's tokens. One row per (key, kind), moved to the new window by the update that first
    lands in it (see ``quota.ledger``), so the table never grows."""

    __tablename__ = "key_counters"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # "day" | "month" | "rpm" | "tpm"
    window_start: Mapped[dt.datetime] = mapped_column(DateTime)
    used: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageEvent(Base):
    """The ledger: one row per granted request. Its credits always sum to the counters."""

    __tablename__ = "usage_ledger"
    __table_args__ = (
        Index("ix_usage_ledger_account_day", "account_id", "day"),
        UniqueConstraint("request_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    day: Mapped[dt.date] = mapped_column(Date)  # the UTC day the reservation was made; it is charged there
    reserved_credits: Mapped[int] = mapped_column(Integer)
    credits: Mapped[int] = mapped_column(Integer)  # what is counted now: reserved, then the settled charge
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))  # reserved | charged | released
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    settled_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the public name asked for
    tokens_reserved: Mapped[int] = mapped_column(Integer, default=0)  # counted against the key's TPM window


class WebSession(Base):
    """A browser session of the account pages. Only the SHA-256 of the cookie's token is stored,
    so a copy of the database cannot be replayed as a logged-in browser."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class KeyHandoff(Base):
    """A new key's secret on its way from the POST that made it to the one page that shows it (post/redirect/get).

    Tied to one browser session, deleted when read, kept 5 minutes at most. The secret is stored masked
    with a pad derived from the session's cookie token and the redirect's token, neither of which the
    database holds (only their SHA-256), so a copy of this table shows no usable key either."""

    __tablename__ = "key_handoffs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the ?shown= token
    session_id: Mapped[int] = mapped_column(ForeignKey("web_sessions.id", ondelete="CASCADE"), index=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # "created" | "rotated" | "replaced"
    sealed: Mapped[str] = mapped_column(String(256))  # hex of the secret XOR the pad
    old_prefix: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the secret it replaces
    old_valid_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class LoginAttempt(Base):
    """A failed log-in, kept for the throttling window: counted per email and per client address."""

    __tablename__ = "login_attempts"
    __table_args__ = (
        Index("ix_login_attempts_email_created", "email", "created_at"),
        Index("ix_login_attempts_address_created", "address", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    address: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


# -- the model registry --------------------------------------------------------------------------
# Every replica reads these tables (see registry/); each change bumps RegistryVersion, which replicas poll.


class ModelRecord(Base):
    """A model served under a public name: an embedded GGUF or an OpenAI-compatible upstream.

    ``config`` holds the engine's settings (see ``registry.catalog``): for ``embedded`` the GGUF, slots,
    context length, threads, system prompt, load-on-demand and idle unload; for ``upstream`` the base
    URLs, the upstream's model name and the *name* of the environment variable holding its API key.
    ``enabled`` False hides a model (how the built-in ``aimichat-1`` is taken off a fleet).
    """

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    engine: Mapped[str] = mapped_column(String(16))  # "embedded" | "upstream"
    config: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)


class ModelAlias(Base):
    """Another name that resolves to a model (``gpt-4o-mini`` -> ``aimichat-1``)."""

    __tablename__ = "model_aliases"

    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(128))


class ModelSource(Base):
    """An upstream registered as a whole: every model its ``GET /v1/models`` lists is served, as ``prefix + id``."""

    __tablename__ = "model_sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    urls: Mapped[list[str]] = mapped_column(JSON)
    prefix: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_env: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class ModelPrice(Base):
    """What one tier pays for one model: per request, or per 1M prompt and completion tokens."""

    __tablename__ = "model_prices"

    tier_id: Mapped[int] = mapped_column(ForeignKey("tiers.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    per_request: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_per_1m: Mapped[float | None] = mapped_column(Float, nullable=True)
    completion_per_1m: Mapped[float | None] = mapped_column(Float, nullable=True)


class RegistryVersion(Base):
    """One row whose number grows with every change to models, aliases, sources, prices or tier access."""

    __tablename__ = "registry_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
