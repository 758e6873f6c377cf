"""What the admin API does, over a session: each function calls the services the CLI and the web pages
call (accounts, keys, registry, the ledger, the audit log) and returns the answer's body; the services'
refusals come out as :class:`~aimichat.api.errors.APIError` (400, or 404 for an unknown id).

Every change is audited by the services themselves, as the admin key the session acts as.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy.orm import Session

from aimichat.accounts import service as accounts
from aimichat.alerts import service as alerts
from aimichat.api.errors import APIError
from aimichat.audit import service as audit
from aimichat.config import Settings
from aimichat.keys import limits_input
from aimichat.keys import service as keys
from aimichat.keys.json import key_json
from aimichat.quota import usage_report
from aimichat.registry import service as registry
from aimichat.registry.catalog import Catalog, ModelSpec
from aimichat.registry.live import ModelStatus
from aimichat.store.clock import iso_utc
from aimichat.store.models import Account, Tier

from .protocol import (
    LIMIT_FIELDS,
    AccountBody,
    AccountCreate,
    AccountList,
    AccountUpdate,
    AlertsBody,
    AlertsSet,
    KeyCreate,
    KeyLimitsBody,
    KeyRotate,
    ModelAdd,
    ModelList,
    PriceSet,
    SamplingSet,
    SourceAdd,
    SourceBody,
    TierBody,
    TierSave,
    UsageBody,
    UsageRow,
)

Offered = Callable[[str], list[str]]  # the models a tier may use now (the live catalog's)


@contextmanager
def refusals(param: str | None = None) -> Iterator[None]:
    """The services' refusals as the API's errors: an unknown id is a 404, anything else refused a 400."""
    try:
        yield
    except accounts.UnknownAccount as exc:
        raise APIError(404, _sentence(str(exc)), code="account_not_found", param="id") from None
    except keys.UnknownKey as exc:
        raise APIError(404, _sentence(str(exc)), code="key_not_found", param="id") from None
    except ValueError as exc:  # AccountError too; limits_input's second argument names the field
        message = str(exc.args[0] if exc.args else exc)
        raise APIError(400, _sentence(message), param=exc.args[1] if len(exc.args) > 1 else param) from None


def _sentence(message: str) -> str:
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


# -- accounts ------------------------------------------------------------------------------------


def account_body(account: Account) -> AccountBody:
    return {
        "object": "account",
        "id": account.id,
        "email": account.email,
        "tier": account.tier.name,
        "admin": account.is_admin,
        "disabled": account.disabled,
        "created": iso_utc(account.created_at),
    }


def create_account(session: Session, body: AccountCreate, default_tier: str) -> AccountBody:
    with refusals():
        account = accounts.create_account(
            session, body.email, body.password, tier=body.tier or default_tier, is_admin=body.admin
        )
    return account_body(account)


def list_accounts(session: Session, q: str, page: int, per_page: int) -> AccountList:
    with refusals():
        found = accounts.search_accounts(session, q, page=page, per_page=per_page)
    return {
        "object": "list",
        "data": [account_body(a) for a in found.accounts],
        "page": found.page,
        "per_page": found.per_page,
        "total": found.total,
        "has_more": found.has_more,
    }


def get_account(session: Session, account_id: int) -> AccountBody:
    with refusals():
        return account_body(accounts.get_account_by_id(session, account_id))


def update_account(session: Session, account_id: int, body: AccountUpdate) -> AccountBody:
    if not body.model_fields_set:
        raise APIError(400, "Send at least one of tier, disabled, admin.")
    with refusals():
        account = accounts.get_account_by_id(session, account_id)
        if body.tier is not None:
            accounts.set_account_tier(session, account.email, body.tier)
        if body.disabled is not None:
            accounts.set_disabled(session, account.email, body.disabled)
        if body.admin is not None:
            accounts.set_admin(session, account.email, body.admin)
    return account_body(account)


# -- tiers and prices ----------------------------------------------------------------------------


def tier_body(tier: Tier) -> TierBody:
    return cast("TierBody", {"object": "tier", **accounts.tier_as_json(tier)})


def list_tiers(session: Session) -> list[TierBody]:
    return [tier_body(t) for t in accounts.list_tiers(session)]


def get_tier(session: Session, name: str) -> TierBody:
    with refusals("name"):
        return tier_body(accounts.get_tier(session, name))


def save_tier(session: Session, name: str, body: TierSave) -> TierBody:
    """What ``aimichat tiers set`` does: create a tier or change the fields sent."""
    changes = body.model_dump(include=body.model_fields_set - {"models"})
    with refusals():
        tier = accounts.save_tier(session, name, changes)
        if "models" in body.model_fields_set:
            registry.set_tier_models(session, name, body.models)
    return tier_body(tier)


def list_prices(session: Session, tier: str | None) -> list[dict[str, Any]]:
    with refusals("tier"):
        return [row.as_json() for row in registry.list_prices(session, tier)]


def set_price(session: Session, tier: str, model: str, body: PriceSet) -> dict[str, Any]:
    with refusals():
        registry.set_price(
            session,
            tier,
            model,
            per_request=body.per_request,
            prompt_per_1m=body.prompt_per_1m,
            completion_per_1m=body.completion_per_1m,
        )
        (row,) = [r for r in registry.list_prices(session, tier) if r.model == model]
    return row.as_json()


def remove_price(session: Session, tier: str, model: str) -> None:
    with refusals():
        registry.remove_price(session, tier, model)


# -- the model registry --------------------------------------------------------------------------


def model_body(spec: ModelSpec, settings: Settings, status: ModelStatus | None) -> dict[str, Any]:
    """A model as ``aimichat models list --json`` shows it, with its state on this replica (``state``
    null: not set up here yet)."""
    return {
        "object": "model",
        **registry.model_json(spec, settings),
        "ready": status.ready if status else None,
        "state": status.state if status else None,
        "error": status.error if status else None,
    }


def list_models(session: Session, catalog: Catalog, statuses: list[ModelStatus], settings: Settings) -> ModelList:
    by_name = {s.name: s for s in statuses}
    data = [model_body(spec, settings, by_name.get(spec.name)) for spec in catalog.models.values()]
    return {"object": "list", "data": data, "hidden": registry.hidden_models(session)}


def add_model(session: Session, body: ModelAdd) -> None:
    """What ``aimichat models add`` does: add a model, or redefine one (its aliases and prices stay)."""
    with refusals():
        registry.add_model(session, body.name, body.engine, body.settings())


def set_sampling(session: Session, name: str, body: SamplingSet) -> None:
    """What ``aimichat models set`` does: the default sampling sent (null removes one); the rest stays."""
    if not body.model_fields_set:
        raise APIError(400, "Send temperature, top_p or both.")
    with refusals():
        registry.set_sampling(session, name, body.model_dump(include=body.model_fields_set))


def remove_model(session: Session, name: str) -> dict[str, Any]:
    """Stop serving a model; aimichat-1 and discovered models are hidden instead (``hidden``: true)."""
    with refusals("name"):
        hidden = registry.remove_model(session, name)
    return {"object": "model", "name": name, "deleted": True, "hidden": hidden}


def restore_model(session: Session, name: str) -> dict[str, Any]:
    with refusals("name"):
        registry.restore_model(session, name)
    return {"object": "model", "name": name, "deleted": False, "hidden": False}


def add_alias(session: Session, alias: str, model: str) -> dict[str, Any]:
    with refusals():
        registry.add_alias(session, model, alias)
    return {"object": "model_alias", "alias": alias, "model": model}


def remove_alias(session: Session, alias: str) -> None:
    with refusals("alias"):
        registry.remove_alias(session, alias)


def _source_body(prefix: str, urls: list[str], api_key_env: str | None, catalog: Catalog) -> SourceBody:
    served = [spec.name for spec in catalog.models.values() if spec.origin == "discovered" and spec.source == prefix]
    return {"object": "model_source", "prefix": prefix, "urls": urls, "api_key_env": api_key_env, "models": served}


def list_sources(session: Session, catalog: Catalog) -> list[SourceBody]:
    return [_source_body(s.prefix, list(s.urls), s.api_key_env, catalog) for s in registry.list_sources(session)]


def add_source(session: Session, body: SourceAdd, catalog: Catalog) -> SourceBody:
    """What ``aimichat models discover`` registers; every replica reads the source's list on its own."""
    with refusals():
        source = registry.add_source(session, body.urls, prefix=body.prefix, api_key_env=body.api_key_env)
    return _source_body(source.prefix, list(source.urls), source.api_key_env, catalog)


