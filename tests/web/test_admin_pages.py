"""The admin pages over HTTP, in-process on SQLite and PostgreSQL: the accounts list (search, pages, use
today), an account's page and every action on it (disable after a confirmation step, enable, revoke a key,
a new password, a reset mail, the admin right, the tier), and the tiers' form. Each action is checked for
who may use it (non-admins get 403, visitors without a session the log-in page), its CSRF rule, what it
changed (keys answering or not, sessions ended, passwords) and the audit row it wrote.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select
from web_helpers import PASSWORD, Browser, chat

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.store.models import AuditEvent, Tier, UsageEvent
from aimichat.web import admin
from conftest import app_client, make_account, make_key
from scripted_engine import ScriptedEngine

ADMIN = "boss@example.com"
USER = "member@example.com"
NEW_PASSWORD = "a brand new passphrase"


@pytest.fixture
def admin_id(server) -> int:
    with server.db.session() as s:
        account_id = accounts.create_account(s, ADMIN, PASSWORD, is_admin=True).id
        s.commit()
    return account_id


@pytest.fixture
def user_id(server) -> int:
    return make_account(server.db, USER, password=PASSWORD, daily=50)


def logged_in(server, email: str) -> Browser:
    browser = Browser(server)
    assert browser.log_in(email).status_code == 303
    return browser


def audit_rows(server, action: str) -> list[tuple[str, str, dict]]:
    with server.db.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        return [(e.actor, e.target, e.detail) for e in rows]


def text_of(response) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", response.text)).split())


def field_error(response, field: str) -> str:
    """The message shown under a form field (its id is the field's, as aria-describedby names it)."""
    found = re.search(rf'<p class="alert error field-error" id="{field}-error" role="alert">([^<]*)</p>', response.text)
    assert found, f"no message under {field}"
    return html.unescape(found.group(1))


def account_row(page: str, email: str) -> str:
    found = re.search(
        rf'<tr id="account-\d+"[^>]*>\s*<th[^>]*><a href="[^"]+">{re.escape(email)}</a>.*?</tr>', page, re.S
    )
    assert found, f"{email} is not listed"
    return found.group(0)


def listed(page: str) -> list[str]:
    return re.findall(r'<th scope="row" data-label="Email" id="account-\d+-email"><a href="[^"]+">([^<]+)</a>', page)


# -- who may use the pages -------------------------------------------------------------------------


def actions(user_id: int, key_id: int) -> list[tuple[str, dict[str, str]]]:
    """Every admin form, filled in as an admin would (confirmed where a step asks first)."""
    return [
        (f"/admin/accounts/{user_id}/tier", {"tier": "free"}),
        (f"/admin/accounts/{user_id}/disable", {"confirm": "yes"}),
        (f"/admin/accounts/{user_id}/enable", {}),
        (f"/admin/accounts/{user_id}/admin", {"grant": "yes"}),
        (f"/admin/accounts/{user_id}/password", {"password": NEW_PASSWORD, "password_again": NEW_PASSWORD}),
        (f"/admin/accounts/{user_id}/reset-email", {}),
        (f"/admin/accounts/{user_id}/keys/{key_id}/revoke", {"confirm": "yes"}),
        ("/admin/tiers", {"name": "free", "daily_credits": "7"}),
    ]


def test_only_admins_get_in_and_every_form_needs_its_csrf_token(server, admin_id, user_id):
    key = make_key(server.db, USER)
    with server.db.session() as s:
        (key_row,) = keys.list_keys(s, user_id)
    pages = ["/admin", f"/admin/accounts/{user_id}", "/admin/tiers/edit?name=free", "/admin/tiers/edit"]

    with Browser(server) as anonymous:
        for path in pages:
            answer = anonymous.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next="), path

    with logged_in(server, USER) as user:
        for path in pages:
            assert user.get(path).status_code == 403, path
        user.get("/keys")  # a valid token of the user's own session: still no admin
        for path, data in actions(user_id, key_row.id):
            answer = user.post(path, data)
            assert answer.status_code == 403 and "Admins only" in answer.text, path

    with logged_in(server, ADMIN) as boss:
        for path, data in actions(user_id, key_row.id):
            answer = boss.post(path, data, csrf=False)
            assert answer.status_code == 403 and "This form has expired" in answer.text, path
            assert boss.post(path, {**data, "csrf_token": "forged"}, csrf=False).status_code == 403, path

    assert chat(server, key).status_code == 200, "nothing was done"
    with server.db.session() as s:
        member = accounts.get_account(s, USER)
        assert not member.disabled and not member.is_admin and accounts.verify_password(member, PASSWORD)
        assert accounts.get_tier(s, "free").daily_credits == 100
        assert s.scalars(select(AuditEvent.action).where(AuditEvent.actor != "system")).all() == []


# -- the list: search, pages, use today -------------------------------------------------------------


def test_search_by_email_and_pages(server, admin_id):
    for n in range(1, 6):
        make_account(server.db, f"ada{n}@lovelace.example")
    make_account(server.db, "grace_hopper@navy.example")
    make_account(server.db, "graceXhopper@navy.example")
    with logged_in(server, ADMIN) as boss:
        everyone = boss.get("/admin")
        assert everyone.status_code == 200 and len(listed(everyone.text)) == 8
        assert "Accounts (8)" in everyone.text

        found = boss.get("/admin", params={"q": "  LOVELACE "})
        assert listed(found.text) == [f"ada{n}@lovelace.example" for n in range(1, 6)]
        assert "Accounts (5 matching “LOVELACE”)" in html.unescape(found.text)
        # "_" and "%" are matched as themselves, not as SQL wildcards
        assert listed(boss.get("/admin", params={"q": "e_h"}).text) == ["grace_hopper@navy.example"]
        assert listed(boss.get("/admin", params={"q": "%"}).text) == []
        assert "No account's email contains “nobody”." in html.unescape(boss.get("/admin?q=nobody").text)

        first = boss.get("/admin", params={"q": "lovelace", "per_page": "25", "page": "1"})
        assert 'rel="next"' not in first.text
        two = boss.get("/admin", params={"q": "lovelace", "per_page": "2", "page": "2"})
        assert listed(two.text) == ["ada3@lovelace.example", "ada4@lovelace.example"]
        assert "Page 2 of 3" in two.text
        assert 'href="/admin?q=lovelace&amp;per_page=2" rel="prev"' in two.text
        assert 'href="/admin?q=lovelace&amp;page=3&amp;per_page=2" rel="next"' in two.text
        last = boss.get("/admin?q=lovelace&per_page=2&page=3")
        assert listed(last.text) == ["ada5@lovelace.example"] and 'rel="next"' not in last.text
        beyond = boss.get("/admin?per_page=2&page=99")
        assert beyond.status_code == 200 and listed(beyond.text) == [] and "go to the first page" in beyond.text

        for query in (
            "page=0",
            "page=abc",
            "page=-1",
            "page=1.5",
            "per_page=0",
            "per_page=201",
            "per_page=x",
            "page=99999999999",
            "q=" + "a" * 321,
            "q=ada%00",  # PostgreSQL's text cannot hold NUL: refused before the query, on both databases
            "q=ada%1B",
        ):
            answer = boss.get(f"/admin?{query}")
            assert answer.status_code == 400 and "text/html" in answer.headers["content-type"], query
            assert "Bad search" in answer.text, query
        nul = text_of(boss.get("/admin?q=ada%00"))
        assert "A search cannot contain control characters (this one has NUL)." in nul


def test_each_account_shows_its_credits_used_today(server, admin_id, user_id):
    key = make_key(server.db, USER)
    for _ in range(3):
        assert chat(server, key).status_code == 200  # 1 credit a request (per_request)
    with server.db.session() as s:  # yesterday's use does not count today
        yesterday = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=1)
        s.add(
            UsageEvent(
                request_id="old",
                account_id=user_id,
                created_at=yesterday,
                day=yesterday.date(),
                reserved_credits=9,
                credits=9,
                status="charged",
            )
        )
        s.commit()
    with logged_in(server, ADMIN) as boss:
        row = account_row(boss.get("/admin").text, USER)
        assert re.search(r'class="used-today">\s*<span class="used-figure"><span class="nowrap">3 of 50</span>', row)
        assert '<meter min="0" max="50" value="3"' in row
        assert "0 of 100" in account_row(boss.get("/admin").text, ADMIN)

        detail = boss.get(f"/admin/accounts/{user_id}")
        assert detail.status_code == 200
        assert "Today 3 of 50 credits" in text_of(detail)
        month = 3 + (9 if yesterday.month == (yesterday + dt.timedelta(days=1)).month else 0)
        assert f"This month {month} credits (no monthly limit)" in text_of(detail)
        assert re.search(r'data-label="Credits today" class="num">3</td>', detail.text)


