"""The registry's rules: plain functions over a SQLAlchemy session, shared by the CLI, the admin pages
and the tests. Every change bumps :class:`~aimichat.store.models.RegistryVersion` in the same
transaction, which is how every replica learns of it (``registry.live`` polls the number).

Raises ``ValueError`` (with a message for people) for anything it refuses.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from aimichat.audit import service as audit
from aimichat.config import Settings
from aimichat.engines.configs import EmbeddedConfig, EngineConfig, UpstreamConfig
from aimichat.quota.pricing import Price
from aimichat.store.clock import utcnow
from aimichat.store.models import ModelAlias, ModelPrice, ModelRecord, ModelSource, RegistryVersion, Tier

from .catalog import DEFAULT_MODEL, ModelSpec, check_name, config_from_record, context_length, make_price

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_PER_REQUEST = 2**31 - 1  # the column is a 32-bit integer on PostgreSQL


def bump(session: Session) -> None:
    """Tell every replica the registry changed (the caller commits)."""
    changed = session.execute(
        update(RegistryVersion).where(RegistryVersion.id == 1).values(version=RegistryVersion.version + 1)
    )
    if not getattr(changed, "rowcount", 0):
        session.add(RegistryVersion(id=1, version=1))
    session.flush()


# -- models --------------------------------------------------------------------------------------


def add_embedded(
    session: Session,
    name: str,
    *,
    gguf: Path | str | None = None,
    parallel: int | None = None,
    context_length: int | None = None,
    threads: int | None = None,
    system_prompt: str | None = None,
    load_on_demand: bool = False,
    idle_unload: float | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> ModelRecord:
    """Add (or redefine) a model run in-process from a GGUF file. The file is checked where it is
    served: a replica without it reports the model unready."""
    if parallel is not None and not 1 <= parallel <= 256:
        raise ValueError("parallel must be between 1 and 256")
    if context_length is not None and context_length < 256:
        raise ValueError("context length must be at least 256 tokens")
    if threads is not None and threads < 1:
        raise ValueError("threads must be at least 1")
    if idle_unload is not None and idle_unload <= 0:
        raise ValueError("idle unload must be a positive number of seconds")
    check_sampling(temperature, top_p)
    try:
        path = Path(gguf).expanduser().resolve() if gguf else None
    except RuntimeError as exc:  # "~nosuchuser/x": pathlib cannot expand it
        raise ValueError(f"not a usable path: {gguf} ({exc})") from None
    config = EmbeddedConfig(
        gguf=path,
        parallel=parallel,
        context_length=context_length,
        threads=threads,
        system_prompt=system_prompt,
        load_on_demand=load_on_demand,
        idle_unload=idle_unload,
        temperature=temperature,
        top_p=top_p,
    )
    return _put(session, name, config)


def add_upstream(
    session: Session,
    name: str,
    urls: str | Sequence[str],
    *,
    upstream_model: str = "",
    api_key_env: str | None = None,
    system_prompt: str | None = None,
    context_length: int | None = None,
    multimodal: bool = False,
    strip_fields: str | Sequence[str] = (),
    refuse_fields: str | Sequence[str] = (),
    temperature: float | None = None,
    top_p: float | None = None,
) -> ModelRecord:
    """Add (or redefine) a model served by OpenAI-compatible servers: the first URL first, the rest on failure.
    ``multimodal``: it reads images and other content parts; ``strip_fields`` / ``refuse_fields``: request
    fields removed before the request goes upstream / refused with a 400."""
    if context_length is not None and context_length < 1:
        raise ValueError("context length must be a positive number of tokens")
    check_sampling(temperature, top_p)
    config = UpstreamConfig(
        urls=tuple(_urls(urls)),
        upstream_model=upstream_model,
        api_key_env=_env_name(api_key_env),
        system_prompt=system_prompt,
        context_length=context_length,
        multimodal=multimodal,
        strip_fields=_field_names(strip_fields),
        refuse_fields=_field_names(refuse_fields),
        temperature=temperature,
        top_p=top_p,
    )
    return _put(session, name, config)


SAMPLING = ("temperature", "top_p")


def check_sampling(temperature: float | None, top_p: float | None) -> None:
    """A model's default sampling takes the values a request may send (OpenAI's ranges; NaN is in none)."""
    if temperature is not None and not (_number(temperature) and 0 <= temperature <= 2):
        raise ValueError("temperature must be a number between 0 and 2")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        raise ValueError("top_p must be a number above 0 and at most 1")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)  # a TOML `true` is no temperature


def set_sampling(session: Session, name: str, changes: Mapping[str, float | None]) -> ModelRecord:
    """Change a registered model's default sampling: the ``temperature`` and ``top_p`` a request that sends
    none gets (None removes one: OpenAI's 1.0); its other settings stay."""
    unknown = sorted(set(changes) - set(SAMPLING))
    if unknown:
        raise ValueError(f"not a sampling setting: {', '.join(unknown)}")
    check_sampling(changes.get("temperature"), changes.get("top_p"))
    record = session.scalar(select(ModelRecord).where(ModelRecord.name == name, ModelRecord.enabled))
    if record is None and name == DEFAULT_MODEL:
        raise ValueError(
            f"{name} is defined by the settings: set AIMICHAT_DEFAULT_TEMPERATURE and AIMICHAT_DEFAULT_TOP_P, "
            f"or redefine it with `aimichat models add {name} ...`"
        )
    if record is None:
        raise ValueError(f"no model named {name!r} in the registry (a discovered model takes its source's defaults)")
    config = config_from_record(record.engine, record.config or {})
    temperature = changes.get("temperature", config.temperature)  # a None given removes it
    top_p = changes.get("top_p", config.top_p)
    return _put(session, name, replace(config, temperature=temperature, top_p=top_p))


FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


def _field_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """Request field names, from a list or a comma-separated string."""
    items = names.split(",") if isinstance(names, str) else list(names)
    cleaned = tuple(dict.fromkeys(name.strip() for name in items if name.strip()))
    bad = [name for name in cleaned if not FIELD_NAME.match(name)]
    if bad:
        raise ValueError(f"not a request field name: {', '.join(bad)}")
    protected = {"messages", "model", "stream"} & set(cleaned)
    if protected:
        raise ValueError(f"{', '.join(sorted(protected))} cannot be stripped or refused")
    return cleaned


def _urls(urls: str | Sequence[str]) -> list[str]:
    from aimichat.engines.openai_upstream import parse_urls

    return parse_urls(urls)


def _env_name(name: str | None) -> str | None:
    if name is None or name == "":
        return None
    if not ENV_NAME.match(name):
        raise ValueError(
            f"--api-key-env takes the NAME of an environment variable (e.g. OLLAMA_API_KEY), not a key: got {name[:4]}…"
        )
    return name


def _put(session: Session, name: str, config: EngineConfig) -> ModelRecord:
    check_name(name)
    if session.get(ModelAlias, name) is not None:
        raise ValueError(f"{name!r} is an alias; remove it first (aimichat models unalias {name})")
    now = utcnow()
    record = session.scalar(select(ModelRecord).where(ModelRecord.name == name))
    if record is None:
        record = ModelRecord(name=name, created_at=now)
        session.add(record)
    record.engine = config.kind
    record.config = config.as_json()
    record.enabled = True
    record.updated_at = now
    bump(session)
    audit.note(session, "model.saved", f"model:{name}", {"engine": config.kind})
    return record


def remove_model(session: Session, name: str) -> bool:
    """Stop serving ``name`` everywhere; its aliases and prices go with it. The built-in ``aimichat-1``
    and discovered models are hidden (a disabled row), since their definition lives elsewhere: True
    when ``name`` was hidden (``restore_model`` brings it back) rather than deleted."""
    record = session.scalar(select(ModelRecord).where(ModelRecord.name == name))
    # A source without a prefix may list any name, so any name may be one of its models.
    hideable = name == DEFAULT_MODEL or any(name.startswith(s.prefix) for s in _sources(session))
    if record is None and session.get(ModelAlias, name) is not None:
        raise ValueError(f"{name!r} is an alias; remove it with: aimichat models unalias {name}")
    if record is None and not hideable:
        raise ValueError(f"no model named {name!r}")
    if record is not None and hideable and not record.enabled:  # deleting the row would serve it again
        raise ValueError(f"{name!r} is already removed (aimichat models restore {name} serves it again)")
    hidden = hideable
    if record is not None and not (hideable and record.enabled):
        session.delete(record)
    elif record is not None:
        record.enabled, record.config, record.updated_at = False, {}, utcnow()
    else:
        now = utcnow()
        session.add(ModelRecord(name=name, engine="hidden", config={}, enabled=False, created_at=now, updated_at=now))
    session.execute(delete(ModelAlias).where(ModelAlias.model == name))
    session.execute(delete(ModelPrice).where(ModelPrice.model == name))
    bump(session)
    audit.note(session, "model.hidden" if hidden else "model.removed", f"model:{name}")
    return hidden


def hidden_models(session: Session) -> list[str]:
    """The built-in or discovered models ``remove_model`` hid (``restore_model`` serves them again)."""
    query = select(ModelRecord.name).where(ModelRecord.enabled.is_(False)).order_by(ModelRecord.name)
    return list(session.scalars(query))


def model_json(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """A model as ``models list --json`` and the admin API show it: what it is, where from, its context
    window, then its engine's settings (null: the server's setting of the same name)."""
    engine_settings = {
        key: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        for key, value in asdict(spec.config).items()
        if key != "context_length"
    }
    return {
        "name": spec.name,
        "engine": spec.kind,
        "origin": spec.origin,
        "aliases": list(spec.aliases),
        "context_length": context_length(spec, settings),
        "source": spec.source,
        **engine_settings,
    }


def restore_model(session: Session, name: str) -> None:
    """Serve a hidden built-in or discovered model again."""
    record = session.scalar(select(ModelRecord).where(ModelRecord.name == name, ModelRecord.enabled.is_(False)))
    if record is None:
        raise ValueError(f"{name!r} is not hidden")
    session.delete(record)
    bump(session)
    audit.note(session, "model.restored", f"model:{name}")


def add_alias(session: Session, name: str, alias: str) -> ModelAlias:
    """Make ``alias`` another name of ``name`` (e.g. gpt-4o-mini for aimichat-1). ``name`` must be a model
    (or a name a source may list): an alias of a typo would be accepted and never work."""
    if alias == DEFAULT_MODEL and not _hidden(session, DEFAULT_MODEL):
        raise ValueError(f"{alias!r} is already a model's name")
    if session.get(ModelAlias, name) is None and not _may_be_model(session, name):
        raise ValueError(f"no model named {name!r}")
    return _set_alias(session, name, alias)


def _hidden(session: Session, name: str) -> bool:
    return (
        session.scalar(select(ModelRecord.id).where(ModelRecord.name == name, ModelRecord.enabled.is_(False)))
        is not None
    )


def _may_be_model(session: Session, name: str) -> bool:
    """Whether ``name`` is served, or may be: a source's listing is not known here."""
    if session.scalar(select(ModelRecord.id).where(ModelRecord.name == name, ModelRecord.enabled)) is not None:
        return True
    if _hidden(session, name):
        return False
    return name == DEFAULT_MODEL or any(name.startswith(s.prefix) for s in _sources(session))


def _set_alias(session: Session, name: str, alias: str) -> ModelAlias:
    """The alias rules a file imported as a whole must keep too."""
    check_name(alias, "alias")
    if alias == name:
        raise ValueError("an alias must differ from the model's name")
    if session.scalar(select(ModelRecord.id).where(ModelRecord.name == alias, ModelRecord.enabled)) is not None:
        raise ValueError(f"{alias!r} is already a model's name")
    if session.get(ModelAlias, name) is not None:
        raise ValueError(f"{name!r} is itself an alias; point the alias at the model")
    row = session.get(ModelAlias, alias) or ModelAlias(alias=alias)
    row.model = name
    session.add(row)
    bump(session)
    audit.note(session, "alias.added", f"alias:{alias}", {"model": name})
    return row


def remove_alias(session: Session, alias: str) -> None:
    row = session.get(ModelAlias, alias)
    if row is None:
        raise ValueError(f"no alias named {alias!r}")
    session.delete(row)
    bump(session)
    audit.note(session, "alias.removed", f"alias:{alias}", {"model": row.model})


# -- sources (discovery) -------------------------------------------------------------------------


def add_source(
    session: Session, urls: str | Sequence[str], *, prefix: str = "", api_key_env: str | None = None
) -> ModelSource:
    """Register an upstream as a whole: every model its /v1/models lists is served as ``prefix + id``.
    One source per prefix; registering a prefix again replaces its URLs."""
    if prefix and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63}$", prefix):
        raise ValueError(f"invalid prefix {prefix!r}")
    source = session.scalar(select(ModelSource).where(ModelSource.prefix == prefix))
    if source is None:
        source = ModelSource(prefix=prefix, created_at=utcnow())
        session.add(source)
    source.urls = _urls(urls)
    source.api_key_env = _env_name(api_key_env)
    bump(session)
    # Not the URLs: one may carry a password (http://user:pass@host).
    audit.note(session, "source.saved", f"source:{prefix}", {"urls": len(source.urls), "api_key_env": api_key_env})
    return source


def remove_source(session: Session, prefix: str) -> None:
    source = session.scalar(select(ModelSource).where(ModelSource.prefix == prefix))
    if source is None:
        raise ValueError(f"no discovered upstream with prefix {prefix!r}")
    session.delete(source)
    bump(session)
    audit.note(session, "source.removed", f"source:{prefix}")


def list_sources(session: Session) -> list[ModelSource]:
    """The discovered upstreams, in the order they were registered."""
    return _sources(session)


def _sources(session: Session) -> list[ModelSource]:
    return list(session.scalars(select(ModelSource).order_by(ModelSource.id)))


# -- tier access and prices ----------------------------------------------------------------------


def set_tier_models(session: Session, tier: str, models: Iterable[str] | None) -> Tier:
    """The models ``tier`` may use; None: every model (the default)."""
    row = _tier(session, tier)
    row.models = None if models is None else sorted({check_name(m.strip()) for m in models if m.strip()})
    bump(session)
    audit.note(session, "tier.models_changed", f"tier:{tier}", {"models": row.models})
    return row


def _tier(session: Session, name: str) -> Tier:
    tier = session.scalar(select(Tier).where(Tier.name == name))
    if tier is None:
        raise ValueError(f"unknown tier {name!r}")
    return tier


def set_price(
    session: Session,
    tier: str,
    model: str,
    *,
    per_request: int | None = None,
    prompt_per_1m: float | None = None,
    completion_per_1m: float | None = None,
) -> ModelPrice:
    """What ``tier`` pays for ``model``: ``per_request`` credits, or prompt and completion prices per 1M tokens."""
    by_tokens = prompt_per_1m is not None or completion_per_1m is not None
    if (per_request is None) == (not by_tokens):
        raise ValueError("give either a per-request price or prompt and completion prices per 1M tokens")
    if per_request is not None and not 0 <= per_request <= MAX_PER_REQUEST:
        raise ValueError(f"a per-request price must be between 0 and {MAX_PER_REQUEST} credits")
    if any(p is not None and not math.isfinite(p) for p in (prompt_per_1m, completion_per_1m)):
        raise ValueError("prices must be finite numbers")  # a NaN stored would break every replica's catalog
    if by_tokens and (prompt_per_1m is None or completion_per_1m is None):
        raise ValueError("give both the prompt and the completion price per 1M tokens")
    if by_tokens and ((prompt_per_1m or 0) < 0 or (completion_per_1m or 0) < 0):
        raise ValueError("prices cannot be negative")
    row_tier = _tier(session, tier)
    check_name(model)
    row = session.get(ModelPrice, (row_tier.id, model)) or ModelPrice(tier_id=row_tier.id, model=model)
    row.per_request, row.prompt_per_1m, row.completion_per_1m = per_request, prompt_per_1m, completion_per_1m
    session.add(row)
    bump(session)
    prices = {"per_request": per_request, "prompt_per_1m": prompt_per_1m, "completion_per_1m": completion_per_1m}
    audit.note(session, "price.set", f"price:{tier}/{model}", prices)
    return row


def remove_price(session: Session, tier: str, model: str) -> None:
    row = session.get(ModelPrice, (_tier(session, tier).id, model))
    if row is None:
        raise ValueError(f"tier {tier!r} has no price for {model!r}")
    session.delete(row)
    bump(session)
    audit.note(session, "price.removed", f"price:{tier}/{model}")


@dataclass(frozen=True)
class PriceRow:
    tier: str
    model: str
    price: Price

    def as_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "model": self.model, **self.price.as_json()}


