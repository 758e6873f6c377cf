"""``aimichat``: serve the API and administer tiers, accounts, keys and usage.

Every command is a thin wrapper over the same plain functions the API uses.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from sqlalchemy.orm import Session

from aimichat.accounts import service as accounts
from aimichat.config import Settings
from aimichat.keys import service as keys
from aimichat.quota import ledger, periods
from aimichat.store.db import Database


def _settings_help() -> str:
    lines = ["Settings come from the environment (prefix AIMICHAT_), CLI options win:\n"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default_factory is None else "(computed)"
        lines.append(f"  AIMICHAT_{name.upper():<22} {field.description or ''} [default: {default}]")
    return "\n\b\n" + "\n".join(lines)


@click.group(epilog=_settings_help())
@click.version_option(package_name="aimichat")
def cli() -> None:
    """AimiChat: an OpenAI-compatible chat API with accounts, API keys and credit quotas."""


@contextmanager
def _session() -> Iterator[Session]:
    """A session that commits on success; any refused input prints one line and exits 1."""
    settings = Settings()
    db = Database(settings.resolved_database_url())
    db.upgrade()
    session = db.session()
    try:
        accounts.ensure_default_tier(session, settings.default_tier)
        yield session
        session.commit()
    except (accounts.AccountError, keys.UnknownKey, ValueError) as exc:
        session.rollback()
        raise click.ClickException(str(exc)) from None
    finally:
        session.close()
        db.dispose()


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# -- serve ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--host", help="Address to listen on [AIMICHAT_HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="Port [AIMICHAT_PORT, default 8000].")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), help="GGUF model file [AIMICHAT_MODEL_PATH].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="State folder [AIMICHAT_DATA_DIR, default ./data].")
@click.option("--engine", type=click.Choice(["embedded", "upstream"]), help="Who answers [AIMICHAT_ENGINE, default embedded].")
@click.option("--upstream-url", help="OpenAI-compatible base URL(s), comma-separated, first is primary [AIMICHAT_UPSTREAM_URL].")
@click.option("--upstream-model", help="Model name sent upstream [AIMICHAT_UPSTREAM_MODEL].")
@click.option("--upstream-api-key", help="Upstream bearer token; prefer AIMICHAT_UPSTREAM_API_KEY (argv is visible to ps).")
@click.option("--parallel", type=click.IntRange(1, 256), help="Requests the embedded model answers together [AIMICHAT_PARALLEL, default 8].")
@click.option("--threads", type=click.IntRange(1, 512),
              help="CPU threads of the embedded model [AIMICHAT_THREADS, default: all cores, split among --workers].")
@click.option("--redis-url", help="Redis for the credit counters of a fleet [AIMICHAT_REDIS_URL].")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes on this host; each loads its own engine (use with --engine upstream).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(log_level: str, workers: int, **options) -> None:
    """Serve the API (and apply pending database migrations first)."""
    import uvicorn

    from aimichat.app import create_app, prepare_database

    overrides = {name: value for name, value in options.items() if value is not None}
    settings = Settings(**overrides)
    _check_serve_settings(settings)
    _configure_logging(log_level)
    db = Database(settings.resolved_database_url())
    prepare_database(db, settings)
    _print_first_steps(db, settings)
    # uvicorn drains on SIGTERM, then re-raises the signal into the handler it found: make that a clean exit.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    common = dict(host=settings.host, port=settings.port, access_log=False, log_level=log_level,
                  timeout_graceful_shutdown=settings.drain_timeout)
    if workers > 1:
        if "threads" not in settings.model_fields_set:
            overrides["threads"] = threads_per_worker(workers)
        # Each worker builds its own app from the environment, so hand the CLI's choices down that way.
        os.environ.update({f"AIMICHAT_{name.upper()}": str(value) for name, value in overrides.items()})
        db.dispose()
        uvicorn.run("aimichat.app:create_app", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(settings, db=db), **common)


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


def _exit_after_drain(signum, frame) -> None:
    raise SystemExit(0)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _print_first_steps(db: Database, settings: Settings) -> None:
    with db.session() as session:
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


@cli.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations."""
    settings = Settings()
    database = Database(settings.resolved_database_url())
    database.upgrade()
    click.echo(f"database at head: {database.engine.url.render_as_string(hide_password=True)}")


# -- tiers ---------------------------------------------------------------------------------------


@cli.group()
def tiers() -> None:
    """Subscription tiers: credit allotments and cost rules."""


def _tier_dict(t) -> dict:
    return {
        "name": t.name,
        "daily_credits": t.daily_credits,
        "monthly_credits": t.monthly_credits,
        "cost_rule": t.cost_rule,
        "credits_per_1k_tokens": t.credits_per_1k_tokens,
    }


@tiers.command("set")
@click.argument("name")
@click.option("--daily-credits", type=int, required=True)
@click.option("--monthly-credits", type=int, default=None)
@click.option("--cost", "cost_rule", type=click.Choice(accounts.COST_RULES), default="per_request", show_default=True)
@click.option("--credits-per-1k-tokens", type=int, default=1, show_default=True)
def tiers_set(name, daily_credits, monthly_credits, cost_rule, credits_per_1k_tokens) -> None:
    """Create or update a tier."""
    with _session() as s:
        tier = accounts.set_tier(s, name, daily_credits=daily_credits, monthly_credits=monthly_credits,
                                 cost_rule=cost_rule, credits_per_1k_tokens=credits_per_1k_tokens)
        click.echo(f"tier {tier.name}: {tier.daily_credits} daily credits, {tier.cost_rule}")