def remove_source(session: Session, prefix: str) -> None:
    with refusals("prefix"):
        registry.remove_source(session, prefix)


def export_toml(session: Session) -> str:
    return registry.export_toml(session)


def import_toml(session: Session, body: bytes) -> dict[str, Any]:
    """Make the registry exactly what the file says, all or nothing (the session is not committed on a 400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        message = "The registry file must be UTF-8 text (TOML, as GET /admin/v1/models/export gives it)."
        raise APIError(400, message) from None
    with refusals():
        counts = registry.import_toml(session, text)
    return {"object": "registry_import", **counts}


# -- keys ----------------------------------------------------------------------------------------


def _limit_changes(body: KeyLimitsBody, tier: str, offered: Offered, now: dt.datetime) -> dict[str, Any]:
    """The limits sent, read by the account API's rules (``null`` removes one, a model must be on the plan)."""
    sent = body.model_dump(include=body.model_fields_set & set(keys.KeyLimits.__dataclass_fields__))
    with refusals():
        return limits_input.limits_from_json(sent, offered(tier), now)


def create_key(
    session: Session, account_id: int, body: KeyCreate, offered: Offered, now: dt.datetime
) -> dict[str, Any]:
    with refusals():
        account = accounts.get_account_by_id(session, account_id)
    changes = _limit_changes(body, account.tier.name, offered, now)
    with refusals("name"):
        created = keys.create_key(session, account, body.name, keys.KeyLimits(**changes))
    return {**key_json(created.key, created.secret, now), "account_id": account.id}