def list_prices(session: Session, tier: str | None = None) -> list[PriceRow]:
    query = select(Tier.name, ModelPrice).join(Tier, Tier.id == ModelPrice.tier_id).order_by(Tier.id, ModelPrice.model)
    if tier is not None:
        query = query.where(Tier.id == _tier(session, tier).id)
    return [
        PriceRow(name, row.model, make_price(row.per_request, row.prompt_per_1m, row.completion_per_1m))
        for name, row in session.execute(query)
    ]


# -- the registry as a file ----------------------------------------------------------------------


def export_registry(session: Session) -> dict[str, Any]:
    """The whole registry as plain data (what ``models export`` writes as TOML)."""
    aliases: dict[str, list[str]] = {}
    for alias in session.scalars(select(ModelAlias).order_by(ModelAlias.alias)):
        aliases.setdefault(alias.model, []).append(alias.alias)
    models = []
    for record in session.scalars(select(ModelRecord).order_by(ModelRecord.id)):
        item: dict[str, Any] = {"name": record.name}
        if record.enabled:
            item["engine"] = record.engine
            item |= config_from_record(record.engine, record.config or {}).as_json()
        else:
            item["hidden"] = True
        models.append(item)
    named = {m["name"] for m in models}
    for target in aliases:  # aliases of models defined elsewhere (aimichat-1, discovered)
        if target not in named:
            models.append({"name": target})
    for item in models:
        if item["name"] in aliases:
            item["aliases"] = aliases[item["name"]]
    data: dict[str, Any] = {"models": models}
    sources = [
        {"urls": list(s.urls), "prefix": s.prefix, **({"api_key_env": s.api_key_env} if s.api_key_env else {})}
        for s in _sources(session)
    ]
    if sources:
        data["sources"] = sources
    tiers = {
        t.name: {"models": list(t.models)}
        for t in session.scalars(select(Tier).order_by(Tier.id))
        if t.models is not None
    }
    if tiers:
        data["tiers"] = tiers
    prices: dict[str, dict[str, Any]] = {}
    for row in list_prices(session):
        prices.setdefault(row.tier, {})[row.model] = row.price.as_json()
    if prices:
        data["prices"] = prices
    return data


