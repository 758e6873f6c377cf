"""The application factory: the only place where engine, database and services are wired together."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import event

from aimichat.accounts import service as accounts
from aimichat.api import handlers, system, usage
from aimichat.api.chat import api_router as chat_router
from aimichat.api.chat.serving import ChatService
from aimichat.api.metrics import Metrics
from aimichat.api.metrics import router as metrics_router
from aimichat.api.middleware import RequestMiddleware
from aimichat.config import PUBLIC_MODEL_ID, Settings
from aimichat.engines.base import Engine
from aimichat.keys.cache import PrincipalCache
from aimichat.quota.backends import QuotaBackend, RedisQuota, SqlQuota
from aimichat.store.clock import Clock, utcnow
from aimichat.store.db import Database
from aimichat.web.site import install as install_web

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    """The engine ``settings`` ask for, not started: an upstream server, or llama.cpp in this process."""
    if settings.engine == "upstream":
        from aimichat.engines.openai_upstream import UpstreamEngine

        return UpstreamEngine.from_settings(settings)
    from aimichat.engines.llama import LlamaEngine

    return LlamaEngine(
        settings.model_path,
        model_id=PUBLIC_MODEL_ID,
        slots=settings.parallel,  # 1 answers one request at a time
        context_length=settings.context_length,
        threads=settings.threads,
        system_prompt=settings.system_prompt,
        repeat_penalty=settings.repeat_penalty,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
    )


def build_quota(settings: Settings, database: Database) -> QuotaBackend:
    if settings.redis_url:
        return RedisQuota.from_url(database, settings.redis_url, settings.redis_prefix)
    return SqlQuota(database)


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
) -> FastAPI:
    """Build the ASGI app. Pass ``engine``/``database``/``clock`` to share or control them (tests do)."""
    settings = settings or Settings()
    engine = engine or build_engine(settings)
    database = database or Database(settings.resolved_database_url())

    principals = PrincipalCache(settings.key_cache_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_database(database, settings)
        # Keys, accounts and tiers change through ORM sessions (web pages, tests); key lookups on the
        # request path use Core connections and never clear it.
        event.listen(database.sessions, "after_commit", principals.clear)
        try:
            await engine.start()
            yield
        finally:
            event.remove(database.sessions, "after_commit", principals.clear)
        if close_engine:
            await engine.close()

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
    app.state.engine = engine
    app.state.database = database
    app.state.principals = principals
    app.state.clock = clock
    app.state.started = int(time.time())
    app.state.metrics = Metrics(engine)
    app.state.quota = build_quota(settings, database)
    app.state.chat = ChatService(engine, app.state.quota, clock, settings.default_max_tokens, metrics=app.state.metrics)

    handlers.install(app)
    app.include_router(chat_router.router)
    app.include_router(usage.router)
    app.include_router(system.router)
    app.include_router(metrics_router)
    install_web(app)  # account pages, account API and their static files
    app.add_middleware(RequestMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
