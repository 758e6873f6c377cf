"""The operator CLI, run as a user would: `aimichat ...` in a subprocess-free Click runner over a real database."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from aimichat.cli import cli
from aimichat.keys import tokens


@pytest.fixture
def run(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", db_url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output + result.stderr
        return result

    return invoke


def test_help_documents_commands_and_settings(run):
    out = run("--help").output
    for word in ("serve", "tiers", "accounts", "keys", "usage", "db", "AIMICHAT_DATABASE_URL", "AIMICHAT_MODEL_PATH", "AIMICHAT_MAX_QUEUE"):
        assert word in out
    serve = run("serve", "--help").output
    assert "--host" in serve and "--port" in serve and "--model" in serve


def test_a_fresh_database_has_the_free_tier(run):
    tiers = json.loads(run("tiers", "list", "--json").output)
    assert tiers == [{"name": "free", "daily_credits": 100, "monthly_credits": None, "cost_rule": "per_request", "credits_per_1k_tokens": 1}]


def test_tiers_accounts_and_keys_round_trip(run):
    run("tiers", "set", "pro", "--daily-credits", "5000", "--monthly-credits", "100000", "--cost", "per_token", "--credits-per-1k-tokens", "2")
    run("accounts", "create", "Ada@Example.com", "--password", "long enough", "--tier", "pro")
    accounts = json.loads(run("accounts", "list", "--json").output)
    assert [(a["email"], a["tier"]) for a in accounts] == [("ada@example.com", "pro")]

    result = run("keys", "create", "ada@example.com", "--name", "laptop")
    key = result.stdout.strip().splitlines()[-1]
    assert tokens.is_well_formed(key)

    listed = json.loads(run("keys", "list", "ADA@example.com", "--json").output)
    assert [(k["name"], k["prefix"], k["status"]) for k in listed] == [("laptop", key[:13], "active")]
    assert key not in run("keys", "list", "ada@example.com").output

    run("keys", "revoke", str(listed[0]["id"]))
    assert json.loads(run("keys", "list", "ada@example.com", "--json").output)[0]["status"] == "revoked"

    run("accounts", "set-tier", "ada@example.com", "free")
    run("accounts", "disable", "ada@example.com")
    [account] = json.loads(run("accounts", "list", "--json").output)
    assert account["tier"] == "free" and account["disabled"] is True

    usage = json.loads(run("usage", "ada@example.com", "--json").output)
    assert usage["daily"] == {"used": 0, "limit": 100, "remaining": 100, "resetAt": usage["daily"]["resetAt"]}


@pytest.mark.parametrize(
    "args, message",
    [
        (("accounts", "create", "x@example.com", "--password", "short"), "at least 8 characters"),
        (("accounts", "create", "x@example.com", "--password", "long enough", "--tier", "gold"), "unknown tier 'gold'"),
        (("accounts", "create", "not-an-email", "--password", "long enough"), "not a valid email"),
        (("keys", "create", "nobody@example.com", "--name", "k"), "no account for nobody@example.com"),
        (("accounts", "set-tier", "nobody@example.com", "free"), "no account"),
        (("keys", "revoke", "999"), "no API key with id 999"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_1(run, args, message):
    result = run(*args, ok=False)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_duplicate_account_is_refused_and_nothing_is_half_written(run):
    run("accounts", "create", "bo@example.com", "--password", "long enough")
    result = run("accounts", "create", "BO@example.com", "--password", "other password", ok=False)
    assert "already exists" in result.stderr
    assert len(json.loads(run("accounts", "list", "--json").output)) == 1
