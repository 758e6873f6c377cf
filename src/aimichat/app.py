"""The application factory: the only place where engine, database and services are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aimichat.accounts import service as accounts
from aimichat.alerts.watch import AlertWorker
from aimichat.api import handlers, key, keys_report, system, usage
from aimichat.api.admin import api_router as admin_router
from aimichat.api.chat import api_router as chat_router
from aimichat.api.chat.fast_path import ChatFastPath
from aimichat.api.chat.serving import ChatService
from aimichat.api.metrics import Metrics
from aimichat.api.metrics import router as metrics_router
from aimichat.api.middleware import RequestMiddleware
from aimichat.api.openai_responses import api_router as responses_router
from aimichat.config import PUBLIC_MODEL_ID, Settings
from aimichat.engines import configs
from aimichat.engines.base import Engine
from aimichat.idempotency.retries import Retries
from aimichat.keys.cache import PrincipalCache
from aimichat.mail import build_mailer
from aimichat.quota import sweeper
from aimichat.quota.backends import QuotaBackend, RedisQuota, SqlQuota
from aimichat.quota.fairness import Fairness, TierLimitsCache
from aimichat.registry.catalog import settings_model
from aimichat.registry.live import EngineFactory, LiveModels
from aimichat.store.changes import on_cached_change
from aimichat.store.clock import Clock, utcnow
from aimichat.store.db import Database
from aimichat.web import admin_audit
from aimichat.web.site import install as install_web

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    """The engine of ``aimichat-1`` as ``settings`` define it, not started: an upstream server, or
    llama.cpp in this process (with the upstream API key from AIMICHAT_UPSTREAM_API_KEY)."""
    if settings.engine == "upstream":
        from aimichat.engines.openai_upstream import UpstreamEngine

        return UpstreamEngine.from_settings(settings)
    spec = settings_model(settings)
    return configs.build_engine(PUBLIC_MODEL_ID, spec.config, settings)


def build_quota(settings: Settings, database: Database) -> QuotaBackend:
    durable = settings.durable_settlements
    if settings.redis_url:
        return RedisQuota.from_url(database, settings.redis_url, settings.redis_prefix, durable_settlements=durable)
    return SqlQuota(database, durable_settlements=durable)


def prepare_database(database: Database, settings: Settings) -> None:
    """Apply pending migrations and make sure the default tier exists."""
    database.upgrade()
    with database.session() as session:
        if accounts.ensure_default_tier(session, settings.default_tier):
            log.info("created the %r tier (%d daily credits)", settings.default_tier, accounts.DEFAULT_DAILY_CREDITS)
        session.commit()


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    database: Database | None = None,
    clock: Clock = utcnow,
    close_engine: bool = True,
    engine_factory: EngineFactory | None = None,
    fast_chat: bool = True,
) -> FastAPI:
    """Build the ASGI app. Pass ``engine``/``database``/``clock`` to share or control them (tests do):
    ``engine`` serves ``aimichat-1``; ``engine_factory`` builds the engines of the registry's models.
    ``fast_chat=False`` leaves chat requests to the FastAPI route that the fast path is tested against."""
    settings = settings or Settings()
    auto_threads = engine is None and "threads" not in settings.model_fields_set
    engine = engine or build_engine(settings)
    database = database or Database.from_settings(settings)  # with its database_* timeouts

    principals = PrincipalCache(settings.key_cache_seconds)
    tier_limits = TierLimitsCache(database)
    models = LiveModels(
        settings, database, default_engine=engine, factory=engine_factory, default_auto_threads=auto_threads
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_database(database, settings)
        # Keys, accounts, tiers and the registry change through ORM sessions (web pages, tests); key
        # lookups on the request path use Core connections and never clear it.
        stop_watching = on_cached_change(database.sessions, principals.clear, models.mark_stale, tier_limits.clear)
        # Reservations their requests never settled (a replica killed mid-stream) are settled each minute.
        sweeping = asyncio.create_task(
            sweeper.sweep_every(
                sweeper.SWEEP_INTERVAL, database, lambda: app.state.quota, clock, settings.reservation_ttl
            )
        )
        cleaning = asyncio.create_task(app.state.retries.clean_every())  # expired Idempotency-Key answers
        await app.state.alerts.start()  # usage alerts and webhook deliveries, off the request path
        try:
            await models.start()
            yield
        finally:
            await app.state.alerts.close()
            sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping
            cleaning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaning
            stop_watching()
            await models.close(keep=None if close_engine else engine)

    # No trailing-slash redirects: Starlette's would echo the whole URL, ?api_key= included, in Location,
    # built from the Host header (issue 15). A path with a stray slash is a 404 that names the right one.
    app = FastAPI(
        title="AimiChat",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.mailer = build_mailer(settings)  # SMTP, or the log when no AIMICHAT_SMTP_URL is set
    app.state.engine = engine  # aimichat-1 as the settings define it
    app.state.models = models
    app.state.database = database
    app.state.principals = principals
    app.state.clock = clock
    app.state.started = int(time.time())
    app.state.metrics = Metrics(models)
    app.state.quota = build_quota(settings, database)
    # Per-account fairness on this replica's engines (quota/fairness.py): tier limits, round-robin turns.
    app.state.fairness = Fairness(tier_limits, max_waiting=settings.max_queue, timeout=settings.queue_timeout)
    app.state.retries = Retries(
        database, clock, settings.idempotency_ttl, settings.idempotency_wait, lease=settings.reservation_ttl
    )
    app.state.alerts = AlertWorker(
        database,
        clock,
        lambda: getattr(app.state, "mailer", None),
        timeout=settings.webhook_timeout,
        retry_base=settings.alert_retry_seconds,
        allow_private=settings.webhook_allow_private,
    )
    app.state.chat = ChatService(
        models,
        app.state.quota,
        clock,
        settings.default_max_tokens,
        metrics=app.state.metrics,
        settled=app.state.alerts.settled,  # usage alerts: checked off the request path
        refused=app.state.alerts.refused,  # a spent allotment: its 100% alert
        fairness=app.state.fairness,
    )

    handlers.install(app)
    app.include_router(chat_router.router)
    app.include_router(responses_router.router)
    app.include_router(usage.router)
    app.include_router(key.router)
    app.include_router(keys_report.router)
    app.include_router(system.router)
    app.include_router(metrics_router)
    app.include_router(admin_router.router)  # /admin/v1: admin keys only
    install_web(app)  # account pages, account API and their static files
    app.include_router(admin_audit.router)
    app.add_middleware(admin_audit.WebActor)  # the audit log's actor on the web pages: the visitor's account
    if fast_chat:  # POST /v1/chat/completions, past FastAPI's routing and dependencies (api/chat/fast_path.py)
        chat_route = next(r for r in chat_router.router.routes if getattr(r, "path", None) == chat_router.PATH)
        app.add_middleware(ChatFastPath, handlers=app.exception_handlers, route=chat_route)
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
    )
    return app
