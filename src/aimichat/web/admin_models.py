"""Admin pages of the model registry: the models (add, edit, remove, hide and restore, aliases), what each
tier pays for each model, and which models each tier may use.

Every change goes through ``registry.service`` (the CLI's rules) and is committed with the request; the
session factory's after-commit hook marks this replica's models stale, and the page the change redirects
to reads the registry again (``models_view.current_catalog``), so it shows the change at once. Other
replicas see it at their next poll. What the service refuses is a 400 page with its message, nothing saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from aimichat.accounts import service as accounts
from aimichat.engines.configs import EmbeddedConfig, UpstreamConfig
from aimichat.quota.pricing import Price, tier_price
from aimichat.registry import service as registry
from aimichat.registry.catalog import Catalog, ModelSpec
from aimichat.registry.catalog import context_length as context_of
from aimichat.store.models import ModelRecord, Tier

from .deps import Admin, AdminForm, PostedForm, RequestSession, Visitor, WebError
from .models_view import current_catalog
from .render import WebRoute, page, redirect

router = APIRouter(route_class=WebRoute, include_in_schema=False)
PAGE = "/admin/models"
LARGEST = 2**31 - 1  # integer settings and prices are stored as 32-bit integers on PostgreSQL

# What the page says after a change (``?done=``), with the model's or tier's name filled in.
NOTES = {
    "saved": "Saved the model {name}.",
    "removed": "Removed {name}: it is no longer served.",
    "restored": "{name} is served again.",
    "alias": "Added the alias {name}.",
    "unalias": "Removed the alias {name}.",
    "price": "Saved the price of {name}.",
    "unprice": "Removed the price of {name}: the tier's own cost rule applies.",
    "access": "Saved which models the tier {name} may use.",
}

Result = TypeVar("Result")


# -- reading the forms ------------------------------------------------------------------------------


def _text(value: str) -> str | None:
    """An optional text field: blank means "not set" (the server's setting applies)."""
    value = value.strip()
    return value or None


def _whole(value: str, label: str) -> int | None:
    """An optional whole number; the service checks its range, this only that it is a number."""
    if not value.strip():
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"{label} must be a whole number") from None
    if abs(number) > LARGEST:
        raise ValueError(f"{label} is too large")
    return number


def _decimal(value: str, label: str) -> float | None:
    """An optional decimal number. NaN and infinity are refused here: the service's ``< 0`` check lets
    NaN through, and a stored NaN price would make the whole registry unreadable."""
    if not value.strip():
        return None
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"{label} must be a number") from None
    if not math.isfinite(number) or abs(number) > 1e15:
        raise ValueError(f"{label} must be a number of sensible size")
    return number


def _gguf(value: str) -> str | None:
    """The GGUF file's absolute path on the server (``~`` allowed). A relative path would be read from
    wherever the server happens to run, and ``~nobody/`` makes pathlib raise RuntimeError, not ValueError."""
    text = _text(value)
    if text is None:
        return None
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        raise ValueError(f"cannot find the home directory in {text!r}") from None
    if not path.is_absolute():
        raise ValueError("give the GGUF file's absolute path on the server (or leave it empty for the default model)")
    return str(path)