# -- an account's page: disable, enable, revoke -----------------------------------------------------


def test_disable_asks_first_then_stops_every_key_and_browser(server, admin_id, user_id):
    first, second = make_key(server.db, USER, "one"), make_key(server.db, USER, "two")
    with logged_in(server, USER) as member, logged_in(server, ADMIN) as boss:
        page = boss.get(f"/admin/accounts/{user_id}")
        assert f'action="/admin/accounts/{user_id}/disable"' in page.text
        asked = boss.post(f"/admin/accounts/{user_id}/disable", {"back": f"/admin/accounts/{user_id}"})
        assert asked.status_code == 200
        said = text_of(asked)
        assert f"Disable {USER}?" in said
        assert "This stops every key of this person at once: 2 active keys" in said
        assert f'<a class="button ghost" href="/admin/accounts/{user_id}">Cancel</a>' in asked.text
        assert chat(server, first).status_code == 200, "nothing happens before the confirmation"
        assert audit_rows(server, "account.disabled") == []

        done = boss.post(f"/admin/accounts/{user_id}/disable", {"confirm": "yes", "back": f"/admin/accounts/{user_id}"})
        assert done.status_code == 303 and done.headers["location"] == f"/admin/accounts/{user_id}?done=disabled"
        assert "Disabled: its keys stopped working" in boss.get(done.headers["location"]).text
        assert chat(server, first).status_code == 403 and chat(server, second).status_code == 403
        assert member.get("/keys").status_code == 303, "its browser was logged out"
        assert audit_rows(server, "account.disabled") == [(f"account:{admin_id}", f"account:{user_id}", {})]

        enabled = boss.post(f"/admin/accounts/{user_id}/enable", {"back": f"/admin/accounts/{user_id}"})
        assert enabled.headers["location"] == f"/admin/accounts/{user_id}?done=enabled"
        assert chat(server, first).status_code == 200
        assert audit_rows(server, "account.enabled") == [(f"account:{admin_id}", f"account:{user_id}", {})]

        # From the list, the step keeps the list's search and page, and comes back there.
        back = "/admin?q=member&per_page=25"
        asked = boss.post(f"/admin/accounts/{user_id}/disable", {"back": back})
        assert 'name="back" value="/admin?q=member&amp;per_page=25"' in asked.text
        assert 'href="/admin?q=member&amp;per_page=25">Cancel</a>' in asked.text
        done = boss.post(f"/admin/accounts/{user_id}/disable", {"confirm": "yes", "back": "https://evil.example/x"})
        assert done.headers["location"] == f"/admin?updated={user_id}"

        own = boss.post(f"/admin/accounts/{admin_id}/disable", {"confirm": "yes"})
        assert own.status_code == 400 and "You cannot disable your own account" in own.text
        assert boss.post("/admin/accounts/424242/disable", {"confirm": "yes"}).status_code == 404
        assert boss.get("/admin/accounts/424242").status_code == 404


