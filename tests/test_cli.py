"""The operator CLI, run as a user would: `aimichat ...` in a subprocess-free Click runner over a real database."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from aimichat.accounts.service import DEFAULT_DAILY_CREDITS
from aimichat.cli import cli
from aimichat.config import Settings
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


def test_help_documents_commands_and_points_to_the_settings(run):
    out = run("--help").output
    for word in ("serve", "tiers", "accounts", "keys", "usage", "db", "settings", "`aimichat settings`"):
        assert word in out
    serve = run("serve", "--help").output
    assert "--host" in serve and "--port" in serve and "--model" in serve
    assert "Address to listen on.  [default: 127.0.0.1]" in serve  # help and default come from Settings


def test_settings_lists_every_setting_as_a_table_and_never_a_secret(run, monkeypatch):
    monkeypatch.setenv("AIMICHAT_UPSTREAM_API_KEY", "sk-very-secret")
    monkeypatch.setenv("COLUMNS", "200")
    lines = run("settings").output.splitlines()
    assert lines[0].split() == ["NAME", "ENV", "VAR", "DEFAULT", "DESCRIPTION"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line[:1] != " "}
    assert set(rows) == set(Settings.model_fields)
    assert rows["host"][:3] == ["host", "AIMICHAT_HOST", "127.0.0.1"]
    assert rows["max_queue"][:4] == ["max_queue", "AIMICHAT_MAX_QUEUE", "64", "Requests"]
    assert rows["database_url"][1] == "AIMICHAT_DATABASE_URL" and rows["model_path"][1] == "AIMICHAT_MODEL_PATH"
    assert "sk-very-secret" not in "\n".join(lines)


def test_serve_options_override_the_environment_only_when_given(run, monkeypatch):
    import uvicorn

    import aimichat.app

    monkeypatch.setenv("AIMICHAT_PORT", "9123")
    monkeypatch.setenv("AIMICHAT_HOST", "10.0.0.1")
    built = []
    monkeypatch.setattr(aimichat.app, "create_app", lambda settings, **_: built.append(settings))
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    monkeypatch.setattr("signal.signal", lambda *args: None)
    run("serve", "--host", "127.0.0.2", "--engine", "upstream", "--upstream-url", "http://127.0.0.1:9/v1")
    [settings] = built
    assert (settings.host, settings.port, settings.engine) == ("127.0.0.2", 9123, "upstream")
    assert settings.model_fields_set >= {"host", "port", "engine", "upstream_url"}
    assert "parallel" not in settings.model_fields_set  # left out: not passed down as a default


def test_a_fresh_database_has_the_free_tier(run):
    tiers = json.loads(run("tiers", "list", "--json").output)
    assert tiers == [
        {
            "name": "free",
            "daily_credits": DEFAULT_DAILY_CREDITS,
            "monthly_credits": None,
            "cost_rule": "per_request",
            "credits_per_1k_tokens": 1,
            "models": None,
            "rpm": None,
            "tpm": None,
            "max_keys": None,
            "max_concurrent": None,
            "max_prompt_tokens": None,
            "max_n": None,
        }
    ]


def test_tiers_accounts_and_keys_round_trip(run):
    run(
        "tiers",
        "set",
        "pro",
        "--daily-credits",
        "5000",
        "--monthly-credits",
        "100000",
        "--cost",
        "per_token",
        "--credits-per-1k-tokens",
        "2",
    )
    changed = json.loads(run("tiers", "set", "pro", "--rpm", "30", "--json").output)
    assert (changed["name"], changed["daily_credits"], changed["rpm"], changed["cost_rule"]) == (
        "pro",
        5000,
        30,
        "per_token",
    )
    assert changed == next(t for t in json.loads(run("tiers", "list", "--json").output) if t["name"] == "pro")
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
    free = DEFAULT_DAILY_CREDITS
    assert usage["daily"] == {"used": 0, "limit": free, "remaining": free, "resetAt": usage["daily"]["resetAt"]}


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


def test_keys_carry_limits_set_them_and_rotate(run):
    run("tiers", "set", "team", "--daily-credits", "500")
    run("tiers", "set", "team", "--rpm", "60", "--tpm", "90000", "--max-keys", "3")  # an update keeps the rest
    [team] = [t for t in json.loads(run("tiers", "list", "--json").output) if t["name"] == "team"]
    assert (team["daily_credits"], team["rpm"], team["tpm"], team["max_keys"]) == (500, 60, 90000, 3)
    run("accounts", "create", "cy@example.com", "--password", "long enough", "--tier", "team")
    created = run(
        "keys", "create", "cy@example.com", "--name", "ci", "--daily-cap", "50", "--rpm", "10",
        "--expires", "2030-01-31T12:00:00+01:00", "--models", "aimichat-1", "--ips", "10.1.2.3/8,::1",
    )  # fmt: skip
    key = created.stdout.strip().splitlines()[-1]
    [listed] = json.loads(run("keys", "list", "cy@example.com", "--json").output)
    assert {k: listed[k] for k in ("daily_cap", "monthly_cap", "rpm", "tpm", "models", "ips")} == {
        "daily_cap": 50,
        "monthly_cap": None,
        "rpm": 10,
        "tpm": None,
        "models": ["aimichat-1"],
        "ips": ["10.0.0.0/8", "::1/128"],
    }
    assert listed["expires_at"] == "2030-01-31T11:00:00Z"
    run("keys", "set", str(listed["id"]), "--daily-cap", "", "--tpm", "500", "--expires-in", "30d")
    [changed] = json.loads(run("keys", "list", "cy@example.com", "--json").output)
    assert (changed["daily_cap"], changed["rpm"], changed["tpm"]) == (None, 10, 500)
    assert changed["expires_at"] is not None
    rotated = run("keys", "rotate", str(listed["id"]), "--grace", "1h")
    new_key = rotated.stdout.strip().splitlines()[-1]
    assert tokens.is_well_formed(new_key) and new_key != key and "works until" in rotated.stderr
    [after] = json.loads(run("keys", "list", "cy@example.com", "--json").output)
    assert after["id"] == listed["id"] and after["prefix"] == new_key[:13] and after["previous_valid_until"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("keys", "create", "dee@example.com", "--name", "k", "--rpm", "0"), "at least 1"),
        (("keys", "create", "dee@example.com", "--name", "k", "--daily-cap", "-1"), "cannot be negative"),
        (("keys", "create", "dee@example.com", "--name", "k", "--ips", "10.0.0.300/8"), "not an IP range"),
    ],
)
def test_bad_key_limits_are_one_line_and_exit_1(run, args, message):
    run("accounts", "create", "dee@example.com", "--password", "long enough")
    result = run(*args, ok=False)
    assert result.exit_code == 1 and message in result.stderr
    assert "Traceback" not in result.output


def test_bad_durations_and_times_are_usage_errors(run):
    run("accounts", "create", "ed@example.com", "--password", "long enough")
    result = run("keys", "create", "ed@example.com", "--name", "k", "--expires-in", "30 days", ok=False)
    assert result.exit_code == 2 and "use a number and m, h, d or w" in result.output
    result = run("keys", "create", "ed@example.com", "--name", "k", "--expires", "tomorrow", ok=False)
    assert result.exit_code == 2 and "ISO-8601" in result.output
    assert json.loads(run("keys", "list", "ed@example.com", "--json").output) == []


def test_lists_have_a_header_and_say_what_to_do_when_empty(run):
    assert "No accounts yet: aimichat accounts create EMAIL" in run("accounts", "list").output
    assert run("tiers", "list").output.splitlines()[0].split()[:3] == ["NAME", "DAILY", "MONTHLY"]
    run("accounts", "create", "fay@example.com", "--password", "long enough")
    assert run("accounts", "list").output.splitlines()[0].split() == ["ID", "EMAIL", "TIER", "CREATED", "FLAGS"]
    assert "No keys for fay@example.com: aimichat keys create" in run("keys", "list", "fay@example.com").output


def test_json_on_create_and_times_with_their_zone(run):
    account = json.loads(run("accounts", "create", "gus@example.com", "--password", "long enough", "--json").output)
    assert account["email"] == "gus@example.com" and account["created"].endswith("Z")
    created = json.loads(run("keys", "create", "gus@example.com", "--name", "ci", "--json").stdout)
    assert tokens.is_well_formed(created["key"]) and created["prefix"] == created["key"][:13]
    assert created["id"] >= 1 and created["created"].endswith("Z")
    again = run("keys", "create", "gus@example.com", "--name", "ci")
    assert "already has an active key named 'ci'" in again.stderr
    assert all(k["created"].endswith("Z") for k in json.loads(run("keys", "list", "gus@example.com", "--json").output))


def test_an_unknown_tier_names_the_tiers_that_exist(run):
    result = run("accounts", "create", "hal@example.com", "--password", "long enough", "--tier", "gold", ok=False)
    assert "unknown tier 'gold' (tiers: free)" in result.stderr