SECRET_NOT_KEPT = (
    "This answer is a replay (Idempotency-Key): the key was created by the first request, whose answer held "
    "its secret once. Secrets are not kept for retries; rotate this key for a new one."
)


def without_secret(body: bytes) -> bytes:
    """What is kept of a key-creating answer for its retries: the same body without the secret (``key``),
    with a ``note`` that says why, so a replay tells the caller which key it made and nothing to use."""
    answer = json.loads(body)
    if isinstance(answer, dict) and "key" in answer:
        del answer["key"]
        answer["note"] = SECRET_NOT_KEPT
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


def list_keys(session: Session, account_id: int, now: dt.datetime) -> dict[str, Any]:
    with refusals():
        account = accounts.get_account_by_id(session, account_id)
    data = [{**key_json(k, now=now), "account_id": account.id} for k in keys.list_keys(session, account.id)]
    return {"object": "list", "data": data}


def get_key(session: Session, key_id: int, now: dt.datetime) -> dict[str, Any]:
    with refusals():
        key = keys.get_key(session, key_id)
    return {**key_json(key, now=now), "account_id": key.account_id}


def update_key(
    session: Session, key_id: int, body: KeyLimitsBody, offered: Offered, now: dt.datetime
) -> dict[str, Any]:
    with refusals():
        key = keys.get_key(session, key_id)
        if key.revoked_at is not None:
            raise ValueError("this key is revoked: its limits no longer apply")
    changes = _limit_changes(body, key.account.tier.name, offered, now)
    if not changes:
        raise APIError(400, f"Send at least one limit to change: {', '.join(LIMIT_FIELDS)}.")
    with refusals():
        keys.set_limits(session, key_id, **changes)
    return {**key_json(key, now=now), "account_id": key.account_id}


