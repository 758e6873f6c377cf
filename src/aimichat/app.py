"""The application factory: the only place where engine, database and services are wired together."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import event

from aimichat.accounts import service as accounts
from aimichat.api import errors, system, usage
from aimichat.api.chat import api_router as chat_router
from aimichat.api.chat.serving import ChatService
from aimichat.api.metrics import Metrics
from aimichat.api.metrics import router as metrics_router
from aimichat.api.middleware import RequestMiddleware
from aimichat.config import PUBLIC_MODEL_ID, Settings
from aimichat.engines.base import Engine
from aimichat.keys.cache import PrincipalCache
from aimichat.quota.backends import QuotaBackend, RedisQuota, SqlQuota
from aimichat.quota.periods import Clock, system_clock
from aimichat.store.db import Database
from aimichat.web.site import install as install_web

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "upstream":
        from aimichat.engines.openai_upstream import UpstreamEngine

        return UpstreamEngine.from_settings(settings)
    common = dict(
        model_id=PUBLIC_MODEL_ID,
        context_length=settings.context_length,
        threads=settings.threads,
        system_prompt=settings.system_prompt,
        repeat_penalty=settings.repeat_penalty,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
    )
    if settings.parallel > 1:
        from aimichat.engines.batched import BatchedEngine

        return BatchedEngine(settings.model_path, slots=settings.parallel, **common)
    from aimichat.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(settings.model_path, **common)


def build_quota(settings: Settings, db: Database) -> QuotaBackend:
    if settings.redis_url:
        return RedisQuota.from_url(db, settings.redis_url, settings.redis_prefix)
    return SqlQuota(db)


def prepare_database(db: Database, settings: Settings) -> None:
    """Apply pending migrations and make sure the default tier exists."""
    db.upgrade()
    with db.session() as session:
        if accounts.ensure_default_tier(session, settings.default_tier):
            log.info("created the %r tier (100 daily credits)", settings.default_tier)
        session.commit()


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    db: Database | None = None,
    clock: Clock = system_clock,
    close_engine: bool = True,
) -> FastAPI:
    """Build the ASGI app. Pass ``engine``/``db``/``clock`` to share or control them (tests do)."""
    settings = settings or Settings()
    engine = engine or build_engine(settings)
    db = db or Database(settings.resolved_database_url())

    principals = PrincipalCache(settings.key_cache_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        prepare_database(db, settings)
        # Keys, accounts and tiers change through ORM sessions (web pages, tests); key lookups on the
        # request path use Core connections and never clear it.
        event.listen(db.sessions, "after_commit", principals.clear)
        try:
            await engine.start()
            yield
        finally:
            event.remove(db.sessions, "after_commit", principals.clear)
        if close_engine:
            await engine.close()

    app = FastAPI(title="AimiChat", version="0.1.0", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.db = db
    app.state.principals = principals
    app.state.clock = clock
    app.state.started = int(time.time())
    app.state.metrics = Metrics(engine)
    app.state.quota = build_quota(settings, db)
    app.state.chat = ChatService(engine, app.state.quota, clock, settings.default_max_tokens, metrics=app.state.metrics)

    errors.install(app)
    app.include_router(chat_router.router)
    app.include_router(usage.router)
    app.include_router(system.router)
    app.include_router(metrics_router)
    install_web(app)  # account pages, account API and their static files
    app.add_middleware(RequestMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
