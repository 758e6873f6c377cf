"""The models this replica serves now: the newest :class:`~.catalog.Catalog` and one engine per model.

Every replica polls the registry's version number (one indexed read every ``registry_poll_seconds``)
and, when it moved, reads the catalog again and brings its engines in line: new models are built and
loaded, changed ones rebuilt, removed ones closed once their running requests are done. A change made
anywhere is served everywhere within a poll interval plus the time to load the model.

Embedded models share the host's cores: each one without its own ``threads`` gets an equal share of
what the others leave, re-split whenever a model loads or unloads, since llama.cpp's threads spin
while they wait and oversubscribed cores slow every model down several-fold (3-6x measured here).

A model that cannot load (its GGUF missing on this replica, a bad file) is unready here, and only it:
requests for it get a 503 naming the reason, ``/readyz`` lists it, the other models carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool

from aimichat.config import Settings
from aimichat.engines.base import Engine, EngineStats
from aimichat.engines.configs import EmbeddedConfig, build_engine
from aimichat.store.db import Database

from .catalog import DEFAULT_MODEL, Catalog, Discovered, ModelSpec, Source, read_catalog, read_version, settings_model

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSpec, int | None], Engine]  # (the model, its share of threads) -> an engine
RETIRE_GRACE_SECONDS = 120.0  # how long a removed model's running requests may take before its engine closes


class ModelLookupError(Exception):
    """A request names a model this replica will not serve it; ``code`` and ``status`` say why."""

    status = 404
    code = "model_not_found"


class UnknownModel(ModelLookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"The model '{name}' does not exist. GET /v1/models lists the models you may use.")


class ModelNotOnPlan(ModelLookupError):
    def __init__(self, name: str, tier: str) -> None:
        super().__init__(
            f"The model '{name}' is not available on your plan ({tier}). GET /v1/models lists the models you may use."
        )


class ModelUnavailable(ModelLookupError):
    status = 503
    code = "model_unavailable"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"The model '{name}' is not available on this server right now: {reason}")


@dataclass
class Served:
    """One model and its engine on this replica."""

    spec: ModelSpec
    engine: Engine | None = None  # None until loaded (on demand, still loading, or failed)
    error: str | None = None  # why it could not load
    auto_threads: bool = False  # its threads are a share of the cores, re-split as models come and go
    loading: asyncio.Task[None] | None = None
    last_used: float = field(default_factory=time.monotonic)
    unloaded: bool = False  # unloaded after idling: loads again at its next request

    @property
    def lazy(self) -> bool:
        on_demand = isinstance(self.spec.config, EmbeddedConfig) and self.spec.config.load_on_demand
        return on_demand or self.unloaded

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None


@dataclass(frozen=True)
class ModelStatus:
    name: str
    kind: str
    origin: str
    ready: bool
    state: str  # ready | loading | unloaded (loads on first use) | failed | unreachable | not ready
    error: str | None
    stats: EngineStats | None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.name, "engine": self.kind, "origin": self.origin, "ready": self.ready}
        body["state"] = self.state
        if self.error:
            body["error"] = self.error
        if self.stats is not None:
            body |= {"running": self.stats.running, "queued": self.stats.queued}
        return body


class LiveModels:
    """The registry as this replica serves it. Start with :meth:`start`, stop with :meth:`close`."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        *,
        default_engine: Engine | None = None,
        factory: EngineFactory | None = None,
        default_auto_threads: bool = False,
        cores: int | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.factory: EngineFactory = factory or (
            lambda spec, threads: build_engine(spec.name, spec.config, settings, threads=threads)
        )
        self.cores = cores or len(os.sched_getaffinity(0))
        self._default_engine = default_engine
        self._default_auto_threads = default_auto_threads
        self._default_spec = settings_model(settings)
        self._default_started = False
        self.catalog = Catalog(0, {self._default_spec.name: self._default_spec})
        self._served: dict[str, Served] = {}
        self._discovered: dict[int, list[Discovered]] = {}
        self._unreachable: dict[int, str] = {}  # source id -> why its last listing failed
        self._discovered_at: dict[int, float] = {}
        self._stale = False
        self._refreshing = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the registry, discover, load every model that loads at start; aimichat-1 as the settings
        define it must load (as before the registry existed), the others may fail on their own."""
        self._http = httpx.AsyncClient(timeout=self.settings.upstream_connect_timeout)
        catalog = await self._read()
        default = catalog.models.get(DEFAULT_MODEL)
        if default is not None and default.origin == "settings" and self._default_engine is not None:
            await self._default_engine.start()
            self._default_started = True
            self._served[DEFAULT_MODEL] = Served(default, self._default_engine, auto_threads=self._default_auto_threads)
        await self._apply(catalog, wait=True)
        if self.settings.registry_poll_seconds > 0:
            self._poller = asyncio.create_task(self._poll_forever(), name="aimichat-registry")

    async def close(self, *, keep: Engine | None = None) -> None:
        """Stop polling and close every engine but ``keep`` (an engine the caller shares elsewhere).
        The settings' engine of aimichat-1 is closed here only: hidden, it stays loaded, for when it returns."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._tasks):
            task.cancel()
        served, self._served = list(self._served.values()), {}
        if (
            self._default_engine is not None
            and self._default_started
            and all(item.engine is not self._default_engine for item in served)
        ):
            served.append(Served(self._default_spec, self._default_engine))  # hidden, but started
        for item in served:
            if item.loading is not None:
                item.loading.cancel()
            if item.engine is not None and item.engine is not keep:
                with contextlib.suppress(Exception):
                    await item.engine.close()
        if self._http is not None:
            await self._http.aclose()

    def mark_stale(self, *_: object) -> None:
        """A local commit may have changed the registry: check its version before the next request."""
        self._stale = True

    # -- the request path ----------------------------------------------------------------------

    async def current(self) -> Catalog:
        """The newest catalog, re-read first when a local commit may have changed the registry."""
        if self._stale:
            await self.refresh()
        return self.catalog

    async def resolve(self, name: str | None, tier: str) -> Served:
        """The model a request names (or this tier's default), loaded; raises a ModelLookupError."""
        catalog = await self.current()
        spec = catalog.resolve(name) if name is not None else catalog.default_for(tier)
        if spec is None:
            raise UnknownModel(name or DEFAULT_MODEL)
        if not catalog.may_use(tier, spec.name):
            raise ModelNotOnPlan(name or spec.name, tier)
        served = self._served.get(spec.name)
        if served is None:
            raise ModelUnavailable(spec.name, "it is being set up; retry shortly")
        served.last_used = time.monotonic()
        if served.engine is None:
            if served.loading is None and served.lazy:
                self._load(served)
            if served.loading is not None:
                await asyncio.shield(served.loading)
            if served.engine is None:
                raise ModelUnavailable(spec.name, served.error or "it is not loaded")
        return served

    # -- keeping up with the registry ----------------------------------------------------------

    async def refresh(self, *, discover: bool = False, new_sources: bool = False) -> None:
        """Bring this replica in line with the registry now (the poller does this on its own).

        ``discover``: read every source's model list again; ``new_sources``: read those never read. The
        request path does neither (a source that does not answer would hold the request for a connect
        timeout); the poller does both, the first when due."""
        async with self._refreshing:
            self._stale = False
            version = await run_in_threadpool(self._version)
            if version == self.catalog.version and not discover:
                return
            await self._apply(await self._read(discover=discover, new_sources=new_sources or discover))

    def _version(self) -> int:
        with self.database.connect() as conn:
            return read_version(conn)

    async def _read(self, *, discover: bool = True, new_sources: bool = True) -> Catalog:
        def sources() -> list[Source]:
            from .catalog import read_sources

            with self.database.connect() as conn:
                return read_sources(conn)

        listed = await run_in_threadpool(sources)
        known = {s.id for s in listed}
        for gone in set(self._discovered) - known:
            self._discovered.pop(gone, None)
            self._unreachable.pop(gone, None)
            self._discovered_at.pop(gone, None)
        due = [s for s in listed if discover or (new_sources and s.id not in self._discovered_at)]
        if due:
            await asyncio.gather(*(self._discover(s) for s in due))

        def read() -> Catalog:
            with self.database.connect() as conn:
                return read_catalog(conn, self.settings, self._discovered, default=self._default_spec)

        return await run_in_threadpool(read)

    def _discovery_due(self) -> bool:
        """A source's list is older than the discovery interval, or a source was never read."""
        interval = self.settings.discovery_interval
        if any(time.monotonic() - at >= interval for at in self._discovered_at.values()):
            return True
        return any(s.id not in self._discovered_at for s in self.catalog.sources)

    async def _discover(self, source: Source) -> None:
        """Read the source's model list; on failure keep the last one, its models then reported unready."""
        assert self._http is not None
        api_key = os.environ.get(source.api_key_env, "") if source.api_key_env else ""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._discovered_at[source.id] = time.monotonic()
        failures = []
        for url in source.urls:
            try:
                response = await self._http.get(url + "/models", headers=headers)
                response.raise_for_status()
                items = response.json().get("data", [])
                self._discovered[source.id] = [
                    _discovered(item) for item in items if isinstance(item, dict) and item.get("id")
                ]
                self._unreachable.pop(source.id, None)
                return
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                failures.append(f"{url}: {type(exc).__name__}")
        self._unreachable[source.id] = "; ".join(failures)
        self._discovered.setdefault(source.id, [])
        log.warning("could not list the models of %s: %s", ", ".join(source.urls), self._unreachable[source.id])

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_seconds)
            try:
                await self.refresh(discover=self._discovery_due(), new_sources=True)
                await self._unload_idle()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be down for a while: keep serving what we have
                log.warning("could not read the model registry; serving the models known so far", exc_info=True)

    async def _apply(self, catalog: Catalog, *, wait: bool = False) -> None:
        """Make the engines match ``catalog``."""
        old = self._served
        new: dict[str, Served] = {}
        for name, spec in catalog.models.items():
            current = old.get(name)
            if current is not None and current.spec.config == spec.config:
                current.spec = spec  # aliases and origin may have changed; the engine has not
                new[name] = current
                continue
            if spec.origin == "settings" and self._default_started:  # aimichat-1 shown again: its engine is loaded
                new[name] = Served(spec, self._default_engine, auto_threads=self._default_auto_threads)
                continue
            new[name] = Served(spec, auto_threads=_auto_threads(spec))
        retired = [item for name, item in old.items() if new.get(name) is not item]
        self._served = new
        self.catalog = catalog
        for item in retired:
            self._retire(item)
        loads = [
            self._load(item) for item in new.values() if item.engine is None and item.loading is None and not item.lazy
        ]
        self._share_threads()
        if wait and loads:
            await asyncio.gather(*loads, return_exceptions=True)
        if retired or loads:
            log.info(
                "serving %d models (registry version %d): %s",
                len(new), catalog.version, ", ".join(new) or "none",
            )  # fmt: skip

    def _load(self, item: Served) -> asyncio.Task[None]:
        task = asyncio.create_task(self._build_and_start(item), name=f"aimichat-load-{item.spec.name}")
        item.loading = task
        return task

    async def _build_and_start(self, item: Served) -> None:
        try:
            engine = self.factory(item.spec, self._share_for(item))
            await engine.start()
        except Exception as exc:
            item.error = str(exc) or type(exc).__name__
            log.error("model %s could not load: %s", item.spec.name, item.error)
        else:
            if self._served.get(item.spec.name) is not item:  # removed while it loaded
                await engine.close()
                return
            item.engine, item.error, item.unloaded = engine, None, False
            item.last_used = time.monotonic()
        finally:
            item.loading = None
            self._share_threads()

    def _retire(self, item: Served) -> None:
        if item.loading is not None:
            item.loading.cancel()
        if item.engine is not None and item.engine is not self._default_engine:
            engine, item.engine = item.engine, None
            self._spawn(self._close_when_idle(item.spec.name, engine))

    async def _close_when_idle(self, name: str, engine: Engine) -> None:
        deadline = time.monotonic() + RETIRE_GRACE_SECONDS
        while time.monotonic() < deadline:
            stats = engine.stats()
            if not stats.running and not stats.queued:
                break
            await asyncio.sleep(0.25)
        try:
            await engine.close()
        except Exception:
            log.warning("closing the engine of %s failed", name, exc_info=True)
        self._share_threads()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload_idle(self) -> None:
        now = time.monotonic()
        for item in list(self._served.values()):
            config = item.spec.config
            if not isinstance(config, EmbeddedConfig) or config.idle_unload is None or item.engine is None:
                continue
            stats = item.engine.stats()
            if stats.running or stats.queued or now - item.last_used < config.idle_unload:
                continue
            log.info("unloading %s after %.0f s unused", item.spec.name, now - item.last_used)
            engine, item.engine, item.unloaded = item.engine, None, True
            await engine.close()
            self._share_threads()

    # -- cores ---------------------------------------------------------------------------------

    def _embedded_loaded(self) -> list[Served]:
        return [
            s for s in self._served.values()
            if isinstance(s.spec.config, EmbeddedConfig) and (s.engine is not None or s.loading is not None)
        ]  # fmt: skip

    def _share_for(self, item: Served) -> int | None:
        """The threads of an auto-threaded embedded model: what explicit ones leave, split evenly."""
        if not item.auto_threads:
            return None
        loaded = [s for s in self._embedded_loaded() if s is not item]
        fixed = sum(_fixed_threads(s, self.settings) for s in loaded if not s.auto_threads)
        sharing = sum(1 for s in loaded if s.auto_threads) + 1
        return max(1, (self.cores - fixed) // sharing)

    def _share_threads(self) -> None:
        for item in self._embedded_loaded():
            if item.auto_threads and item.engine is not None:
                share = self._share_for(item)
                set_threads = getattr(item.engine, "set_threads", None)
                if share is not None and set_threads is not None and getattr(item.engine, "threads", share) != share:
                    set_threads(share)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        result = []
        unreachable_prefixes = {
            s.prefix: self._unreachable[s.id] for s in self.catalog.sources if s.id in self._unreachable
        }
        for name, item in self._served.items():
            stats = item.stats()
            error = item.error
            if item.spec.source is not None and item.spec.source in unreachable_prefixes:
                state, ready, error = "unreachable", False, unreachable_prefixes[item.spec.source]
            elif item.engine is not None:
                ready = bool(stats and stats.ready)
                state = "ready" if ready else "not ready"
            elif item.loading is not None:
                state, ready = "loading", False
            elif item.error is not None:
                state, ready = "failed", False
            else:
                state, ready = "unloaded", True  # loads on its first request
            result.append(ModelStatus(name, item.spec.kind, item.spec.origin, ready, state, error, stats))
        return result

    def served(self, name: str) -> Served | None:
        return self._served.get(name)


def _auto_threads(spec: ModelSpec) -> bool:
    return isinstance(spec.config, EmbeddedConfig) and spec.config.threads is None


def _fixed_threads(item: Served, settings: Settings) -> int:
    config = item.spec.config
    if isinstance(config, EmbeddedConfig) and config.threads is not None:
        return config.threads
    return int(getattr(item.engine, "threads", settings.threads))


def _discovered(item: dict[str, Any]) -> Discovered:
    length = None
    for key in ("max_model_len", "context_length", "context_window"):
        if isinstance(item.get(key), int):
            length = item[key]
            break
    return Discovered(str(item["id"]), length)