def test_revoke_a_key_from_the_account_page_after_confirming(server, admin_id, user_id):
    secret = make_key(server.db, USER, "laptop")
    kept = make_key(server.db, USER, "server")
    other = make_account(server.db, "other@example.com")
    make_key(server.db, "other@example.com")
    with server.db.session() as s:
        laptop = next(k for k in keys.list_keys(s, user_id) if k.name == "laptop")
        (others,) = keys.list_keys(s, other)
    with logged_in(server, ADMIN) as boss:
        page = boss.get(f"/admin/accounts/{user_id}")
        assert "Keys (2)" in page.text and "laptop" in page.text and f"<code>{laptop.prefix}…</code>" in page.text
        revoke = f"/admin/accounts/{user_id}/keys/{laptop.id}/revoke"
        asked = boss.post(revoke, {})
        assert asked.status_code == 200 and f"Revoke the key “laptop” of {USER}?" in html.unescape(asked.text)
        assert chat(server, secret).status_code == 200

        done = boss.post(revoke, {"confirm": "yes"})
        assert done.status_code == 303 and done.headers["location"] == f"/admin/accounts/{user_id}?done=revoked"
        assert chat(server, secret).status_code == 401 and chat(server, kept).status_code == 200
        after = boss.get(done.headers["location"])
        assert "Key revoked" in after.text and revoke not in after.text, "a revoked key offers no action"
        assert audit_rows(server, "key.revoked") == [
            (f"account:{admin_id}", f"key:{laptop.id}", {"account_id": user_id, "name": "laptop"})
        ]
        assert boss.post(f"/admin/accounts/{user_id}/keys/{others.id}/revoke", {"confirm": "yes"}).status_code == 404
        assert boss.post(f"/admin/accounts/{user_id}/keys/999999/revoke", {"confirm": "yes"}).status_code == 404


