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
    LargeBinary,
    MetaData,
    String,
    Text,
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
    # Fairness (engines/admission.py): requests an account may run at once, and the longest prompt (tokens)
    # it may send; None: no limit of the tier's own (the model's context bounds the prompt).
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    max_prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    # Most choices (n) one request may ask for; None: DEFAULT_MAX_N.
    max_n: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)


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
    # None: the address is unproven (a sign-up). With AIMICHAT_EMAIL_VERIFICATION on, such an account may not
    # make keys until its emailed link is followed (docs/email.md). Operator-made accounts are set at once.
    email_verified_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, default=None)

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


# --- admin keys and the audit log (migration 0006) ---


class AdminKey(Base):
    """A key of the admin API (``aimichat_admin_…``), hashed at rest like an API key. It belongs to no
    account and cannot call the chat API. ``window_start``/``window_requests`` count its requests in the
    current minute (the admin API's rate limit), moved on by the statement that authenticates it."""

    __tablename__ = "admin_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256 of the full key
    prefix: Mapped[str] = mapped_column(String(32))  # "aimichat_admin_AbCd", shown in lists
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    window_start: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    window_requests: Mapped[int] = mapped_column(Integer, default=0)


class AuditEvent(Base):
    """One change to accounts, tiers, prices, models or keys: who (``account:7``, ``admin_key:2``, ``cli``),
    what (``key.revoked``), to what (``key:12``), when, and a short JSON detail that never holds a secret."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_actor_id", "actor", "id"),
        Index("ix_audit_log_action_id", "action", "id"),
        Index("ix_audit_log_target_id", "target", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)


# --- email tokens (migration 0007) ---


class EmailToken(Base):
    """A single-use token of an emailed link (verify the address, reset the password).

    Only the SHA-256 of the token is stored, so a copy of the table holds no usable link. A token is spent
    by one conditional UPDATE (``used_at`` set where it was NULL), so two replicas cannot both spend it.
    Rows also count the mails sent to an account (the per-account throttle), and are pruned a day after
    they expire."""

    __tablename__ = "email_tokens"
    __table_args__ = (Index("ix_email_tokens_account_purpose_created", "account_id", "purpose", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(16))  # "verify" | "reset"
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, default=None)


# --- leaked-key reports and idempotent retries (migration 0008) ---


class KeyReport(Base):
    """One key reported leaked to ``POST /v1/keys/report`` (see ``alerts.leaks``), kept whatever it was.

    Never the reported text itself: a key that matched is named by ``key_id``; anything else leaves only
    its outcome. The rows of one client address in the last minute are its rate limit."""

    __tablename__ = "key_reports"
    __table_args__ = (Index("ix_key_reports_address_created", "address", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    address: Mapped[str] = mapped_column(String(64))  # the client that reported it
    source: Mapped[str | None] = mapped_column(String(2000), nullable=True)  # where it was found, if said
    outcome: Mapped[str] = mapped_column(String(16))  # revoked | inactive | unknown | malformed
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=True)


class IdempotencyRecord(Base):
    """A request sent with an ``Idempotency-Key`` and, once it is done, the answer it got (idempotency/).

    One row per (owner, key), inserted before the request runs, so a second replica sees it; the answer
    (the completion text included) is kept until ``expires_at`` (``AIMICHAT_IDEMPOTENCY_TTL``), then
    deleted. Neither the key nor the body is stored as sent: only their SHA-256, and never the API key.
    """

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("owner", "key_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))  # whose keys: "account:7" (the admin API: "admin_key:2")
    key_hash: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of the Idempotency-Key
    operation: Mapped[str] = mapped_column(String(200))  # "POST /v1/chat/completions"
    request_hash: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of the raw request body
    attempt: Mapped[str] = mapped_column(String(32))  # the running attempt's id: only it may finish the row
    state: Mapped[str] = mapped_column(String(8))  # running | done
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the answer, once done
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


# --- usage alerts and webhooks (migration 0009) ---


class AlertSettings(Base):
    """An account's usage alert thresholds (percent of each allotment), when it changed the defaults."""

    __tablename__ = "alert_settings"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    percents: Mapped[list[int]] = mapped_column(JSON)  # [] turns usage alerts off
    email: Mapped[bool] = mapped_column(Boolean, default=True)  # also by email to the account's address
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)


class WebhookEndpoint(Base):
    """Where an account's events are POSTed, signed as Standard Webhooks prescribe."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    # The signing secret, "whsec_" + base64. Kept as is, unlike API keys: HMAC is symmetric, so the
    # server needs the secret itself to sign each delivery (Standard Webhooks' senders keep it so too); a
    # hash could not sign. Whoever reads this table can forge events to this one receiver, nothing more.
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class UsageAlert(Base):
    """A threshold crossed in one period. The unique row is the decision to send: across every replica,
    the one INSERT that lands sends the alert; the others find the row there and send nothing."""

    __tablename__ = "usage_alerts"
    __table_args__ = (UniqueConstraint("account_id", "key_id", "period", "period_start", "percent"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    key_id: Mapped[int] = mapped_column(Integer, default=0)  # 0: the account's allotment, else that key's cap
    period: Mapped[str] = mapped_column(String(8))  # "day" | "month"
    period_start: Mapped[dt.date] = mapped_column(Date)
    percent: Mapped[int] = mapped_column(Integer)
    used: Mapped[int] = mapped_column(BigInteger)
    allotment: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class AlertDelivery(Base):
    """One event on its way to one place (an email, a webhook endpoint): retried with backoff until sent.

    ``body`` is the exact text sent (and signed), the same on every attempt. A replica claims a due row
    with a conditional UPDATE that sets ``claimed_until``, so one replica at a time tries it."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (Index("ix_alert_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))  # the webhook-id header: receivers deduplicate on it
    event_type: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    channel: Mapped[str] = mapped_column(String(8))  # "email" | "webhook"
    endpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=True
    )
    status: Mapped[str] = mapped_column(String(8), default="pending")  # pending | sent | failed (gave up)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


# --- per-tier fairness columns live on Tier above (migration 0010) ---