def export_toml(session: Session) -> str:
    header = "# AimiChat model registry: `aimichat models import` this file to make a database serve exactly this.\n"
    return header + tomli_w.dumps(export_registry(session))


def import_toml(session: Session, text: str) -> dict[str, int]:
    """Make the registry exactly what the file says (models, aliases, sources, tier access, prices);
    all or nothing. Tiers must exist; tiers the file does not mention may use every model."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    unknown = set(data) - {"models", "sources", "tiers", "prices"}
    if unknown:
        raise ValueError(f"unknown section(s): {', '.join(sorted(unknown))}")
    for table in (ModelAlias, ModelPrice, ModelSource, ModelRecord):
        session.execute(delete(table))
    session.execute(update(Tier).values(models=None))
    session.flush()
    try:
        counts = _import(session, data)
    except (TypeError, AttributeError) as exc:  # a value of the wrong kind (a string where a table belongs…)
        raise ValueError(f"not a registry file: {exc}") from None
    bump(session)
    audit.note(session, "registry.imported", "registry", dict(counts))
    return counts


def _import(session: Session, data: dict[str, Any]) -> dict[str, int]:
    """Sources first (hiding a discovered model needs its source), every model before any alias (a hidden
    aimichat-1's name may be another model's alias)."""
    counts = {"models": 0, "aliases": 0, "sources": 0, "prices": 0}
    for item in _list(data, "sources"):
        add_source(session, item.get("urls", []), prefix=item.get("prefix", ""), api_key_env=item.get("api_key_env"))
        counts["sources"] += 1
    models = _list(data, "models")
    for item in models:
        name = _field(item, "name", str)
        if item.get("hidden"):
            remove_model(session, name)
        elif "engine" in item:
            _add_from_file(session, name, item)
            counts["models"] += 1
    for item in models:
        name = item["name"]
        for alias in _strings(item.get("aliases", []), f"the aliases of {name!r}"):
            _set_alias(session, name, alias)
            counts["aliases"] += 1
    for tier, settings in _table(data.get("tiers", {}), "tiers").items():
        allowed = _table(settings, f"tiers.{tier}").get("models")
        set_tier_models(session, tier, None if allowed is None else _strings(allowed, f"tiers.{tier}.models"))
    for tier, by_model in _table(data.get("prices", {}), "prices").items():
        for model, price in _table(by_model, f"prices.{tier}").items():
            price = _table(price, f"prices.{tier}.{model}")
            set_price(
                session,
                tier,
                model,
                per_request=price.get("per_request"),
                prompt_per_1m=price.get("prompt_per_1m"),
                completion_per_1m=price.get("completion_per_1m"),
            )
            counts["prices"] += 1
    return counts


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return value


_EMBEDDED_KEYS = {
    "gguf", "parallel", "context_length", "threads", "system_prompt", "load_on_demand", "idle_unload", *SAMPLING,
}  # fmt: skip
_UPSTREAM_KEYS = {
    "urls", "upstream_model", "api_key_env", "system_prompt", "context_length", "multimodal", "strip_fields",
    "refuse_fields", *SAMPLING,
}  # fmt: skip


def _add_from_file(session: Session, name: str, item: dict[str, Any]) -> None:
    settings = {k: v for k, v in item.items() if k not in ("name", "engine", "aliases")}
    add_model(session, name, item["engine"], settings)


def foreign_settings(engine: str, given: Iterable[str]) -> list[str]:
    """The settings in ``given`` that a model of ``engine`` does not take: refused rather than ignored,
    since a setting silently ignored misleads (an api_key_env on an embedded model protects nothing)."""
    allowed = {"embedded": _EMBEDDED_KEYS, "upstream": _UPSTREAM_KEYS}.get(engine)
    if allowed is None:
        raise ValueError(f"engine must be 'embedded' or 'upstream', got {engine!r}")
    return sorted(set(given) - allowed)


def add_model(session: Session, name: str, engine: str, settings: Mapping[str, Any]) -> ModelRecord:
    """Add (or redefine) a model of ``engine`` with ``settings`` (``add_embedded``'s or ``add_upstream``'s
    keywords, ``urls`` among an upstream's): what the registry file, the CLI and the admin API add."""
    try:
        extra = foreign_settings(engine, settings)
    except ValueError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
    if extra:
        raise ValueError(f"model {name!r}: unknown key(s) for an {engine} model: {', '.join(extra)}")
    given = dict(settings)
    try:
        if engine == "embedded":
            return add_embedded(session, name, **given)
        return add_upstream(session, name, given.pop("urls", []), **given)
    except TypeError as exc:  # a value of the wrong kind (a string where a number belongs…)
        raise ValueError(f"model {name!r}: {exc}") from None


def _list(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{key} must be an array of tables ([[{key}]])")
    return value


def _field(item: dict[str, Any], key: str, kind: type) -> Any:
    value = item.get(key)
    if not isinstance(value, kind):
        raise ValueError(f"every entry needs a {key}")
    return value