# -- passwords ----------------------------------------------------------------------------------------


def test_an_admin_sets_a_new_password(server, admin_id, user_id):
    path = f"/admin/accounts/{user_id}/password"
    with logged_in(server, USER) as member, logged_in(server, ADMIN) as boss:
        boss.get(f"/admin/accounts/{user_id}")
        differ = boss.post(path, {"password": NEW_PASSWORD, "password_again": NEW_PASSWORD + "!"})
        assert differ.status_code == 400 and field_error(differ, "password-again") == "The two passwords differ."
        common = boss.post(path, {"password": "baseball", "password_again": "baseball"})
        assert common.status_code == 400
        assert "one of the most common ones" in field_error(common, "new-password")
        short = boss.post(path, {"password": "short", "password_again": "short"})
        assert short.status_code == 400 and "at least 8 characters" in field_error(short, "new-password")
        assert audit_rows(server, "account.password_set") == []
        assert member.get("/keys").status_code == 200, "refused: nothing changed"

        done = boss.post(path, {"password": NEW_PASSWORD, "password_again": NEW_PASSWORD})
        assert done.status_code == 303 and done.headers["location"] == f"/admin/accounts/{user_id}?done=password"
        assert "every browser logged in to member@example.com was logged out" in boss.get(done.headers["location"]).text
        assert member.get("/keys").status_code == 303, "the account's browsers were logged out"
        assert audit_rows(server, "account.password_set") == [(f"account:{admin_id}", f"account:{user_id}", {})]
        own = boss.post(
            f"/admin/accounts/{admin_id}/password", {"password": NEW_PASSWORD, "password_again": NEW_PASSWORD}
        )
        assert own.status_code == 400 and "Change your own password on your Account page" in own.text
    with Browser(server) as again:
        assert again.log_in(USER).status_code != 303
        assert again.log_in(USER, NEW_PASSWORD).status_code == 303


def test_without_mail_no_reset_email_is_offered(server, admin_id, user_id):
    with logged_in(server, ADMIN) as boss:
        page = boss.get(f"/admin/accounts/{user_id}")
        assert "Send a reset email" not in page.text and f"aimichat accounts reset-link {USER}" in page.text
        refused = boss.post(f"/admin/accounts/{user_id}/reset-email")
        assert refused.status_code == 409 and "Email is off" in refused.text
    assert audit_rows(server, "account.reset_link_mailed") == []


