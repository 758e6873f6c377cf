"""Recovery paths of the account pages (issue 17): a log-in redirect that says why and returns to the page,
with no open redirect; the credits-spent banner on /keys and the playground (Send disabled); and the
playground's plain-words answer to a lapsed session.

Pages go through the real app; the spent banner over SQLite and PostgreSQL (it sums the ledger), the rest
over SQLite only, where the database adds nothing.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from web_helpers import PASSWORD, Browser

from aimichat.quota.ledger import UsageSummary
from aimichat.store.db import Database
from aimichat.web import auth, usage_pages
from aimichat.web.deps import LOGGED_OUT
from aimichat.web.render import safe_next
from fixtures import MutableClock, app_client, make_account
from scripted_engine import ScriptedEngine

EMAIL = "back@example.com"
START = dt.datetime(2026, 1, 10, 20, 48)  # 3 h 12 min before the day's credits come back


@pytest.fixture
def clock() -> MutableClock:
    return MutableClock(START)


@pytest.fixture
def sqlite_server(tmp_path, clock):
    db = Database(f"sqlite:///{tmp_path / 'aimichat.db'}")
    with app_client(ScriptedEngine(), db, tmp_path, clock=clock) as client:
        make_account(db, EMAIL, daily=2, password=PASSWORD)
        yield client
    db.dispose()


def notice(html: str) -> str | None:
    match = re.search(r'id="login-notice">([^<]*)<', html)
    return match.group(1) if match else None


# -- the log-in redirect -------------------------------------------------------------------------


def test_a_page_sends_a_stranger_to_log_in_with_its_own_words_and_back(sqlite_server):
    with Browser(sqlite_server) as b:
        r = b.get("/usage")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/usage&reason=login"
        assert notice(b.get(r.headers["location"]).text) == "Log in to see your usage."
        assert notice(b.get("/login?next=/keys/7&reason=login").text) == "Log in to see your API keys."
        assert notice(b.get("/login?next=/nowhere&reason=login").text) == "Log in to continue."
        back = b.post("/login", {"email": EMAIL, "password": PASSWORD, "next": "/usage"})
        assert back.status_code == 303 and back.headers["location"] == "/usage"
        assert b.get("/usage").status_code == 200


def test_an_expired_session_says_so_and_returns_to_the_page(sqlite_server, clock):
    with Browser(sqlite_server) as b:
        assert b.log_in(EMAIL).status_code == 303
        assert b.get("/playground").status_code == 200
        clock.advance(days=8)  # past the idle timeout: the cookie is still sent, its session is gone
        r = b.get("/playground")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/playground&reason=expired"
        assert notice(b.get(r.headers["location"]).text) == "Your session expired. Log in to use the playground."
        back = b.post("/login", {"email": EMAIL, "password": PASSWORD, "next": "/playground"})
        assert back.headers["location"] == "/playground" and b.get("/playground").status_code == 200


def test_the_log_in_page_shows_no_words_a_link_brings(sqlite_server):
    with Browser(sqlite_server) as b:
        page = b.get("/login?next=/usage&reason=%3Cb%3EYour+account+is+locked%3C%2Fb%3E").text
        assert notice(page) is None and "locked" not in page
        assert notice(b.get("/login").text) is None


@pytest.mark.parametrize(
    "target",
    ["//evil.example/x", "/\\evil.example", "https://evil.example", "javascript:alert(1)", "evil", "", "/\\/x"],
)
def test_only_local_paths_are_followed_after_log_in(target):
    assert safe_next(target) == "/keys"


def test_a_foreign_next_ends_on_keys_and_the_page_does_not_carry_it(sqlite_server):
    with Browser(sqlite_server) as b:
        page = b.get("/login?next=//evil.example/x&reason=login").text
        assert "evil" not in page and notice(page) == "Log in to continue."
    for target in ("//evil.example/x", "https://evil.example", "/\\evil.example"):
        with Browser(sqlite_server) as b:  # a fresh browser each time: a logged-in one skips the form
            b.get("/login")
            r = b.post("/login", {"email": EMAIL, "password": PASSWORD, "next": target})
            assert r.status_code == 303 and r.headers["location"] == "/keys", target


def test_login_urls_and_notices_directly():
    assert auth.login_url("/usage", expired=False) == "/login?next=/usage&reason=login"
    assert auth.login_url("/", expired=True) == "/login?reason=expired"
    assert auth.login_url("", expired=False) == "/login?reason=login"  # a POST: no page to come back to
    assert auth.login_url("/a b&c", expired=False) == "/login?next=/a+b%26c&reason=login"
    assert auth.login_notice("/admin/models", "expired") == "Your session expired. Log in to open the admin pages."
    assert auth.login_notice("/usage", "other") == ""


# -- credits spent -------------------------------------------------------------------------------


def spend(b: Browser, times: int) -> None:
    for _ in range(times):
        assert b.post("/playground", {"message": "Say hello"}).status_code == 200


def test_spent_credits_get_a_banner_on_keys_and_the_playground(database, tmp_path, clock):
    banner = "Your credits for today are spent: every key gets 429 until 2026-01-11 00:00 UTC (in 3 h 12 min)."
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as server:
        make_account(database, EMAIL, daily=2, password=PASSWORD)
        with Browser(server) as b:
            b.log_in(EMAIL)
            spend(b, 1)
            assert 'id="credits-spent"' not in b.get("/keys").text
            playground = b.get("/playground").text
            assert 'id="credits-spent"' not in playground and re.search(r'id="send">Send<', playground)
            spend(b, 1)
            assert banner in b.get("/keys").text
            playground = b.get("/playground").text
            assert banner in playground
            assert re.search(r'id="send" disabled aria-describedby="credits-spent">Send<', playground)
            refused = b.post("/playground", {"message": "One more"})
            assert refused.status_code == 429
            assert "Credits come back at 2026-01-11 00:00 UTC (in 3 h 12 min)." in refused.text
            assert "2026-01-11T00:00" not in refused.text  # no raw ISO string
            clock.advance(hours=4)  # a new day: credits are back
            assert 'id="credits-spent"' not in b.get("/keys").text


def summary(day_used: int, month_used: int, monthly: int | None) -> UsageSummary:
    return UsageSummary(day_used, 10, dt.datetime(2026, 1, 11), month_used, monthly, dt.datetime(2026, 2, 1), [], [])


def test_a_spent_month_outranks_the_day():
    assert usage_pages.credits_spent(summary(9, 50, 100), START) is None
    assert usage_pages.credits_spent(summary(9, 50, None), START) is None
    day = usage_pages.credits_spent(summary(10, 50, None), START)
    assert day is not None and day.period == "today" and day.reset_at == dt.datetime(2026, 1, 11)
    month = usage_pages.credits_spent(summary(10, 100, 100), START)
    assert month is not None and month.message == (
        "Your credits for this month are spent: every key gets 429 until 2026-02-01 00:00 UTC (in 21 d 3 h)."
    )


def test_time_left_reads_as_on_usage():
    assert usage_pages.time_left(dt.datetime(2026, 1, 11), START) == "in 3 h 12 min"
    assert usage_pages.time_left(dt.datetime(2026, 1, 13, 1), START) == "in 2 d 4 h"
    assert usage_pages.time_left(START - dt.timedelta(minutes=1), START) == "in 0 h 0 min"


# -- the playground's lapsed session ---------------------------------------------------------------


def test_the_playground_stream_says_in_plain_words_to_log_in(sqlite_server):
    with Browser(sqlite_server) as b:
        r = b.api("POST", "/playground/stream", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["code"] == "session_required" and error["message"] == LOGGED_OUT
        assert "/login" in LOGGED_OUT and "API key" not in LOGGED_OUT