def _refused(title: str, work: Callable[[], Result]) -> Result:
    """``work()``, with the registry's refusals turned into a 400 page (the request's transaction is
    then rolled back, so nothing of it is kept)."""
    try:
        return work()
    except ValueError as exc:
        message = str(exc)
        raise WebError(400, title, message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")) from None


def _done(note: str, name: str) -> Response:
    return redirect(f"{PAGE}?{urlencode({'done': note, 'name': name})}")


# -- the page ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    """One model of the catalog as the admin page lists it."""

    spec: ModelSpec
    state: str  # ready | loading | unloaded | failed | unreachable | not ready | unknown
    ready: bool
    error: str | None
    context_length: int | None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class PriceRow:
    model: str
    price: Price
    own: bool  # set for this tier; False: the tier's cost rule


@dataclass(frozen=True)
class TierView:
    """One tier's prices and model access."""

    tier: Tier
    rule: Price
    prices: list[PriceRow]
    models: list[str] | None  # None: every model
    choices: list[str]  # the models to tick: the catalog's, and any the tier lists that are gone


def _model_rows(request: Request, catalog: Catalog) -> list[ModelRow]:
    status = {s.name: s for s in request.app.state.models.status()}
    settings = request.app.state.settings
    rows = []
    for spec in catalog.models.values():
        s = status.get(spec.name)
        state, ready, error = (s.state, s.ready, s.error) if s is not None else ("unknown", False, None)
        rows.append(ModelRow(spec, state, ready, error, context_of(spec, settings)))
    return rows


def _tier_views(session: Session, catalog: Catalog) -> list[TierView]:
    explicit = {(row.tier, row.model): row.price for row in registry.list_prices(session)}
    views = []
    for tier in accounts.list_tiers(session):
        rule = tier_price(tier.cost_rule, tier.credits_per_1k_tokens)
        names = list(catalog.models) + sorted({m for t, m in explicit if t == tier.name} - set(catalog.models))
        prices = [
            PriceRow(name, explicit.get((tier.name, name), rule), (tier.name, name) in explicit) for name in names
        ]
        allowed = None if tier.models is None else list(tier.models)
        choices = list(catalog.models) + sorted(set(allowed or ()) - set(catalog.models))
        views.append(TierView(tier, rule, prices, allowed, choices))
    return views


def _hidden(session: Session) -> list[str]:
    """Built-in or discovered models an admin took off (a disabled row), which can be served again."""
    return list(
        session.scalars(select(ModelRecord.name).where(ModelRecord.enabled.is_(False)).order_by(ModelRecord.name))
    )


def _models_page(
    request: Request,
    session: Session,
    visitor: Visitor,
    catalog: Catalog,
    rows: list[ModelRow],
    done: str | None,
    name: str | None,
) -> Response:
    note = NOTES[done].format(name=name or "") if done in NOTES else None
    return page(
        request,
        visitor,
        "admin_models.html",
        title="Models and prices",
        rows=rows,
        hidden=_hidden(session),
        orphans=sorted((alias, target) for alias, target in catalog.aliases.items() if target not in catalog.models),
        tiers=_tier_views(session, catalog),
        model_names=list(catalog.models),
        note=note,
        values={},
    )


@router.get(PAGE)
async def models_page(
    request: Request, session: RequestSession, visitor: Admin, done: str | None = None, name: str | None = None
) -> Response:
    catalog = await current_catalog(request)
    rows = _model_rows(request, catalog)  # on the event loop, where the engines' state changes
    return await run_in_threadpool(_models_page, request, session, visitor, catalog, rows, done, name)


@router.get(PAGE + "/edit")
async def edit_page(request: Request, visitor: Admin, name: str = "") -> Response:
    catalog = await current_catalog(request)
    spec = catalog.models.get(name)
    if spec is None:
        raise WebError(404, "Model not found", f"There is no model named {name!r}.")
    return page(
        request, visitor, "admin_model_edit.html", title=f"Edit {spec.name}", spec=spec, values=_form_values(spec)
    )


def _form_values(spec: ModelSpec) -> dict[str, Any]:
    """The model's settings as its form's fields: blank where the server's setting applies."""
    config = spec.config
    values: dict[str, Any] = {"name": spec.name, "system_prompt": config.system_prompt or ""}
    values["context_length"] = config.context_length or ""
    if isinstance(config, EmbeddedConfig):
        values |= {
            "gguf": str(config.gguf) if config.gguf else "",
            "parallel": config.parallel or "",
            "threads": config.threads or "",
            "load_on_demand": config.load_on_demand,
            "idle_unload": "" if config.idle_unload is None else f"{config.idle_unload:g}",
        }
    if isinstance(config, UpstreamConfig):
        values |= {
            "urls": ", ".join(config.urls),
            "upstream_model": config.upstream_model,
            "api_key_env": config.api_key_env or "",
        }
    return values


# -- models --------------------------------------------------------------------------------------


@router.post(PAGE + "/embedded")
def add_embedded(
    session: RequestSession,
    visitor: AdminForm,
    name: str = Form(""),
    gguf: str = Form(""),
    parallel: str = Form(""),
    context_length: str = Form(""),
    threads: str = Form(""),
    system_prompt: str = Form(""),
    load_on_demand: str = Form(""),
    idle_unload: str = Form(""),
) -> Response:
    """Add a model run in this process from a GGUF file, or redefine one (the edit form posts here too)."""

    def work() -> None:
        registry.add_embedded(
            session,
            name.strip(),
            gguf=_gguf(gguf),
            parallel=_whole(parallel, "parallel"),
            context_length=_whole(context_length, "context length"),
            threads=_whole(threads, "threads"),
            system_prompt=_text(system_prompt),
            load_on_demand=bool(load_on_demand),
            idle_unload=_decimal(idle_unload, "idle unload"),
        )

    _refused("Model not saved", work)
    return _done("saved", name.strip())


@router.post(PAGE + "/upstream")
def add_upstream(
    session: RequestSession,
    visitor: AdminForm,
    name: str = Form(""),
    urls: str = Form(""),
    upstream_model: str = Form(""),
    api_key_env: str = Form(""),
    system_prompt: str = Form(""),
    context_length: str = Form(""),
) -> Response:
    """Add a model served by OpenAI-compatible servers, or redefine one. The API key is never typed here:
    only the name of the environment variable that holds it on each replica."""

    def work() -> None:
        if not urls.strip():  # (the service's own message names the server's settings, not this form)
            raise ValueError("give at least one server URL")
        registry.add_upstream(
            session,
            name.strip(),
            urls,
            upstream_model=upstream_model.strip(),
            api_key_env=_text(api_key_env),
            system_prompt=_text(system_prompt),
            context_length=_whole(context_length, "context length"),
        )

    _refused("Model not saved", work)
    return _done("saved", name.strip())


@router.post(PAGE + "/remove")
def remove_model(
    request: Request, session: RequestSession, visitor: AdminForm, name: str = Form(""), confirm: str = Form("")
) -> Response:
    if confirm != "yes":  # without JavaScript, the confirmation is a page of its own
        return page(
            request,
            visitor,
            "admin_confirm.html",
            title="Remove model",
            heading=f"Remove the model “{name}”?",
            message="Requests for it fail at once on every replica; its aliases and prices go with it.",
            action=PAGE + "/remove",
            fields={"name": name},
            button="Remove",
        )
    _refused("Model not removed", lambda: registry.remove_model(session, name))
    return _done("removed", name)


@router.post(PAGE + "/restore")
def restore_model(session: RequestSession, visitor: AdminForm, name: str = Form("")) -> Response:
    _refused("Model not restored", lambda: registry.restore_model(session, name))
    return _done("restored", name)


@router.post(PAGE + "/alias")
def add_alias(session: RequestSession, visitor: AdminForm, model: str = Form(""), alias: str = Form("")) -> Response:
    _refused("Alias not added", lambda: registry.add_alias(session, model, alias.strip()))
    return _done("alias", alias.strip())


@router.post(PAGE + "/unalias")
def remove_alias(session: RequestSession, visitor: AdminForm, alias: str = Form("")) -> Response:
    _refused("Alias not removed", lambda: registry.remove_alias(session, alias))
    return _done("unalias", alias)


# -- prices and access ---------------------------------------------------------------------------


@router.post("/admin/prices")
def set_price(
    session: RequestSession,
    visitor: AdminForm,
    tier: str = Form(""),
    model: str = Form(""),
    per_request: str = Form(""),
    prompt_per_1m: str = Form(""),
    completion_per_1m: str = Form(""),
) -> Response:
    """What ``tier`` pays for ``model``: credits per request, or prompt and completion credits per 1M tokens."""

    def work() -> None:
        registry.set_price(
            session,
            tier,
            model,
            per_request=_whole(per_request, "the price per request"),
            prompt_per_1m=_decimal(prompt_per_1m, "the prompt price"),
            completion_per_1m=_decimal(completion_per_1m, "the completion price"),
        )

    _refused("Price not saved", work)
    return _done("price", f"{model} for {tier}")


@router.post("/admin/prices/remove")
def remove_price(session: RequestSession, visitor: AdminForm, tier: str = Form(""), model: str = Form("")) -> Response:
    _refused("Price not removed", lambda: registry.remove_price(session, tier, model))
    return _done("unprice", f"{model} for {tier}")


@router.post("/admin/tiers/models")
def set_tier_models(
    session: RequestSession, visitor: AdminForm, form: PostedForm, tier: str = Form(""), access: str = Form("")
) -> Response:
    """Every model (``access=all``), or the ticked ones (``access=some``; none ticked: no model at all)."""
    if access not in ("all", "some"):
        raise WebError(400, "Access not saved", "Choose every model, or the models ticked.")
    chosen = [m for m in form.getlist("models") if isinstance(m, str)]
    _refused("Access not saved", lambda: registry.set_tier_models(session, tier, None if access == "all" else chosen))
    return _done("access", tier)