def test_an_admin_mails_a_reset_link(tmp_path, sqlite_url, smtp_server):
    from aimichat.store.db import Database

    db = Database(sqlite_url)
    with app_client(ScriptedEngine(), db, tmp_path, smtp_url=smtp_server.url) as server:
        with db.session() as s:
            boss_id = accounts.create_account(s, ADMIN, PASSWORD, is_admin=True).id
            s.commit()
        member_id = make_account(db, USER, password=PASSWORD)
        with logged_in(server, ADMIN) as boss:
            assert "Send a reset email" in boss.get(f"/admin/accounts/{member_id}").text
            sent = boss.post(f"/admin/accounts/{member_id}/reset-email")
            assert (
                sent.status_code == 303 and sent.headers["location"] == f"/admin/accounts/{member_id}?done=reset_sent"
            )
            [mail] = smtp_server.wait(1)
            assert mail["To"] == USER and mail["Subject"] == "Reset your AimiChat password"
            link = re.search(r"(http://\S+/password/reset\?token=\S+)", mail.get_body(("plain",)).get_content())
            assert link
            assert audit_rows(server, "account.reset_link_mailed") == [
                (f"account:{boss_id}", f"account:{member_id}", {"email": USER})
            ]
            for _ in range(2):  # the forgot form's limit: 3 mails an hour per account
                assert boss.post(f"/admin/accounts/{member_id}/reset-email").status_code == 303
            limited = boss.post(f"/admin/accounts/{member_id}/reset-email")
            assert limited.status_code == 429 and "3 reset links in the last hour" in limited.text
        with Browser(server) as member:  # the link works
            url = urlsplit(link.group(1))
            assert member.get(f"{url.path}?{url.query}").status_code == 200
            token = parse_qs(url.query)["token"][0]
            assert member.post("/password/reset", {"token": token, "password": NEW_PASSWORD}).status_code == 303
            assert member.log_in(USER, NEW_PASSWORD).status_code == 303
    db.dispose()


# -- the admin right and the tier ------------------------------------------------------------------


def test_grant_and_remove_the_admin_right_but_never_ones_own(server, admin_id, user_id):
    with logged_in(server, ADMIN) as boss, logged_in(server, USER) as member:
        assert member.get("/admin").status_code == 403
        granted = boss.post(f"/admin/accounts/{user_id}/admin", {"grant": "yes", "back": f"/admin/accounts/{user_id}"})
        assert granted.headers["location"] == f"/admin/accounts/{user_id}?done=admin_granted"
        assert "member@example.com is now an admin." in boss.get(granted.headers["location"]).text
        assert member.get("/admin").status_code == 200

        removed = boss.post(f"/admin/accounts/{user_id}/admin", {"grant": "no", "back": f"/admin/accounts/{user_id}"})
        assert removed.status_code == 303 and member.get("/admin").status_code == 403

        own_page = boss.get(f"/admin/accounts/{admin_id}")
        assert "You cannot remove your own admin right" in own_page.text
        assert f'action="/admin/accounts/{admin_id}/admin"' not in own_page.text
        own = boss.post(f"/admin/accounts/{admin_id}/admin", {"grant": "no"})
        assert own.status_code == 400 and "You cannot remove your own admin right" in own.text
        assert boss.post(f"/admin/accounts/{user_id}/admin", {"grant": "maybe"}).status_code == 400
        assert boss.get("/admin").status_code == 200, "still an admin"
    assert audit_rows(server, "account.admin_granted") == [(f"account:{admin_id}", f"account:{user_id}", {})]
    assert audit_rows(server, "account.admin_removed") == [(f"account:{admin_id}", f"account:{user_id}", {})]


