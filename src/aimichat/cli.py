"""``aimichat``: serve the API and administer tiers, accounts, keys and usage.

Every command is a thin wrapper over the same plain functions the API uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import textwrap
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from sqlalchemy.orm import Session

from aimichat.accounts import service as accounts
from aimichat.config import Settings, env_var
from aimichat.keys import service as keys
from aimichat.quota import ledger
from aimichat.store.clock import utcnow
from aimichat.store.db import Database
from aimichat.store.models import Account, ApiKey, Tier

Command = TypeVar("Command", bound=Callable[..., Any])


@click.group(epilog="Settings: AIMICHAT_* environment variables, listed by `aimichat settings`.")
@click.version_option(package_name="aimichat")
def cli() -> None:
    """AimiChat: an OpenAI-compatible chat API with accounts, API keys and credit quotas."""


@contextmanager
def _session() -> Iterator[Session]:
    """A session that commits on success; any refused input prints one line and exits 1."""
    settings = Settings()
    database = Database(settings.resolved_database_url())
    database.upgrade()
    session = database.session()
    try:
        accounts.ensure_default_tier(session, settings.default_tier)
        yield session
        session.commit()
    except (accounts.AccountError, keys.UnknownKey, ValueError) as exc:
        session.rollback()
        raise click.ClickException(str(exc)) from None
    finally:
        session.close()
        database.dispose()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# -- settings ------------------------------------------------------------------------------------


def _is_secret(field: FieldInfo) -> bool:
    return field.annotation is SecretStr or SecretStr in typing.get_args(field.annotation)


def default_text(field: FieldInfo) -> str:
    """How a setting's default reads in help and in ``aimichat settings``; a secret's is never shown."""
    if _is_secret(field):
        return "(secret)" if field.default is not None else "-"
    if field.default_factory is not None:
        return "(computed)"  # e.g. threads: the cores of the host it runs on, see the description
    if field.default is None or field.default == "":
        return "-"
    return str(field.default)


@cli.command("settings")
def settings_cmd() -> None:
    """List the settings: environment variable, default and meaning.

    serve's options override the environment for the settings they name.
    """
    rows = [
        (name, env_var(name), default_text(field), field.description or "")
        for name, field in Settings.model_fields.items()
    ]
    click.echo(format_table(("NAME", "ENV VAR", "DEFAULT", "DESCRIPTION"), rows))


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int | None = None,
    max_default: int = 24,
    min_last: int = 40,
) -> str:
    """Columns padded to their widest cell; the third is wrapped at ``max_default`` characters and the
    last one at what the terminal (``width``) leaves, but never narrower than ``min_last``."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    widths[2] = min(widths[2], max_default)
    widths[-1] = max(min_last, width - sum(widths[:-1]) - 2 * (len(widths) - 1))
    lines = []
    for row in [header, *rows]:
        cells = [textwrap.wrap(cell, w) or [""] for cell, w in zip(row, widths, strict=True)]
        for n in range(max(len(c) for c in cells)):
            parts = [(c[n] if n < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)]
            lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def setting_option(*decls: str, setting: str, more_help: str = "", **attrs: Any) -> Callable[[Command], Command]:
    """An option of ``serve`` for the Settings field ``setting``, which supplies its help and default.

    Only a value given on the command line overrides the setting (see :func:`_given`): the default shown
    here is the field's, and an environment variable, read by Settings, still applies when the option is
    left out."""
    field = Settings.model_fields[setting]
    shown = not _is_secret(field) and field.default_factory is None and field.default not in (None, "")
    return click.option(
        *decls,
        setting,
        default=field.default if shown else None,
        show_default=shown,
        help=" ".join(filter(None, [field.description, more_help])),
        **attrs,
    )


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The options typed on the command line (not those left at their defaults)."""
    context = click.get_current_context()
    return {
        name: value
        for name, value in options.items()
        if context.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }


# -- serve ---------------------------------------------------------------------------------------


@cli.command()
@setting_option("--host", setting="host")
@setting_option("--port", setting="port", type=int)
@setting_option("--model", setting="model_path", type=click.Path(dir_okay=False, path_type=Path))
@setting_option("--data-dir", setting="data_dir", type=click.Path(file_okay=False, path_type=Path))
@setting_option("--engine", setting="engine", type=click.Choice(["embedded", "upstream"]))
@setting_option("--upstream-url", setting="upstream_url")
@setting_option("--upstream-model", setting="upstream_model")
@setting_option(
    "--upstream-api-key",
    setting="upstream_api_key",
    more_help="Prefer the environment variable: argv is visible to ps.",
)
@setting_option("--parallel", setting="parallel", type=click.IntRange(1, 256))
@setting_option(
    "--threads",
    setting="threads",
    type=click.IntRange(1, 512),
    more_help="With --workers, the cores are split among the workers.",
)
@setting_option("--redis-url", setting="redis_url")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes on this host; each loads its own engine (use with --engine upstream).",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(log_level: str, workers: int, **options: Any) -> None:
    """Serve the API (and apply pending database migrations first).

    Options override the AIMICHAT_* environment variables (see `aimichat settings`).
    """
    import uvicorn

    from aimichat.app import create_app, prepare_database

    overrides = _given(options)
    settings = Settings(**overrides)
    _check_serve_settings(settings)
    _configure_logging(log_level)
    database = Database(settings.resolved_database_url())
    prepare_database(database, settings)
    _print_first_steps(database, settings)
    # uvicorn drains on SIGTERM, then re-raises the signal into the handler it found: make that a clean exit.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    common: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=settings.drain_timeout,
    )
    if workers > 1:
        if "threads" not in settings.model_fields_set:
            overrides["threads"] = threads_per_worker(workers)
        # Each worker builds its own app from the environment, so hand the CLI's choices down that way.
        os.environ.update({env_var(name): str(value) for name, value in overrides.items()})
        database.dispose()
        uvicorn.run("aimichat.app:create_app", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(settings, database=database), **common)


def threads_per_worker(workers: int) -> int:
    """Split the cores among worker processes. llama.cpp's threads spin while they wait for each other,
    so processes that together run more threads than there are cores slow each other down several-fold
    (measured here: two processes of 2 threads on 2 cores, 14 tok/s each instead of 90 alone)."""
    return max(1, len(os.sched_getaffinity(0)) // workers)  # the cores this process may use


def _check_serve_settings(settings: Settings) -> None:
    if settings.model_path and not settings.model_path.is_file():
        raise click.ClickException(f"model file not found: {settings.model_path}")
    if settings.engine == "upstream":
        from aimichat.engines.openai_upstream import parse_urls

        try:
            parse_urls(settings.upstream_url)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None


def _exit_after_drain(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _print_first_steps(database: Database, settings: Settings) -> None:
    with database.session() as session:
        if accounts.list_accounts(session):
            return
    base = f"http://{settings.host}:{settings.port}"
    click.echo(
        "\nNo accounts yet. Create one and a key with:\n"
        "  aimichat accounts create you@example.com --password 'a-long-password'\n"
        "  aimichat keys create you@example.com --name first-key\n"
        f"then call {base}/v1/chat/completions with 'Authorization: Bearer <key>'.\n"
        f"Or open {base}/ in a browser to sign up and generate a key there.\n",
        err=True,
    )


# -- db ------------------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """Database migrations."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations."""
    database = Database(Settings().resolved_database_url())
    database.upgrade()
    click.echo(f"database at head: {database.sql_engine.url.render_as_string(hide_password=True)}")


