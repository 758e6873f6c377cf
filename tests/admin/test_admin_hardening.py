"""Review findings of the admin API (issue 16), each through the real app: out-of-range input is a 400 naming
the field (admin API and account API alike), admin keys only as Bearer, Idempotency-Key on the create
operations (a replay holds no secret, and is kept only once the change is committed), usage alert settings,
and two requests creating the same account at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_helpers import PASSWORD, Admin, assert_error, log_in, make_admin_key
from sqlalchemy import func, select, text

from aimichat.accounts import service as accounts
from aimichat.audit import service as audit
from aimichat.idempotency import records
from aimichat.store.models import Account, ApiKey, IdempotencyRecord
from conftest import AppClient, app_client, make_account, migrated
from scripted_engine import ScriptedEngine

HELLO = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3}
NEW_ACCOUNT = {"email": "ada@example.com", "password": "a-long-password"}
# Valid ISO 8601, but past year 9999 (or before year 1) once moved to UTC: Python's OverflowError, once a 500.
BEYOND_THE_CALENDAR = ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+14:00"]
HUGE_GRACE = ["99999999999999999999", "9" * 5000, 10**30, "99999999999d"]


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[AppClient]:
    db = migrated(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path) as client:
        yield client
    db.dispose()


@pytest.fixture
def admin(server: AppClient) -> Admin:
    return Admin(server.http, make_admin_key(server.db)[1])


def count(server: AppClient, model: type) -> int:
    with server.db.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


# -- out-of-range input --------------------------------------------------------------------------


def test_times_and_graces_out_of_range_are_a_400_naming_the_field_in_the_admin_api(admin):
    account = admin.post("/accounts", json=NEW_ACCOUNT).json()
    key = admin.post(f"/accounts/{account['id']}/keys", json={"name": "ci"}).json()
    for moment in BEYOND_THE_CALENDAR:
        assert "out of range" in assert_error(
            admin.patch(f"/keys/{key['id']}", json={"expires_at": moment}), 400, param="expires_at"
        )
        made = admin.post(f"/accounts/{account['id']}/keys", json={"name": "x", "expires_at": moment})
        assert_error(made, 400, param="expires_at")
    for grace in HUGE_GRACE:
        assert_error(admin.post(f"/keys/{key['id']}/rotate", json={"grace": grace}), 400, param="grace")
    assert admin.post(f"/keys/{key['id']}/rotate", json={"grace": "2592000"}).status_code == 201  # 30 days: fine
    assert_error(admin.post(f"/keys/{key['id']}/rotate", json={"grace": "2592001"}), 400, param="grace")
    assert_error(admin.post(f"/keys/{key['id']}/rotate", json={"grace": "１２"}), 400, param="grace")  # not ASCII


def test_times_and_graces_out_of_range_are_a_400_in_the_account_api(server):
    make_account(server.db, "owner@example.com", password=PASSWORD)
    csrf = {"X-CSRF-Token": log_in(server.http, "owner@example.com")}
    made = server.http.post("/api/account/keys", json={"name": "ci"}, headers=csrf)
    assert made.status_code == 201, made.text
    key_id = made.json()["id"]
    for moment in BEYOND_THE_CALENDAR:
        body = {"name": "x", "expires_at": moment}
        assert_error(server.http.post("/api/account/keys", json=body, headers=csrf), 400, param="expires_at")
        limits = server.http.post(f"/api/account/keys/{key_id}/limits", json={"expires_at": moment}, headers=csrf)
        assert_error(limits, 400, param="expires_at")
    for grace in HUGE_GRACE:
        rotated = server.http.post(f"/api/account/keys/{key_id}/regenerate", json={"grace": grace}, headers=csrf)
        assert_error(rotated, 400, param="grace")


# -- admin keys as Bearer only -------------------------------------------------------------------


def test_an_admin_key_is_taken_as_bearer_only(server):
    _, secret = make_admin_key(server.db)
    assert_error(server.http.get("/admin/v1/accounts", headers={"X-API-Key": secret}), 401, code="invalid_admin_key")
    assert Admin(server.http, secret).get("/accounts").status_code == 200
    two = server.http.get(
        "/admin/v1/accounts", headers=[("Authorization", f"Bearer {secret}"), ("Authorization", "Bearer other")]
    )
    assert_error(two, 400)


# -- Idempotency-Key on the create operations ----------------------------------------------------


def test_an_account_created_with_an_idempotency_key_is_created_once(server, admin):
    retry = {"headers": {"Idempotency-Key": "signup-7"}}
    first = admin.post("/accounts", json=NEW_ACCOUNT, **retry)
    again = admin.post("/accounts", json=NEW_ACCOUNT, **retry)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert count(server, Account) == 1
    other_body = admin.post("/accounts", json={**NEW_ACCOUNT, "tier": "free"}, **retry)
    assert_error(other_body, 422, code="idempotency_key_reused")

    # The keys are the admin key's: another admin key's same Idempotency-Key is another request.
    other_admin = Admin(server.http, make_admin_key(server.db, "other")[1])
    assert "already exists" in assert_error(other_admin.post("/accounts", json=NEW_ACCOUNT, **retry), 400)
    refused_again = other_admin.post("/accounts", json=NEW_ACCOUNT, **retry)  # a refusal is kept, and replayed
    assert_error(refused_again, 400)
    assert refused_again.headers["Idempotent-Replayed"] == "true"
    with server.db.session() as s:
        assert s.scalars(select(IdempotencyRecord.owner).order_by(IdempotencyRecord.id)).all() == [
            "admin_key:1",
            "admin_key:2",
        ]
        assert [e.action for e in audit.list_events(s, action="account.created").events] == ["account.created"]


def test_a_created_key_is_replayed_without_its_secret_and_no_secret_is_kept(server, admin):
    account = admin.post("/accounts", json=NEW_ACCOUNT).json()
    path, retry = f"/accounts/{account['id']}/keys", {"headers": {"Idempotency-Key": "key-1"}}
    first = admin.post(path, json={"name": "signup", "rpm": 60}, **retry)
    assert first.status_code == 201 and first.json()["key"].startswith("aimichat_")
    secret = first.json()["key"]

    again = admin.post(path, json={"name": "signup", "rpm": 60}, **retry)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    replayed = again.json()
    assert "key" not in replayed and "not kept" in replayed.pop("note")
    assert replayed == {k: v for k, v in first.json().items() if k != "key"}
    assert count(server, ApiKey) == 1
    with server.db.session() as s:
        kept = [bytes(row.body) for row in s.scalars(select(IdempotencyRecord))]
    assert len(kept) == 1 and secret.encode() not in kept[0] and secret[9:].encode() not in kept[0]
    assert server.chat(HELLO, secret).status_code == 200  # the key the first answer showed works

    # A rotation retried is not a second rotation: the secret it gave keeps working; the replay holds none.
    rotate, retry = f"/keys/{first.json()['id']}/rotate", {"headers": {"Idempotency-Key": "rotate-1"}}
    rotated = admin.post(rotate, json={"grace": "1h"}, **retry)
    new_secret = rotated.json()["key"]
    replay = admin.post(rotate, json={"grace": "1h"}, **retry)
    assert replay.status_code == 201 and "key" not in replay.json() and replay.json()["prefix"] == new_secret[:13]
    assert server.chat(HELLO, new_secret).status_code == 200
    with server.db.session() as s:
        assert not any(new_secret.encode() in bytes(row.body) for row in s.scalars(select(IdempotencyRecord)))


def test_an_answer_is_kept_only_once_its_change_is_committed(server, admin, monkeypatch):
    seen: list[int] = []
    keep = records.keep

    def keep_and_look(database, claimed, stored):
        with server.db.session() as other:  # another connection sees only what was committed
            seen.append(other.scalar(select(func.count()).select_from(Account)) or 0)
        return keep(database, claimed, stored)

    monkeypatch.setattr(records, "keep", keep_and_look)
    assert admin.post("/accounts", json=NEW_ACCOUNT, headers={"Idempotency-Key": "k"}).status_code == 201
    assert seen == [1]


# -- usage alerts --------------------------------------------------------------------------------


def test_admins_read_and_set_an_accounts_alert_thresholds(admin):
    account = admin.post("/accounts", json=NEW_ACCOUNT).json()
    path = f"/accounts/{account['id']}/alerts"
    default = admin.get(path)
    assert default.status_code == 200, default.text
    assert default.json() == {
        "object": "alert_settings",
        "account_id": account["id"],
        "percents": [80, 100],
        "email": True,
    }
    changed = admin.put(path, json={"percents": [100, 50, 50]})
    assert changed.json()["percents"] == [50, 100] and changed.json()["email"] is True  # email as it was
    assert admin.put(path, json={"email": False}).json()["percents"] == [50, 100]  # percents as they were
    assert admin.get(path).json() == {**default.json(), "percents": [50, 100], "email": False}
    assert admin.put(path, json={"percents": []}).json()["percents"] == []  # off

    assert "percentages from 1 to 100" in assert_error(admin.put(path, json={"percents": [0]}), 400, param="percents")
    assert_error(admin.put(path, json={"percents": [1, 2, 3, 4, 5, 6]}), 400, param="percents")
    assert_error(admin.put(path, json={"percents": ["80"]}), 400, param="percents.0")
    assert_error(admin.put(path, json={}), 400)
    assert_error(admin.put("/accounts/999/alerts", json={"email": True}), 404, code="account_not_found")
    assert_error(admin.get("/accounts/999/alerts"), 404, code="account_not_found")


# -- two requests creating the same account ------------------------------------------------------


def test_two_sessions_creating_one_email_at_once_the_loser_is_told_it_exists(reused_postgres):
    db = reused_postgres.fresh()
    first, second = db.session(), db.session()
    outcome: list[BaseException] = []

    def loser() -> None:
        try:
            accounts.create_account(second, NEW_ACCOUNT["email"], NEW_ACCOUNT["password"])
        except BaseException as exc:
            outcome.append(exc)

    try:
        accounts.create_account(first, NEW_ACCOUNT["email"], NEW_ACCOUNT["password"])  # not committed yet
        racer = threading.Thread(target=loser)
        racer.start()
        # The second has checked (and seen no account) and waits on the unique index for the first to end.
        deadline = time.monotonic() + 10
        with db.sql_engine.connect() as watch:
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            while watch.execute(text(waiting)).scalar() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
                watch.rollback()
        first.commit()
        racer.join(10)
        [refused] = outcome
        assert isinstance(refused, accounts.AccountError) and "already exists" in str(refused)
        second.rollback()
        assert second.scalar(select(func.count()).select_from(Account)) == 1  # its session is still usable
    finally:
        first.close()
        second.close()
        db.dispose()