def test_tier_changed_from_the_account_page(server, admin_id, user_id):
    with server.db.session() as s:
        accounts.set_tier(s, "pro", daily_credits=1000)
        s.commit()
    with logged_in(server, ADMIN) as boss:
        tier_name = boss.get(f"/admin/accounts/{user_id}").text
        assert 'id="person-tier"' in tier_name
        moved = boss.post(f"/admin/accounts/{user_id}/tier", {"tier": "pro", "back": f"/admin/accounts/{user_id}"})
        assert moved.headers["location"] == f"/admin/accounts/{user_id}?done=tier"
        assert "Moved to the tier pro." in boss.get(moved.headers["location"]).text
        assert boss.post(f"/admin/accounts/{user_id}/tier", {"tier": "nope"}).status_code == 400
        for name in ("\x00", "pro\x00"):  # PostgreSQL's text cannot hold NUL: refused before the lookup
            refused = boss.post(f"/admin/accounts/{user_id}/tier", {"tier": name})
            assert refused.status_code == 400 and "Tier names cannot contain control characters" in text_of(refused)
    (row,) = audit_rows(server, "account.tier_changed")
    assert row[0] == f"account:{admin_id}" and row[2]["to"] == "pro"


# -- tiers -------------------------------------------------------------------------------------------


def tier(server, name: str) -> Tier:
    with server.db.session() as s:
        found = s.scalar(select(Tier).where(Tier.name == name))
        assert found is not None
        s.expunge(found)
        return found


def test_a_tier_is_edited_in_the_page(server, admin_id):
    with logged_in(server, ADMIN) as boss:
        listing = boss.get("/admin")
        assert 'href="/admin/tiers/edit?name=free"' in listing.text
        form = boss.get("/admin/tiers/edit?name=free")
        assert form.status_code == 200 and 'id="daily_credits" name="daily_credits"' in form.text
        assert 'value="100"' in form.text

        saved = boss.post(
            "/admin/tiers",
            {
                "name": "free",
                "daily_credits": "250",
                "monthly_credits": "5000",
                "cost_rule": "per_token",
                "credits_per_1k_tokens": "3",
                "rpm": "60",
                "tpm": "",
                "max_keys": "0",
                "max_concurrent": "2",
                "max_prompt_tokens": "",
                "max_n": "2",
            },
        )
        assert saved.status_code == 303 and saved.headers["location"] == "/admin?tier_saved=free#tiers"
        page = boss.get("/admin?tier_saved=free")
        assert "Saved the tier free." in page.text and "60 requests/min per key" in page.text
        got = tier(server, "free")
        assert (got.daily_credits, got.monthly_credits, got.cost_rule, got.credits_per_1k_tokens) == (
            250,
            5000,
            "per_token",
            3,
        )
        assert (got.rpm, got.tpm, got.max_keys, got.max_concurrent, got.max_prompt_tokens, got.max_n) == (
            60,
            None,
            0,
            2,
            None,
            2,
        )
        assert audit_rows(server, "tier.saved")[-1][:2] == (f"account:{admin_id}", "tier:free")
        (limits,) = [r for r in audit_rows(server, "tier.limits_changed") if r[0] == f"account:{admin_id}"]
        assert limits[2] == {"rpm": 60, "max_keys": 0, "max_concurrent": 2, "max_n": 2}, "only what changed"

        # a blank limit removes it; an untouched form saves nothing (and audits nothing)
        count = len(audit_rows(server, "tier.limits_changed"))
        values = {
            "name": "free",
            "daily_credits": "250",
            "monthly_credits": "5000",
            "cost_rule": "per_token",
            "credits_per_1k_tokens": "3",
            "rpm": "60",
            "max_keys": "0",
            "max_concurrent": "",
            "max_n": "2",
        }
        assert boss.post("/admin/tiers", values).status_code == 303
        assert tier(server, "free").max_concurrent is None
        assert audit_rows(server, "tier.limits_changed")[-1][2] == {"max_concurrent": None}
        assert boss.post("/admin/tiers", values).status_code == 303
        assert len(audit_rows(server, "tier.limits_changed")) == count + 1