@tiers.command("list")
@click.option("--json", "as_json", is_flag=True)
def tiers_list(as_json) -> None:
    """List tiers."""
    with _session() as s:
        rows = [_tier_dict(t) for t in accounts.list_tiers(s)]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        monthly = r["monthly_credits"] if r["monthly_credits"] is not None else "-"
        click.echo(f"{r['name']:<16} daily={r['daily_credits']:<8} monthly={monthly:<8} {r['cost_rule']}")


# -- accounts ------------------------------------------------------------------------------------


@cli.group("accounts")
def accounts_group() -> None:
    """User accounts."""


def _account_dict(a) -> dict:
    return {"id": a.id, "email": a.email, "tier": a.tier.name, "admin": a.is_admin, "disabled": a.disabled, "created": a.created_at.isoformat()}


@accounts_group.command("create")
@click.argument("email")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--tier", default=None, help="Tier name [default: the default tier].")
@click.option("--admin", is_flag=True, help="Give access to the admin pages.")
def accounts_create(email, password, tier, admin) -> None:
    """Create an account."""
    with _session() as s:
        account = accounts.create_account(s, email, password, tier=tier or Settings().default_tier, is_admin=admin)
        click.echo(f"created account {account.email} (tier {account.tier.name})")


@accounts_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def accounts_list(as_json) -> None:
    """List accounts."""
    with _session() as s:
        rows = [_account_dict(a) for a in accounts.list_accounts(s)]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        flags = " ".join(f for f, on in (("admin", r["admin"]), ("disabled", r["disabled"])) if on)
        click.echo(f"{r['id']:<5} {r['email']:<40} {r['tier']:<12} {flags}")


@accounts_group.command("set-tier")
@click.argument("email")
@click.argument("tier")
def accounts_set_tier(email, tier) -> None:
    """Move an account to another tier."""
    with _session() as s:
        account = accounts.set_account_tier(s, email, tier)
        click.echo(f"{account.email} is now on tier {account.tier.name}")


@accounts_group.command("disable")
@click.argument("email")
def accounts_disable(email) -> None:
    """Disable an account: its keys stop working at once."""
    with _session() as s:
        accounts.set_disabled(s, email, True)
        click.echo(f"disabled {email}")


@accounts_group.command("enable")
@click.argument("email")
def accounts_enable(email) -> None:
    """Enable a disabled account."""
    with _session() as s:
        accounts.set_disabled(s, email, False)
        click.echo(f"enabled {email}")


@accounts_group.command("set-admin")
@click.argument("email")
def accounts_set_admin(email) -> None:
    """Give an account access to the admin pages."""
    with _session() as s:
        accounts.set_admin(s, email, True)
        click.echo(f"{email} is now an admin")


# -- keys ----------------------------------------------------------------------------------------


@cli.group("keys")
def keys_group() -> None:
    """API keys (talk mode only). A key is shown once, when it is created."""


def _key_dict(k) -> dict:
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "created": k.created_at.isoformat(),
        "last_used": k.last_used_at.isoformat() if k.last_used_at else None,
        "status": keys.key_status(k),
    }


@keys_group.command("create")
@click.argument("email")
@click.option("--name", required=True)
def keys_create(email, name) -> None:
    """Create a key; the key alone is the last line of output."""
    with _session() as s:
        created = keys.create_key(s, accounts.get_account(s, email), name)
    click.echo(f"created key {created.key.id} ({created.key.name}) for {email}; it will not be shown again:", err=True)
    click.echo(created.secret)


@keys_group.command("list")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
def keys_list(email, as_json) -> None:
    """List an account's keys (never the keys themselves)."""
    with _session() as s:
        rows = [_key_dict(k) for k in keys.list_keys(s, accounts.get_account(s, email).id)]
    if as_json:
        return _echo_json(rows)
    for r in rows:
        click.echo(f"{r['id']:<5} {r['name']:<24} {r['prefix']}…  created {r['created'][:19]}  last used {(r['last_used'] or '-')[:19]}  {r['status']}")


@keys_group.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id) -> None:
    """Revoke a key by id: it stops working at once."""
    with _session() as s:
        key = keys.revoke_key(s, key_id)
        click.echo(f"revoked key {key.id} ({key.name})")


# -- usage ---------------------------------------------------------------------------------------


@cli.command("usage")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
def usage_cmd(email, as_json) -> None:
    """Today's and this month's credits for an account."""
    from aimichat.api.usage import usage_body

    with _session() as s:
        account = accounts.get_account(s, email)
        principal = keys.principal_for(account)
        body = usage_body(principal, ledger.summary(s, principal, periods.system_clock()))
    if as_json:
        return _echo_json(body)
    d, m = body["daily"], body["monthly"]
    click.echo(f"{account.email} (tier {body['tier']}, {body['cost_rule']})")
    click.echo(f"today:      {d['used']} / {d['limit']} credits, resets {d['resetAt']}")
    click.echo(f"this month: {m['used']} / {m['limit'] if m['limit'] is not None else '-'} credits, resets {m['resetAt']}")
    for k in body["keys_today"]:
        click.echo(f"  key {k['id']:<5} {k['name']:<24} {k['credits']} credits in {k['requests']} requests today")


if __name__ == "__main__":
    cli()
