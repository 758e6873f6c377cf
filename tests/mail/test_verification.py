"""Sign-up email verification (AIMICHAT_EMAIL_VERIFICATION), end to end through the real app and a real SMTP
server: until the emailed link is followed the account makes no keys (pages, account API) and spends no
credits in the playground; the link works once, for 24 hours; resending is throttled."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from mail_helpers import Visit, link_in, local, token_of
from sqlalchemy import func, select

from aimichat.accounts import service as accounts
from aimichat.store import db as store
from aimichat.store.db import Database
from aimichat.store.models import ApiKey, EmailToken, UsageEvent
from conftest import MutableClock, app_client, make_account, make_key, migrated
from scripted_engine import ScriptedEngine

EMAIL = "newcomer@example.com"
CONFIRM = "/verify/email"


@pytest.fixture
def clock():
    return MutableClock(dt.datetime(2026, 11, 30, 12, 0))


@pytest.fixture
def sqlite_db(sqlite_url):
    db = migrated(sqlite_url)
    yield db
    db.dispose()


def verifying_app(db, tmp_path, clock, smtp_server=None, **settings):
    if smtp_server is not None:
        settings["smtp_url"] = smtp_server.url
    return app_client(ScriptedEngine(), db, tmp_path, clock=clock, email_verification=True, **settings)


def count(db, table) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def test_unverified_account_makes_no_key_until_it_follows_the_link(database, tmp_path, smtp_server, clock):
    with verifying_app(database, tmp_path, clock, smtp_server) as server, Visit(server) as visit:
        visit.sign_up(EMAIL)
        [mail] = smtp_server.messages
        assert mail["To"] == EMAIL and mail["Subject"] == "Confirm your email for AimiChat"
        url = link_in(mail, CONFIRM)
        assert url.startswith("http://127.0.0.1:8000/verify/email?token=")

        assert visit.log_in(EMAIL).status_code == 303
        assert visit.get("/keys").headers["location"] == "/verify"
        asked = visit.get("/verify")
        assert "open the link we emailed to <strong>newcomer@example.com</strong>" in asked.text
        assert 'action="/verify/resend"' in asked.text  # the resend button

        page = visit.post("/keys", {"name": "laptop"})
        assert page.status_code == 403 and "until its email address is confirmed" in page.text
        csrf = {"X-CSRF-Token": visit.token}
        api = visit.http.post("/api/account/keys", json={"name": "ci"}, headers=csrf)
        assert api.status_code == 403
        assert api.json()["error"]["code"] == "email_not_verified"
        assert "Confirm your email address first" in api.json()["error"]["message"]
        streamed = visit.http.post(
            "/playground/stream", json={"messages": [{"role": "user", "content": "hi"}]}, headers=csrf
        )
        assert streamed.status_code == 403 and streamed.json()["error"]["code"] == "email_not_verified"
        played = visit.post("/playground", {"message": "hi"})
        assert played.status_code == 403 and "until its email address is confirmed" in played.text
        assert count(database, ApiKey) == 0 and count(database, UsageEvent) == 0  # no key, no credits spent

        opened = visit.get(local(url))  # opening the link confirms nothing yet (mail scanners open links)
        assert opened.status_code == 200 and 'action="/verify/email"' in opened.text
        with database.session() as s:
            assert accounts.get_account(s, EMAIL).email_verified_at is None
        confirmed = visit.post(CONFIRM, {"token": token_of(url)})
        assert confirmed.status_code == 303 and confirmed.headers["location"] == "/verify?done=1"
        assert "Your email address is confirmed." in visit.get("/verify?done=1").text
        with database.session() as s:
            assert accounts.get_account(s, EMAIL).email_verified_at == clock.now

        made = visit.post("/keys", {"name": "laptop"})
        assert made.status_code == 303 and made.headers["location"].startswith("/keys?shown=")
        assert count(database, ApiKey) == 1
        reused = visit.post(CONFIRM, {"token": token_of(url)})
        assert reused.status_code == 410 and "used already" in reused.text


def test_key_from_a_verified_sign_up_works_on_the_api(sqlite_db, tmp_path, smtp_server, clock):
    with verifying_app(sqlite_db, tmp_path, clock, smtp_server) as server, Visit(server) as visit:
        visit.sign_up(EMAIL)
        visit.get(local(url := link_in(smtp_server.messages[0], CONFIRM)))
        assert visit.post(CONFIRM, {"token": token_of(url)}).status_code == 303
        key = make_key(sqlite_db, EMAIL)
        answer = server.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, key)
        assert answer.status_code == 200, answer.text


def test_resend_is_throttled_and_links_expire(sqlite_db, tmp_path, smtp_server, clock):
    with verifying_app(sqlite_db, tmp_path, clock, smtp_server) as server, Visit(server) as visit:
        visit.sign_up(EMAIL)
        visit.log_in(EMAIL)
        visit.get("/verify")
        for _ in range(2):
            resent = visit.post("/verify/resend")
            assert resent.status_code == 303 and resent.headers["location"] == "/verify?sent=1"
        assert len(smtp_server.messages) == 3
        assert "We have sent a new link to newcomer@example.com" in visit.get("/verify?sent=1").text
        clock.advance(minutes=10)
        throttled = visit.post("/verify/resend")
        assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) == 50 * 60
        assert "ask again in 50 minutes" in throttled.text
        assert len(smtp_server.messages) == 3
        assert visit.post("/verify/resend", csrf=False).status_code == 403

        first = link_in(smtp_server.messages[0], CONFIRM)
        clock.advance(hours=23, minutes=50)  # 24 hours after the sign-up's link
        expired = visit.get(local(first))
        assert expired.status_code == 410 and "This link has expired." in expired.text
        assert 'href="/verify"' in expired.text  # where a new one is sent from
        assert visit.post(CONFIRM, {"token": token_of(first)}).status_code == 410
        wrong = visit.post(CONFIRM, {"token": "not-a-token"})
        assert wrong.status_code == 400 and "This link is not valid" in wrong.text
        assert visit.get(f"{CONFIRM}?token=").status_code == 400

        assert visit.post("/verify/resend").status_code == 303  # a new hour, a new link
        newest = link_in(smtp_server.messages[3], CONFIRM)
        assert visit.post(CONFIRM, {"token": token_of(newest)}).status_code == 303
        assert visit.get("/keys").status_code == 200


def test_taken_email_gets_the_same_answer_and_no_mail(sqlite_db, tmp_path, smtp_server, clock):
    with verifying_app(sqlite_db, tmp_path, clock, smtp_server) as server, Visit(server) as visit:
        make_account(sqlite_db, "taken@example.com")
        visit.sign_up("taken@example.com", "some other password")  # asserts the usual 303 to /login?signed_up=1
        assert smtp_server.messages == []


def test_operator_made_accounts_are_verified(sqlite_db, tmp_path, smtp_server, clock):
    with verifying_app(sqlite_db, tmp_path, clock, smtp_server) as server, Visit(server) as visit:
        make_account(sqlite_db, "staff@example.com")  # the CLI's and the admin API's way
        visit.log_in("staff@example.com")
        assert visit.get("/keys").status_code == 200
        assert visit.post("/keys", {"name": "laptop"}).status_code == 303


def test_verification_off_sends_nothing_and_blocks_nothing(sqlite_db, tmp_path, smtp_server, clock):
    app = app_client(ScriptedEngine(), sqlite_db, tmp_path, clock=clock, smtp_url=smtp_server.url)
    with app as server, Visit(server) as visit:
        visit.sign_up(EMAIL)
        visit.log_in(EMAIL)
        assert visit.get("/keys").status_code == 200
        assert visit.post("/keys", {"name": "laptop"}).status_code == 303
        assert "does not ask for email addresses to be confirmed" in visit.get("/verify").text
    assert smtp_server.messages == []


def test_without_smtp_no_link_is_made_or_logged_and_the_pages_say_whom_to_ask(sqlite_db, tmp_path, clock, caplog):
    with verifying_app(sqlite_db, tmp_path, clock) as server, Visit(server) as visit:
        with caplog.at_level(logging.DEBUG, logger="aimichat"):
            visit.sign_up(EMAIL)
            visit.log_in(EMAIL)
            page = visit.get("/verify").text
            assert visit.post("/verify/resend").headers["location"] == "/verify"  # nothing made, nothing sent
            visit.forgot(EMAIL)
        assert count(sqlite_db, EmailToken) == 0  # no confirmation or reset link exists to be found anywhere
        assert "token=" not in caplog.text
        assert "email is off" in caplog.text
        assert "Email is off on this server" in page and "/verify/resend" not in page
        forgot = visit.get("/password/forgot").text
        assert "Email is off on this server" in forgot and 'action="/password/forgot"' not in forgot


def test_accounts_from_before_the_migration_count_as_verified(sqlite_url):
    db = Database(sqlite_url)
    store.upgrade(db.sql_engine, "0006")
    with db.sql_engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO tiers (name, daily_credits, cost_rule, credits_per_1k_tokens)"
            " VALUES ('free', 1, 'per_request', 1)"
        )
        conn.exec_driver_sql(
            "INSERT INTO accounts (email, password_hash, tier_id, is_admin, disabled, created_at)"
            " VALUES ('old@example.com', 'x', 1, 0, 0, '2025-01-02 03:04:05')"
        )
    store.upgrade(db.sql_engine)
    with db.session() as s:
        assert accounts.get_account(s, "old@example.com").email_verified_at == dt.datetime(2025, 1, 2, 3, 4, 5)
    db.dispose()