def test_invalid_tier_values_are_named_next_to_their_field(server, admin_id):
    with logged_in(server, ADMIN) as boss:
        boss.get("/admin/tiers/edit?name=free")
        refused = boss.post(
            "/admin/tiers",
            {
                "name": "free",
                "daily_credits": "-5",
                "monthly_credits": "lots",
                "cost_rule": "per_word",
                "rpm": "0",
                "tpm": "99999999999",
                "max_keys": "-1",
                "max_concurrent": "0",
                "max_n": "2.5",
            },
        )
        assert refused.status_code == 400
        assert field_error(refused, "daily_credits") == "Must be at least 0."
        assert field_error(refused, "monthly_credits") == "Enter a whole number, in digits."
        assert field_error(refused, "cost_rule") == "Choose per request or per token."
        assert field_error(refused, "rpm") == "Must be at least 1."
        assert field_error(refused, "tpm") == "Must be at most 2,147,483,647."
        assert field_error(refused, "max_keys") == "Must be at least 0."
        assert field_error(refused, "max_concurrent") == "Must be at least 1."
        assert field_error(refused, "max_n") == "Enter a whole number, in digits."
        assert (
            'id="rpm" name="rpm" type="text" inputmode="numeric" autocomplete="off" value="0" aria-invalid="true"'
            in refused.text
        )
        assert 'value="lots"' in refused.text, "what was typed comes back"
        assert "The tier was not saved" in refused.text
        # the service's own refusal (what `aimichat tiers set` says too), shown on the form
        blank = boss.post("/admin/tiers", {"name": "free", "daily_credits": "", "cost_rule": "per_request"})
        assert blank.status_code == 400 and "Daily credits cannot be empty." in blank.text
    got = tier(server, "free")
    assert (got.daily_credits, got.rpm, got.max_concurrent) == (100, None, None), "nothing was saved"
    assert [
        r for r in audit_rows(server, "tier.saved") + audit_rows(server, "tier.limits_changed") if r[0] != "system"
    ] == []


def test_a_new_tier_is_created_in_the_page(server, admin_id):
    with logged_in(server, ADMIN) as boss:
        form = boss.get("/admin/tiers/edit")
        assert form.status_code == 200 and 'name="new" value="1"' in form.text and "Create tier" in form.text
        taken = boss.post("/admin/tiers", {"new": "1", "name": "free", "daily_credits": "5"})
        assert taken.status_code == 400 and "There is a tier called free already" in field_error(taken, "name")
        nameless = boss.post("/admin/tiers", {"new": "1", "name": " ", "daily_credits": "5"})
        assert field_error(nameless, "name") == "Give the tier a name."
        assert field_error(boss.post("/admin/tiers", {"new": "1", "name": "x" * 65, "daily_credits": "5"}), "name")
        for name in ("x\x00y", "x\ty", "\x1b[31m"):  # control characters (NUL: PostgreSQL's text cannot hold it)
            bad = boss.post("/admin/tiers", {"new": "1", "name": name, "daily_credits": "5"})
            assert bad.status_code == 400, name
            assert field_error(bad, "name").startswith("Tier names cannot contain control characters"), name
        edit = boss.post("/admin/tiers", {"name": "free\x00", "daily_credits": "5"})  # an edit's exact name
        assert edit.status_code == 400 and "Tier names cannot contain control characters" in text_of(edit)
        for query in ("name=%00", "name=free%00", "name=a%07"):
            shown = boss.get(f"/admin/tiers/edit?{query}")
            assert shown.status_code == 400 and "Bad tier name" in shown.text, query
        no_daily = boss.post("/admin/tiers", {"new": "1", "name": "team", "daily_credits": ""})
        assert no_daily.status_code == 400 and "A new tier needs daily credits." in no_daily.text

        made = boss.post(
            "/admin/tiers",
            {
                "new": "1",
                "name": "team",
                "daily_credits": "700",
                "cost_rule": "per_request",
                "credits_per_1k_tokens": "",
                "max_concurrent": "4",
            },
        )
        assert made.status_code == 303
        got = tier(server, "team")
        assert (got.daily_credits, got.credits_per_1k_tokens, got.max_concurrent, got.rpm) == (700, 1, 4, None)
        assert ("team (700/day)") in boss.get("/admin").text
        assert boss.get("/admin/tiers/edit?name=nope").status_code == 404
        assert boss.post("/admin/tiers", {"name": "nope", "daily_credits": "5"}).status_code == 404
    assert (f"account:{admin_id}", "tier:team") in [r[:2] for r in audit_rows(server, "tier.saved")]
    with server.db.session() as s:
        assert sorted(t.name for t in accounts.list_tiers(s)) == ["free", "team"], "no refused name was stored"


