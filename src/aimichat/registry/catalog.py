"""A snapshot of the registry: which models exist, their other names, who may use them, what they cost.

:func:`read_catalog` builds one from the database, the server's settings (which define ``aimichat-1``)
and what the registered upstreams listed; a :class:`Catalog` is immutable, so the request path reads
one without locks while a newer one is being built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Connection, select

from aimichat.config import PUBLIC_MODEL_ID, Settings
from aimichat.engines.configs import EmbeddedConfig, EngineConfig, UpstreamConfig
from aimichat.quota.pricing import Price
from aimichat.store.models import ModelAlias, ModelPrice, ModelRecord, ModelSource, RegistryVersion, Tier

DEFAULT_MODEL = PUBLIC_MODEL_ID
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")

Origin = Literal["settings", "registry", "discovered"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: EngineConfig
    origin: Origin  # settings: aimichat-1 as AIMICHAT_* define it; registry: added; discovered: listed by a source
    aliases: tuple[str, ...] = ()
    source: str | None = None  # discovered: the prefix of the source that listed it

    @property
    def kind(self) -> str:
        return self.config.kind


@dataclass(frozen=True)
class Source:
    """An upstream registered as a whole (``aimichat models discover``)."""

    id: int
    urls: tuple[str, ...]
    prefix: str
    api_key_env: str | None


@dataclass(frozen=True)
class Discovered:
    """One model an upstream's ``GET /v1/models`` listed."""

    id: str
    context_length: int | None = None


@dataclass(frozen=True)
class Catalog:
    version: int
    models: Mapping[str, ModelSpec]  # by public name, in the order they are listed
    aliases: Mapping[str, str] = field(default_factory=dict)
    tier_models: Mapping[str, frozenset[str] | None] = field(default_factory=dict)  # None: every model
    prices: Mapping[tuple[str, str], Price] = field(default_factory=dict)  # (tier, model)
    sources: tuple[Source, ...] = ()

    def resolve(self, name: str) -> ModelSpec | None:
        """The model ``name`` or one of its aliases stands for."""
        spec = self.models.get(name)
        if spec is None and name in self.aliases:
            spec = self.models.get(self.aliases[name])
        return spec

    def may_use(self, tier: str, model: str) -> bool:
        allowed = self.tier_models.get(tier)
        return allowed is None or model in allowed

    def visible(self, tier: str | None) -> list[ModelSpec]:
        """The models ``tier`` may use (every model for None)."""
        return [m for m in self.models.values() if tier is None or self.may_use(tier, m.name)]

    def default_for(self, tier: str) -> ModelSpec | None:
        """The model of a request that names none: aimichat-1, or the tier's first model."""
        spec = self.models.get(DEFAULT_MODEL)
        if spec is not None and self.may_use(tier, spec.name):
            return spec
        visible = self.visible(tier)
        return visible[0] if visible else None

    def price(self, tier: str, model: str, tier_rule: Price) -> Price:
        """The (tier, model) price, or the tier's own cost rule."""
        return self.prices.get((tier, model), tier_rule)


def settings_model(settings: Settings) -> ModelSpec:
    """``aimichat-1`` as today's settings define it (AIMICHAT_ENGINE, AIMICHAT_MODEL_PATH, AIMICHAT_UPSTREAM_*,
    AIMICHAT_DEFAULT_TEMPERATURE and _TOP_P)."""
    config: EngineConfig
    temperature: float | None = settings.default_temperature
    top_p: float | None = settings.default_top_p
    if settings.engine == "upstream":
        from aimichat.engines.openai_upstream import parse_urls

        urls = tuple(parse_urls(settings.upstream_url))
        # The defaults were measured on the bundled model: an upstream's own model keeps the server's (or
        # OpenAI's) defaults unless the operator set these settings.
        given = settings.model_fields_set
        temperature = temperature if "default_temperature" in given else None
        top_p = top_p if "default_top_p" in given else None
        config = UpstreamConfig(urls, settings.upstream_model, temperature=temperature, top_p=top_p)
    else:
        config = EmbeddedConfig(gguf=settings.model_path, temperature=temperature, top_p=top_p)
    return ModelSpec(DEFAULT_MODEL, config, "settings")


