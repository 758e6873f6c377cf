"""The admin API (/admin/v1) through the real app: accounts, keys, tiers, prices, usage, the ledger, its
authentication (admin keys only, 403 both ways), its 400s in OpenAI's shape and its rate limit."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_helpers import Admin, assert_error, make_admin_key

from aimichat.audit import service as audit
from aimichat.keys import admin_keys
from aimichat.keys import service as keys
from aimichat.store.clock import utcnow
from aimichat.store.models import AdminKey
from conftest import AppClient, app_client, make_account, make_key, migrated
from scripted_engine import ScriptedEngine

HELLO = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3}


@pytest.fixture
def sqlite_server(sqlite_url: str, tmp_path: Path) -> Iterator[AppClient]:
    """The app over a new SQLite database, for what the database does not change."""
    db = migrated(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path) as client:
        yield client
    db.dispose()


@pytest.fixture
def admin(sqlite_server: AppClient) -> Admin:
    return Admin(sqlite_server.http, make_admin_key(sqlite_server.db)[1])


def test_an_account_and_a_capped_key_made_through_the_api_serve_chat_until_revoked(server):
    key_id, secret = make_admin_key(server.db)
    admin = Admin(server.http, secret)
    tier = admin.put("/tiers/pro", json={"daily_credits": 1000, "rpm": 100})
    assert tier.status_code == 200, tier.text
    assert tier.json()["daily_credits"] == 1000 and tier.json()["rpm"] == 100

    made = admin.post("/accounts", json={"email": "Ada@Example.com", "password": "a-long-password", "tier": "pro"})
    assert made.status_code == 201, made.text
    account = made.json()
    assert account["object"] == "account" and account["email"] == "ada@example.com" and account["tier"] == "pro"
    assert admin.get(f"/accounts/{account['id']}").json() == account

    created = admin.post(f"/accounts/{account['id']}/keys", json={"name": "signup", "daily_cap": 2})
    assert created.status_code == 201, created.text
    api_key = created.json()
    assert api_key["key"].startswith("aimichat_") and keys.tokens.is_well_formed(api_key["key"])
    assert api_key["limits"]["daily_cap"] == 2 and api_key["account_id"] == account["id"]
    listed = admin.get(f"/accounts/{account['id']}/keys").json()["data"]
    assert [k["id"] for k in listed] == [api_key["id"]] and "key" not in listed[0]  # the secret was shown once

    assert server.chat(HELLO, api_key["key"]).status_code == 200
    assert server.chat(HELLO, api_key["key"]).status_code == 200
    assert server.chat(HELLO, api_key["key"]).status_code == 429  # the key's own cap of 2 credits a day

    today = utcnow().date().isoformat()
    usage = admin.get("/usage", params={"account_id": account["id"], "from": today, "to": today})
    assert usage.status_code == 200, usage.text
    (row,) = usage.json()["data"]
    assert row.pop("prompt_tokens") > 0
    assert row == {
        "day": today,
        "account_id": account["id"],
        "key_id": api_key["id"],
        "model": "aimichat-1",
        "requests": 2,
        "credits": 2,
        "completion_tokens": 6,
    }

    revoked = admin.delete(f"/keys/{api_key['id']}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert_error(server.chat(HELLO, api_key["key"]), 401, code="invalid_api_key")

    with server.db.session() as s:
        actions = [(e.actor, e.action, e.target) for e in reversed(audit.list_events(s).events)]
    by_admin = [(action, target) for actor, action, target in actions if actor == f"admin_key:{key_id}"]
    assert by_admin == [
        ("tier.saved", "tier:pro"),
        ("tier.limits_changed", "tier:pro"),
        ("account.created", f"account:{account['id']}"),
        ("key.created", f"key:{api_key['id']}"),
        ("key.revoked", f"key:{api_key['id']}"),
    ]


def test_admin_keys_cannot_chat_and_api_keys_cannot_administer(sqlite_server):
    server = sqlite_server
    make_account(server.db, "user@example.com")
    api_key = make_key(server.db, "user@example.com")
    admin_id, admin_key = make_admin_key(server.db)

    refused = server.chat(HELLO, admin_key)
    assert_error(refused, 403, code="admin_key_not_allowed")
    assert refused.json()["error"]["type"] == "permission_error"
    assert_error(server.http.get("/v1/key", headers={"Authorization": f"Bearer {admin_key}"}), 403)
    assert_error(Admin(server.http, api_key).get("/accounts"), 403, code="admin_key_required")

    # Anything else is a 401: nothing, a made-up key of either format, a revoked admin key, a key in the URL.
    made_up = admin_keys.generate()
    assert_error(server.http.get("/admin/v1/accounts"), 401, code="invalid_admin_key")
    assert_error(Admin(server.http, made_up).get("/accounts"), 401, code="invalid_admin_key")
    assert_error(Admin(server.http, keys.tokens.generate_key()).get("/accounts"), 401, code="invalid_admin_key")
    assert_error(server.chat(HELLO, made_up), 401, code="invalid_api_key")
    assert_error(server.http.get("/admin/v1/accounts", params={"api_key": admin_key}), 401)
    assert Admin(server.http, admin_key).get("/accounts").status_code == 200
    with server.db.session() as s:
        admin_keys.revoke(s, admin_id)
        s.commit()
    assert_error(Admin(server.http, admin_key).get("/accounts"), 401, code="invalid_admin_key")


def test_admin_keys_have_their_own_prefix_and_only_their_hash_is_stored(sqlite_server):
    key_id, secret = make_admin_key(sqlite_server.db)
    assert secret.startswith("aimichat_admin_") and len(secret) == admin_keys.KEY_LEN
    assert admin_keys.is_well_formed(secret) and not keys.tokens.is_well_formed(secret)
    assert not admin_keys.is_well_formed(secret[:-1] + ("A" if secret[-1] != "A" else "B"))  # the checksum
    with sqlite_server.db.session() as s:
        row = s.get(AdminKey, key_id)
        assert row is not None and row.key_hash == keys.tokens.hash_key(secret)
        assert row.prefix == secret[: len("aimichat_admin_") + 4]
        stored = [str(value) for value in row.__dict__.values()]
    assert not any(secret in value for value in stored)


def test_bad_input_is_a_400_in_openai_shape_naming_the_field(admin):
    assert_error(admin.post("/accounts", json={"password": "a-long-password"}), 400, param="email")
    assert_error(admin.post("/accounts", json={"email": "a@example.com", "password": 12345678}), 400, param="password")
    assert_error(
        admin.post("/accounts", json={"email": "a@example.com", "password": "a-long-password", "plan": "x"}),
        400,
        param="plan",
    )
    assert "8 characters" in assert_error(
        admin.post("/accounts", json={"email": "a@example.com", "password": "short"}), 400
    )
    assert "Unknown tier 'gold'" in assert_error(
        admin.post("/accounts", json={"email": "a@example.com", "password": "a-long-password", "tier": "gold"}), 400
    )
    assert_error(admin.post("/accounts", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    account = admin.post("/accounts", json={"email": "a@example.com", "password": "a-long-password"}).json()
    assert "already exists" in assert_error(
        admin.post("/accounts", json={"email": "A@example.com", "password": "a-long-password"}), 400
    )
    assert_error(admin.get("/accounts/999"), 404, code="account_not_found")
    assert_error(admin.get("/accounts/0"), 400)
    assert_error(admin.patch(f"/accounts/{account['id']}", json={}), 400)
    assert_error(admin.patch(f"/accounts/{account['id']}", json={"disabled": "yes"}), 400, param="disabled")

    keys_path = f"/accounts/{account['id']}/keys"
    assert_error(admin.post(keys_path, json={"daily_cap": 5}), 400, param="name")
    assert_error(admin.post(keys_path, json={"name": "x", "daily_cap": "5"}), 400, param="daily_cap")
    assert "negative" in assert_error(admin.post(keys_path, json={"name": "x", "daily_cap": -1}), 400)
    assert_error(
        admin.post(keys_path, json={"name": "x", "expires_at": "2001-01-01T00:00:00Z"}), 400, param="expires_at"
    )
    assert_error(admin.post(keys_path, json={"name": "x", "models": ["no-such-model"]}), 400, param="models")
    assert_error(admin.post(keys_path, json={"name": "x", "ips": ["10.0.0.300/8"]}), 400)
    assert_error(admin.post("/accounts/999/keys", json={"name": "x"}), 404, code="account_not_found")
    assert_error(admin.delete("/keys/999"), 404, code="key_not_found")
    assert_error(admin.post("/keys/999/rotate"), 404, code="key_not_found")

    assert "before the start" in assert_error(
        admin.get("/usage", params={"from": "2025-02-01", "to": "2025-01-01"}), 400
    )
    assert_error(admin.get("/usage", params={"from": "yesterday"}), 400)
    assert_error(admin.get("/accounts", params={"page": 0}), 400, param="query.page")
    assert "daily credits" in assert_error(admin.put("/tiers/new", json={"rpm": 5}), 400)
    assert_error(admin.put("/tiers/new", json={"daily_credits": -5}), 400, param="daily_credits")
    assert "either a per-request price" in assert_error(admin.put("/prices/free/aimichat-1", json={}), 400)


def test_accounts_are_listed_a_page_at_a_time_and_searched_by_email(server):
    admin = Admin(server.http, make_admin_key(server.db)[1])
    for n in range(7):
        made = admin.post(
            "/accounts", json={"email": f"user{n}@{'acme' if n % 2 else 'other'}.com", "password": "a-long-password"}
        )
        assert made.status_code == 201
    admin.post("/accounts", json={"email": "x_y%z@acme.com", "password": "a-long-password"})

    first = admin.get("/accounts", params={"per_page": 3}).json()
    assert [a["email"] for a in first["data"]] == ["user0@other.com", "user1@acme.com", "user2@other.com"]
    assert (first["page"], first["total"], first["has_more"]) == (1, 8, True)
    last = admin.get("/accounts", params={"per_page": 3, "page": 3}).json()
    assert [a["email"] for a in last["data"]] == ["user6@other.com", "x_y%z@acme.com"] and not last["has_more"]
    assert admin.get("/accounts", params={"per_page": 3, "page": 4}).json()["data"] == []

    acme = admin.get("/accounts", params={"q": "ACME"}).json()
    assert [a["email"] for a in acme["data"]] == [
        "user1@acme.com",
        "user3@acme.com",
        "user5@acme.com",
        "x_y%z@acme.com",
    ]
    # The search's wildcards are plain characters: "_" and "%" match themselves only.
    assert [a["email"] for a in admin.get("/accounts", params={"q": "_y%"}).json()["data"]] == ["x_y%z@acme.com"]
    assert admin.get("/accounts", params={"q": "r_@"}).json()["total"] == 0


def test_tiers_prices_account_changes_limits_and_rotation(admin, sqlite_server):
    created = admin.put("/tiers/team", json={"daily_credits": 50, "monthly_credits": 900, "max_keys": 5})
    assert created.json()["monthly_credits"] == 900
    changed = admin.put("/tiers/team", json={"rpm": 7, "models": ["aimichat-1"]}).json()
    assert (changed["daily_credits"], changed["monthly_credits"], changed["rpm"]) == (50, 900, 7)  # the rest stays
    assert changed["models"] == ["aimichat-1"]
    assert admin.put("/tiers/team", json={"monthly_credits": None}).json()["monthly_credits"] is None
    # Only the monthly limit may be removed: the others always have a value (a 400, not a 500).
    for field in ("daily_credits", "cost_rule", "credits_per_1k_tokens"):
        assert "cannot be empty" in assert_error(admin.put("/tiers/team", json={field: None}), 400)
    assert {t["name"] for t in admin.get("/tiers").json()} == {"free", "team"}

    price = admin.put("/prices/team/aimichat-1", json={"per_request": 3})
    assert price.status_code == 200 and price.json()["tier"] == "team"
    assert [p["model"] for p in admin.get("/prices", params={"tier": "team"}).json()["data"]] == ["aimichat-1"]
    assert admin.delete("/prices/team/aimichat-1").status_code == 204
    assert admin.get("/prices").json()["data"] == []
    assert_error(admin.delete("/prices/team/aimichat-1"), 400)

    account = admin.post("/accounts", json={"email": "t@example.com", "password": "a-long-password"}).json()
    moved = admin.patch(f"/accounts/{account['id']}", json={"tier": "team", "disabled": True})
    assert moved.json()["tier"] == "team" and moved.json()["disabled"] is True
    key = admin.post(f"/accounts/{account['id']}/keys", json={"name": "ci", "rpm": 10}).json()
    assert_error(sqlite_server.chat(HELLO, key["key"]), 403, code="account_disabled")
    assert admin.patch(f"/accounts/{account['id']}", json={"disabled": False}).json()["disabled"] is False
    assert sqlite_server.chat(HELLO, key["key"]).status_code == 200

    limits = admin.patch(f"/keys/{key['id']}", json={"rpm": None, "monthly_cap": 40}).json()["limits"]
    assert (limits["rpm"], limits["monthly_cap"]) == (None, 40)
    rotated = admin.post(f"/keys/{key['id']}/rotate", json={"grace": "1h"})
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["id"] == key["id"] and new["key"] != key["key"] and new["old_secret_valid_until"]
    assert sqlite_server.chat(HELLO, new["key"]).status_code == 200
    assert sqlite_server.chat(HELLO, key["key"]).status_code == 200  # the old secret, within its grace
    assert_error(admin.post(f"/keys/{key['id']}/rotate", json={"grace": "1y"}), 400, param="grace")
    admin.delete(f"/keys/{key['id']}")
    assert "revoked" in assert_error(admin.patch(f"/keys/{key['id']}", json={"rpm": 5}), 400)


def test_the_ledger_comes_as_csv(admin, sqlite_server):
    account = admin.post("/accounts", json={"email": "c@example.com", "password": "a-long-password"}).json()
    key = admin.post(f"/accounts/{account['id']}/keys", json={"name": "=cmd|calc"}).json()
    assert sqlite_server.chat(HELLO, key["key"]).status_code == 200
    answer = admin.get(f"/accounts/{account['id']}/ledger")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert len(rows) == 1 and rows[0]["key_id"] == str(key["id"]) and rows[0]["credits"] == "1"
    assert rows[0]["key_name"] == "'=cmd|calc"  # the spreadsheet guard of the usage page's CSV
    old = (dt.date.today() - dt.timedelta(days=40)).isoformat()
    empty = admin.get(f"/accounts/{account['id']}/ledger", params={"from": old, "to": old})
    assert empty.text.count("\n") == 1  # the header alone
    assert_error(admin.get("/accounts/999/ledger"), 404)


def test_each_admin_key_is_rate_limited(sqlite_url, tmp_path):
    db = migrated(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path, admin_rpm=3) as server:
        one, other = Admin(server.http, make_admin_key(db)[1]), Admin(server.http, make_admin_key(db, "b")[1])
        assert [one.get("/tiers").status_code for _ in range(3)] == [200, 200, 200]
        refused = one.get("/tiers")
        assert_error(refused, 429, code="rate_limit_exceeded")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert other.get("/tiers").status_code == 200  # per key
    db.dispose()


def test_the_openapi_document_describes_the_admin_api(sqlite_server):
    spec = sqlite_server.http.get("/openapi.json").json()
    for path in (
        "/admin/v1/accounts",
        "/admin/v1/accounts/{account_id}/keys",
        "/admin/v1/keys/{key_id}",
        "/admin/v1/usage",
    ):
        assert path in spec["paths"], path
    create = spec["paths"]["/admin/v1/accounts"]["post"]
    assert "201" in create["responses"] and "400" in create["responses"] and "422" not in create["responses"]
    assert create["security"] == [{"AdminKey": []}]
    assert spec["components"]["securitySchemes"]["AdminKey"]["scheme"] == "bearer"