# -- the rules, called directly ---------------------------------------------------------------------


def test_read_listing():
    assert admin.read_listing("  x@y ", "", "") == admin.Listing("x@y", 1, admin.PER_PAGE)
    assert admin.read_listing("", "3", "200") == admin.Listing("", 3, 200)
    for page, per_page in (("0", ""), ("", "0"), ("", "201"), ("٣", ""), ("+2", ""), ("2147483648", "")):
        with pytest.raises(ValueError):
            admin.read_listing("", page, per_page)
    for q in ("a\x00b", "\x1b", "a\x7f"):
        with pytest.raises(ValueError, match="control characters"):
            admin.read_listing(q, "", "")
    assert admin.read_listing("\tx@y\n", "", "").q == "x@y", "white space around the search is trimmed"
    assert admin.Listing("a b", 2, 25).url() == "/admin?q=a+b&page=2&per_page=25"
    assert admin.Listing("", 4).url(1) == "/admin"


def test_return_url_goes_back_only_to_the_admin_pages():
    assert admin.return_url("/admin/accounts/7", 7, "revoked") == "/admin/accounts/7?done=revoked"
    assert admin.return_url("/admin/accounts/8", 7, "revoked") == "/admin?updated=7", "another account's page"
    assert admin.return_url("/admin?q=ada&page=2&x=1", 7, "tier") == "/admin?q=ada&page=2&updated=7"
    for hostile in ("//evil.example/admin/accounts/7", "https://evil.example/admin/accounts/7", "/keys", ""):
        assert admin.return_url(hostile, 7, "tier") == "/admin?updated=7", hostile
    assert admin.return_url("/admin?q=ada", 7) == "/admin?q=ada"


def test_tier_changes_reads_the_form_as_tiers_set_takes_it():
    current = Tier(
        name="pro",
        daily_credits=100,
        monthly_credits=None,
        cost_rule="per_request",
        credits_per_1k_tokens=1,
        rpm=60,
        tpm=None,
        max_keys=None,
        max_concurrent=None,
        max_prompt_tokens=None,
        max_n=None,
    )
    same = {
        "daily_credits": "100",
        "monthly_credits": "",
        "cost_rule": "per_request",
        "credits_per_1k_tokens": "1",
        "rpm": "60",
    }
    assert admin.tier_changes(same, current) == {}
    assert admin.tier_changes({**same, "rpm": "", "max_n": " 3 "}, current) == {"rpm": None, "max_n": 3}
    assert admin.tier_changes({**same, "credits_per_1k_tokens": ""}, current) == {}, "blank: kept"
    assert admin.tier_changes({"daily_credits": "5", "monthly_credits": ""}, None) == {"daily_credits": 5}
    with pytest.raises(admin.TierFormError) as refused:
        admin.tier_changes({**same, "daily_credits": "-1", "rpm": "x"}, current)
    assert set(refused.value.errors) == {"daily_credits", "rpm"}
    assert admin.tier_limits(current) == ["60 requests/min per key"]


def test_tier_name_refusal():
    assert admin.tier_name_refusal("pro") is None and admin.tier_name_refusal("x" * 64) is None
    assert admin.tier_name_refusal("") == "Give the tier a name."
    assert admin.tier_name_refusal("x" * 65) == "At most 64 characters."
    assert admin.tier_name_refusal("a\x00") == "Tier names cannot contain control characters (this one has NUL)."
    assert admin.tier_name_refusal("a\x1b") == "Tier names cannot contain control characters (this one has U+001B)."
