"""What the pages show of the model registry: the catalog as it stands now, and the models a tier may use
with what each costs that tier (the plan, docs and playground pages all list the same thing)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from aimichat.config import Settings
from aimichat.quota.pricing import Price, tier_price
from aimichat.registry.catalog import Catalog, context_length, read_version
from aimichat.registry.live import LiveModels
from aimichat.store.db import Database
from aimichat.store.models import Tier


async def current_catalog(request: Request) -> Catalog:
    """The registry as it stands now. A change committed a moment ago (on an admin page, by the CLI or on
    another replica) is read at once instead of at the next poll, so the page after a change shows it;
    when nothing changed this costs one indexed read."""
    models: LiveModels = request.app.state.models
    version = await run_in_threadpool(_registry_version, request.app.state.database)
    if version != models.catalog.version:
        await models.refresh()
    return models.catalog


def _registry_version(database: Database) -> int:
    with database.connect() as conn:
        return read_version(conn)


@dataclass(frozen=True)
class Offer:
    """One model as a tier sees it."""

    name: str
    aliases: tuple[str, ...]
    context_length: int | None  # None: not known (an upstream that does not say)
    price: Price | None  # None: no tier to price it for (an anonymous visitor without a default tier)
    own_price: bool  # a price set for this (tier, model); False: the tier's own cost rule applies


def offers(catalog: Catalog, settings: Settings, tier: Tier | None) -> list[Offer]:
    """The models ``tier`` may use (every model for None), with the price ``tier`` pays for each."""
    rule = tier_price(tier.cost_rule, tier.credits_per_1k_tokens) if tier is not None else None
    result = []
    for spec in catalog.visible(tier.name if tier is not None else None):
        price = catalog.price(tier.name, spec.name, rule) if tier is not None and rule is not None else None
        own = tier is not None and (tier.name, spec.name) in catalog.prices
        result.append(Offer(spec.name, spec.aliases, context_length(spec, settings), price, own))
    return result
