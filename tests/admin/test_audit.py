"""The audit log: every change to accounts, tiers, prices, models and keys, whether made on the web pages,
through the admin API or with the CLI, names who made it, and never holds a secret; listed with filters
by the admin API, the CLI and the /admin/audit page."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_helpers import PASSWORD, Admin, assert_error, log_in, make_admin_key
from click.testing import CliRunner

from aimichat.accounts import service as accounts
from aimichat.audit import service as audit
from aimichat.cli import cli
from aimichat.keys import service as keys
from aimichat.registry import service as registry
from aimichat.store.db import Database
from aimichat.store.models import AuditEvent
from conftest import AppClient, app_client, make_account, migrated
from scripted_engine import ScriptedEngine


def events(db: Database, **filters: str) -> list[tuple[str, str, str]]:
    """(actor, action, target) of the audit rows matching ``filters``, oldest first."""
    with db.session() as s:
        found = audit.list_events(s, per_page=200, **filters).events
        return [(e.actor, e.action, e.target) for e in reversed(found)]


def all_rows_text(db: Database) -> str:
    with db.session() as s:
        return json.dumps([audit.event_json(e) for e in s.query(AuditEvent).all()])


@pytest.fixture
def sqlite_server(sqlite_url: str, tmp_path: Path) -> Iterator[AppClient]:
    db = migrated(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path) as client:
        yield client
    db.dispose()


def test_web_changes_are_recorded_as_the_logged_in_account(sqlite_server):
    server = sqlite_server
    db = server.db
    with db.session() as s:
        admin_id = accounts.create_account(s, "boss@example.com", PASSWORD, is_admin=True).id
        accounts.set_tier(s, "pro", daily_credits=500)
        s.commit()
    user_id = make_account(db, "user@example.com", password=PASSWORD)

    with server.client() as browser:  # the account holder makes a key and revokes it on the keys page
        token = log_in(browser, "user@example.com")
        made = browser.post("/keys", data={"name": "laptop", "csrf_token": token})
        assert made.status_code == 303, made.text
        with db.session() as s:
            (key,) = keys.list_keys(s, user_id)
        shown = browser.get(made.headers["location"]).text
        secret = re.search(r'<code id="new-key">([^<]+)</code>', shown)
        assert secret and secret.group(1).startswith("aimichat_")
        revoked = browser.post(f"/keys/{key.id}/revoke", data={"confirm": "yes", "csrf_token": token})
        assert revoked.status_code == 303

    with server.client() as browser:  # an admin moves the account to another tier and disables it
        token = log_in(browser, "boss@example.com")
        assert (
            browser.post(f"/admin/accounts/{user_id}/tier", data={"tier": "pro", "csrf_token": token}).status_code
            == 303
        )
        disabled = browser.post(f"/admin/accounts/{user_id}/disable", data={"confirm": "yes", "csrf_token": token})
        assert disabled.status_code == 303

    with server.client() as browser:  # a sign-up has nobody logged in: the new account made itself
        page = browser.get("/signup").text
        token = re.search(r'<meta name="csrf-token" content="([^"]*)">', page)
        assert token
        signed = browser.post(
            "/signup", data={"email": "new@example.com", "password": PASSWORD, "csrf_token": token.group(1)}
        )
        assert signed.status_code == 303
    with db.session() as s:
        new_id = accounts.get_account(s, "new@example.com").id

    assert events(db, target=f"key:{key.id}") == [
        (f"account:{user_id}", "key.created", f"key:{key.id}"),
        (f"account:{user_id}", "key.revoked", f"key:{key.id}"),
    ]
    assert events(db, actor=f"account:{admin_id}") == [
        (f"account:{admin_id}", "account.tier_changed", f"account:{user_id}"),
        (f"account:{admin_id}", "account.disabled", f"account:{user_id}"),
    ]
    assert events(db, target=f"account:{new_id}") == [(f"account:{new_id}", "account.created", f"account:{new_id}")]
    with db.session() as s:
        (moved,) = audit.list_events(s, action="account.tier_changed").events
        assert moved.detail == {"from": "free", "to": "pro"}
    assert secret.group(1) not in all_rows_text(db)


def test_cli_changes_are_recorded_as_the_cli_and_listed_by_aimichat_audit(sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    run("tiers", "set", "pro", "--daily-credits", "100", "--rpm", "5")
    run("tiers", "set", "pro", "--monthly-credits", "1000")
    run("prices", "set", "pro", "aimichat-1", "--per-request", "2")
    run("accounts", "create", "cli@example.com", "--password", PASSWORD, "--tier", "pro")
    secret = run("keys", "create", "cli@example.com", "--name", "ci", "--daily-cap", "9").splitlines()[-1]
    run("keys", "set", "1", "--rpm", "3")
    rotated = run("keys", "rotate", "1").splitlines()[-1]
    run("keys", "revoke", "1")
    admin_secret = run("admin-keys", "create", "--name", "ops").splitlines()[-1]
    assert admin_secret.startswith("aimichat_admin_")
    assert "ops" in run("admin-keys", "list") and admin_secret not in run("admin-keys", "list")
    run("admin-keys", "revoke", "1")
    assert "revoked" in run("admin-keys", "list")

    listed = json.loads(run("audit", "--actor", "cli", "--json"))
    assert [(e["action"], e["target"]) for e in reversed(listed)] == [
        ("tier.saved", "tier:free"),  # the default tier of the fresh database, made by the first command
        ("tier.saved", "tier:pro"),
        ("tier.limits_changed", "tier:pro"),
        ("tier.saved", "tier:pro"),
        ("price.set", "price:pro/aimichat-1"),
        ("account.created", "account:1"),
        ("key.created", "key:1"),
        ("key.limits_changed", "key:1"),
        ("key.rotated", "key:1"),
        ("key.revoked", "key:1"),
        ("admin_key.created", "admin_key:1"),
        ("admin_key.revoked", "admin_key:1"),
    ]
    assert listed[-3]["detail"] == {"rpm": 5}
    assert {e["actor"] for e in listed} == {"cli"}
    assert json.loads(run("audit", "--action", "key.created", "--json"))[0]["detail"] == {
        "account_id": 1,
        "name": "ci",
        "daily_cap": 9,
    }
    table = run("audit", "--target", "key:1")
    assert table.splitlines()[0].split() == ["ID", "WHEN", "ACTOR", "ACTION", "TARGET", "DETAIL"]
    assert len(table.splitlines()) == 5
    everything = run("audit", "--per-page", "200")
    for shown_once in (secret, rotated, admin_secret, PASSWORD):
        assert shown_once not in everything


def test_the_admin_api_lists_the_audit_log_with_filters_and_pages(server):
    admin_id, secret = make_admin_key(server.db)
    admin = Admin(server.http, secret)
    account = admin.post("/accounts", json={"email": "a@example.com", "password": PASSWORD}).json()
    for n in range(3):
        key = admin.post(f"/accounts/{account['id']}/keys", json={"name": f"k{n}"}).json()
        admin.delete(f"/keys/{key['id']}")
    with server.db.session() as s:
        registry.add_alias(s, "aimichat-1", "gpt-4o-mini")  # a change with no one known: the system's
        s.commit()

    page = admin.get("/audit", params={"actor": f"admin_key:{admin_id}", "per_page": 4}).json()
    assert (page["total"], page["has_more"]) == (7, True)
    assert [e["action"] for e in page["data"]] == ["key.revoked", "key.created", "key.revoked", "key.created"]
    assert page["data"][0]["detail"] == {"account_id": account["id"], "name": "k2"}
    second = admin.get("/audit", params={"actor": f"admin_key:{admin_id}", "per_page": 4, "page": 2}).json()
    assert [e["action"] for e in second["data"]] == ["key.revoked", "key.created", "account.created"]
    assert not second["has_more"]
    revoked = admin.get("/audit", params={"action": "key.revoked"}).json()["data"]
    assert len(revoked) == 3 and {e["object"] for e in revoked} == {"audit_event"}
    assert admin.get("/audit", params={"target": f"account:{account['id']}"}).json()["total"] == 1
    (alias,) = admin.get("/audit", params={"target": "alias:gpt-4o-mini"}).json()["data"]
    assert (alias["actor"], alias["action"], alias["detail"]) == ("system", "alias.added", {"model": "aimichat-1"})
    assert_error(admin.get("/audit", params={"per_page": 500}), 400, param="query.per_page")


def test_a_change_rolled_back_leaves_no_row_and_details_never_carry_secrets(database):
    before = events(database)
    with database.session() as s:
        audit.act_as(s, audit.CLI)
        accounts.create_account(s, "gone@example.com", PASSWORD)
        s.rollback()
    assert events(database) == before

    with database.session() as s, pytest.raises(ValueError, match="must not carry 'password'"):
        audit.record(s, audit.CLI, "account.created", "account:1", {"password": "x"})

    account_id = make_account(database, "leak@example.com")
    with database.session() as s:
        key = keys.create_key(s, accounts.get_account_by_id(s, account_id), "leaky")
        keys.revoke_key(s, key.key.id)
        audit.key_reported_leaked(s, key.key.id, "https://github.com/x/y/blob/main/.env")
        s.commit()
    assert events(database, target=f"key:{key.key.id}")[-2:] == [
        ("system", "key.revoked", f"key:{key.key.id}"),
        ("report", "key.reported_leaked", f"key:{key.key.id}"),
    ]
    assert key.secret not in all_rows_text(database)


def test_the_audit_page_is_for_admins_and_filters(sqlite_server):
    server = sqlite_server
    with server.db.session() as s:
        admin_id = accounts.create_account(s, "boss@example.com", PASSWORD, is_admin=True).id
        s.commit()
    make_account(server.db, "user@example.com", password=PASSWORD)
    with server.client() as browser:
        log_in(browser, "user@example.com")
        assert browser.get("/admin/audit").status_code == 403
    with server.client() as browser:
        token = log_in(browser, "boss@example.com")
        browser.post("/admin/accounts/2/disable", data={"confirm": "yes", "csrf_token": token})
        page = browser.get("/admin/audit", params={"actor": f"account:{admin_id}"})
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "account.disabled" in page.text and "account.created" not in page.text
        everything = browser.get("/admin/audit").text
        assert "account.created" in everything and "<code>system</code>" in everything
        assert "No changes match these filters" in browser.get("/admin/audit", params={"action": "nope"}).text
        assert "<script>" not in browser.get("/admin/audit", params={"target": "<script>"}).text