def check_name(name: str, what: str = "model name") -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: 1 to 128 letters, digits and . _ : / @ + -, starting with a letter or digit"
        )
    return name


def config_from_record(engine: str, config: Mapping[str, object]) -> EngineConfig:
    data = dict(config)
    return UpstreamConfig.from_json(data) if engine == "upstream" else EmbeddedConfig.from_json(data)


def make_price(per_request: int | None, prompt_per_1m: float | None, completion_per_1m: float | None) -> Price:
    """The price a ``model_prices`` row holds."""
    if per_request is not None:
        return Price(per_request=per_request)
    return Price.per_token(prompt_per_1m or 0, completion_per_1m or 0)


def read_version(conn: Connection) -> int:
    return int(conn.execute(select(RegistryVersion.version).where(RegistryVersion.id == 1)).scalar() or 0)


def read_sources(conn: Connection) -> list[Source]:
    result = conn.execute(
        select(ModelSource.id, ModelSource.urls, ModelSource.prefix, ModelSource.api_key_env).order_by(ModelSource.id)
    )
    return [Source(r.id, tuple(r.urls), r.prefix, r.api_key_env) for r in result]


def read_catalog(
    conn: Connection,
    settings: Settings,
    discovered: Mapping[int, list[Discovered]] | None = None,
    *,
    default: ModelSpec | None = None,
) -> Catalog:
    """The registry as it stands: ``default`` (aimichat-1 from the settings) first, then the database's
    models (which may redefine or hide it), then what each source listed, where the name is free."""
    version = read_version(conn)
    models: dict[str, ModelSpec] = {}
    default = default or settings_model(settings)
    models[default.name] = default
    hidden: set[str] = set()
    rows = conn.execute(
        select(ModelRecord.name, ModelRecord.engine, ModelRecord.config, ModelRecord.enabled).order_by(ModelRecord.id)
    )
    for name, engine, config, enabled in rows:
        if not enabled:
            hidden.add(name)
            models.pop(name, None)
            continue
        models[name] = ModelSpec(name, config_from_record(engine, config or {}), "registry")
    sources = read_sources(conn)
    for source in sources:
        for item in (discovered or {}).get(source.id, []):
            name = source.prefix + item.id
            if name in models or name in hidden or not NAME_PATTERN.match(name):
                continue
            listed = UpstreamConfig(
                urls=source.urls,
                upstream_model=item.id,
                api_key_env=source.api_key_env,
                context_length=item.context_length,
            )
            models[name] = ModelSpec(name, listed, "discovered", source=source.prefix)
    aliases: dict[str, str] = {}
    for alias, target in conn.execute(select(ModelAlias.alias, ModelAlias.model).order_by(ModelAlias.alias)):
        if alias not in models:
            aliases[alias] = target
    by_model: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        by_model.setdefault(target, []).append(alias)
    models = {
        name: ModelSpec(spec.name, spec.config, spec.origin, tuple(by_model.get(name, ())), spec.source)
        for name, spec in models.items()
    }
    tier_models: dict[str, frozenset[str] | None] = {}
    for tier_name, allowed in conn.execute(select(Tier.name, Tier.models)):
        tier_models[tier_name] = None if allowed is None else frozenset(allowed)
    prices: dict[tuple[str, str], Price] = {}
    price_rows = conn.execute(
        select(
            Tier.name, ModelPrice.model, ModelPrice.per_request, ModelPrice.prompt_per_1m, ModelPrice.completion_per_1m
        ).join(Tier, Tier.id == ModelPrice.tier_id)
    )
    for tier_name, model, per_request, prompt_price, completion_price in price_rows:
        prices[(tier_name, model)] = make_price(per_request, prompt_price, completion_price)
    return Catalog(version, models, aliases, tier_models, prices, tuple(sources))


def context_length(spec: ModelSpec, settings: Settings) -> int | None:
    """The context window a request to ``spec`` gets, when known."""
    if isinstance(spec.config, EmbeddedConfig):
        return spec.config.context_length or settings.context_length
    return spec.config.context_length