# -- tiers ---------------------------------------------------------------------------------------


@cli.group()
def tiers() -> None:
    """Subscription tiers: credit allotments and cost rules."""


def _tier_dict(tier: Tier) -> dict[str, Any]:
    return {
        "name": tier.name,
        "daily_credits": tier.daily_credits,
        "monthly_credits": tier.monthly_credits,
        "cost_rule": tier.cost_rule,
        "credits_per_1k_tokens": tier.credits_per_1k_tokens,
    }


@tiers.command("set")
@click.argument("name")
@click.option("--daily-credits", type=int, required=True)
@click.option("--monthly-credits", type=int, default=None)
@click.option("--cost", "cost_rule", type=click.Choice(accounts.COST_RULES), default="per_request", show_default=True)
@click.option("--credits-per-1k-tokens", type=int, default=1, show_default=True)
def tiers_set(
    name: str, daily_credits: int, monthly_credits: int | None, cost_rule: str, credits_per_1k_tokens: int
) -> None:
    """Create or update a tier."""
    with _session() as session:
        tier = accounts.set_tier(
            session,
            name,
            daily_credits=daily_credits,
            monthly_credits=monthly_credits,
            cost_rule=cost_rule,
            credits_per_1k_tokens=credits_per_1k_tokens,
        )
        click.echo(f"tier {tier.name}: {tier.daily_credits} daily credits, {tier.cost_rule}")


@tiers.command("list")
@click.option("--json", "as_json", is_flag=True)
def tiers_list(as_json: bool) -> None:
    """List tiers."""
    with _session() as session:
        rows = [_tier_dict(t) for t in accounts.list_tiers(session)]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        monthly = r["monthly_credits"] if r["monthly_credits"] is not None else "-"
        click.echo(f"{r['name']:<16} daily={r['daily_credits']:<8} monthly={monthly:<8} {r['cost_rule']}")


# -- accounts ------------------------------------------------------------------------------------


@cli.group("accounts")
def accounts_group() -> None:
    """User accounts."""