def revoke_key(session: Session, key_id: int, now: dt.datetime) -> dict[str, Any]:
    with refusals():
        key = keys.revoke_key(session, key_id)
    return {**key_json(key, now=now), "account_id": key.account_id}


def rotate_key(session: Session, key_id: int, body: KeyRotate, now: dt.datetime) -> dict[str, Any]:
    with refusals("grace"):
        grace = limits_input.parse_grace(body.grace)
    with refusals():
        created = keys.rotate_key(session, key_id, grace=grace, now=now)
    return {**key_json(created.key, created.secret, now), "account_id": created.key.account_id}


# -- usage alerts --------------------------------------------------------------------------------


def _alerts_body(account_id: int, config: alerts.AlertConfig) -> AlertsBody:
    return {
        "object": "alert_settings",
        "account_id": account_id,
        "percents": list(config.percents),
        "email": config.email,
    }


def get_alerts(session: Session, account_id: int) -> AlertsBody:
    with refusals():
        accounts.get_account_by_id(session, account_id)
    return _alerts_body(account_id, alerts.alert_config(session, account_id))


def set_alerts(session: Session, account_id: int, body: AlertsSet, now: dt.datetime) -> AlertsBody:
    """What ``aimichat alerts set`` does: the thresholds and/or the email choice sent; the other stays."""
    if not body.model_fields_set:
        raise APIError(400, "Send percents, email or both.")
    with refusals():
        accounts.get_account_by_id(session, account_id)
    with refusals("percents"):
        config = alerts.set_alert_config(session, account_id, now, percents=body.percents, email=body.email)
    return _alerts_body(account_id, config)


# -- usage, the ledger, the audit log ------------------------------------------------------------


def _range(start: str | None, end: str | None, today: dt.date) -> tuple[dt.date, dt.date]:
    try:
        return usage_report.parse_range(start, end, today)
    except usage_report.BadRange as exc:
        raise APIError(400, str(exc), param="from") from None


def usage(session: Session, account_id: int | None, start: str | None, end: str | None, today: dt.date) -> UsageBody:
    """Requests, credits and tokens per day, account, key and model over a range of days (default: this
    month so far), from the ledger; ``key_id`` null is the account's playground."""
    first, last = _range(start, end, today)
    if account_id is not None:
        with refusals():
            accounts.get_account_by_id(session, account_id)
    rows: list[UsageRow] = [
        {
            "day": use.day.isoformat(),
            "account_id": use.account_id,
            "key_id": use.key_id,
            "model": use.model,
            "requests": use.requests,
            "credits": use.credits,
            "prompt_tokens": use.prompt_tokens,
            "completion_tokens": use.completion_tokens,
        }
        for use in usage_report.use_by_day(session, first, last, account_id)
    ]
    return {"object": "list", "from": first.isoformat(), "to": last.isoformat(), "data": rows}


def ledger_csv(session: Session, account_id: int, start: str | None, end: str | None, today: dt.date) -> str:
    """The account's ledger rows as CSV: the file its own usage page downloads."""
    first, last = _range(start, end, today)
    with refusals():
        accounts.get_account_by_id(session, account_id)
    return usage_report.ledger_csv(session, account_id, first, last)


def audit_events(
    session: Session, actor: str | None, action: str | None, target: str | None, page: int, per_page: int
) -> dict[str, Any]:
    with refusals():
        found = audit.list_events(session, actor=actor, action=action, target=target, page=page, per_page=per_page)
    return {
        "object": "list",
        "data": [audit.event_json(e) for e in found.events],
        "page": found.page,
        "per_page": found.per_page,
        "total": found.total,
        "has_more": found.has_more,
    }