def _account_dict(account: Account) -> dict[str, Any]:
    return {
        "id": account.id,
        "email": account.email,
        "tier": account.tier.name,
        "admin": account.is_admin,
        "disabled": account.disabled,
        "created": account.created_at.isoformat(),
    }


@accounts_group.command("create")
@click.argument("email")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option(
    "--tier", default=lambda: Settings().default_tier, show_default="the default_tier setting", help="Tier name."
)
@click.option("--admin", is_flag=True, help="Give access to the admin pages.")
def accounts_create(email: str, password: str, tier: str, admin: bool) -> None:
    """Create an account."""
    with _session() as session:
        account = accounts.create_account(session, email, password, tier=tier, is_admin=admin)
        click.echo(f"created account {account.email} (tier {account.tier.name})")


@accounts_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def accounts_list(as_json: bool) -> None:
    """List accounts."""
    with _session() as session:
        rows = [_account_dict(a) for a in accounts.list_accounts(session)]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        flags = " ".join(f for f, on in (("admin", r["admin"]), ("disabled", r["disabled"])) if on)
        click.echo(f"{r['id']:<5} {r['email']:<40} {r['tier']:<12} {flags}")


@accounts_group.command("set-tier")
@click.argument("email")
@click.argument("tier")
def accounts_set_tier(email: str, tier: str) -> None:
    """Move an account to another tier."""
    with _session() as session:
        account = accounts.set_account_tier(session, email, tier)
        click.echo(f"{account.email} is now on tier {account.tier.name}")


@accounts_group.command("disable")
@click.argument("email")
def accounts_disable(email: str) -> None:
    """Disable an account: its keys stop working at once."""
    with _session() as session:
        accounts.set_disabled(session, email, True)
        click.echo(f"disabled {email}")


@accounts_group.command("enable")
@click.argument("email")
def accounts_enable(email: str) -> None:
    """Enable a disabled account."""
    with _session() as session:
        accounts.set_disabled(session, email, False)
        click.echo(f"enabled {email}")


@accounts_group.command("set-admin")
@click.argument("email")
def accounts_set_admin(email: str) -> None:
    """Give an account access to the admin pages."""
    with _session() as session:
        accounts.set_admin(session, email, True)
        click.echo(f"{email} is now an admin")


# -- keys ----------------------------------------------------------------------------------------


@cli.group("keys")
def keys_group() -> None:
    """API keys (talk mode only). A key is shown once, when it is created."""


def _key_dict(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "created": key.created_at.isoformat(),
        "last_used": key.last_used_at.isoformat() if key.last_used_at else None,
        "status": keys.key_status(key),
    }


@keys_group.command("create")
@click.argument("email")
@click.option("--name", required=True)
def keys_create(email: str, name: str) -> None:
    """Create a key; the key alone is the last line of output."""
    with _session() as session:
        created = keys.create_key(session, accounts.get_account(session, email), name)
    click.echo(f"created key {created.key.id} ({created.key.name}) for {email}; it will not be shown again:", err=True)
    click.echo(created.secret)


@keys_group.command("list")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
def keys_list(email: str, as_json: bool) -> None:
    """List an account's keys (never the keys themselves)."""
    with _session() as session:
        rows = [_key_dict(k) for k in keys.list_keys(session, accounts.get_account(session, email).id)]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        last_used = (r["last_used"] or "-")[:19]
        click.echo(
            f"{r['id']:<5} {r['name']:<24} {r['prefix']}…  created {r['created'][:19]}  "
            f"last used {last_used}  {r['status']}"
        )


@keys_group.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by id: it stops working at once."""
    with _session() as session:
        key = keys.revoke_key(session, key_id)
        click.echo(f"revoked key {key.id} ({key.name})")


# -- usage ---------------------------------------------------------------------------------------


@cli.command("usage")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
def usage_cmd(email: str, as_json: bool) -> None:
    """Today's and this month's credits for an account."""
    from aimichat.api.usage import usage_body

    with _session() as session:
        account = accounts.get_account(session, email)
        principal = keys.principal_for(account)
        body = usage_body(principal, ledger.summary(session, principal, utcnow()))
    if as_json:
        return _echo_json(body)
    d, m = body["daily"], body["monthly"]
    click.echo(f"{account.email} (tier {body['tier']}, {body['cost_rule']})")
    click.echo(f"today:      {d['used']} / {d['limit']} credits, resets {d['resetAt']}")
    monthly_limit = m["limit"] if m["limit"] is not None else "-"
    click.echo(f"this month: {m['used']} / {monthly_limit} credits, resets {m['resetAt']}")
    for k in body["keys_today"]:
        click.echo(f"  key {k['id']:<5} {k['name']:<24} {k['credits']} credits in {k['requests']} requests today")
    for u in body["models_today"]:
        click.echo(
            f"  model {u['model']:<30} {u['credits']} credits in {u['requests']} requests today "
            f"({u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens)"
        )


if __name__ == "__main__":
    cli()
