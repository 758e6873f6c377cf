"""The keys pages with per-key limits (issue 12's web part), in-process on SQLite and PostgreSQL.

- A new key follows post/redirect/get: the POST answers 303 to ``/keys?shown=<token>``, that page shows
  the key once, and a reload (or another browser) shows the list without it and creates nothing.
- The generate form takes the limits; bad ones are a 400 page with the service's message and no key.
- A page per key shows its limits and its use against them and the account's; its form edits them.
- Regenerate offers a grace period: both secrets work until it ends (the injected clock moves past it).
- The JSON account API keeps in step: limits in key objects, on create, on their own call; grace.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import func, select
from web_helpers import Browser, chat, new_key_of

from aimichat.accounts import service as accounts
from aimichat.keys import tokens
from aimichat.registry import service as registry
from aimichat.store.models import ApiKey, KeyHandoff
from conftest import MutableClock, app_client
from scripted_engine import ScriptedEngine

NOON = dt.datetime(2026, 11, 30, 12, 0, 5)


@pytest.fixture
def clocked(database, tmp_path):
    """The app in-process over ``database``, on a clock the test moves (``.clock``)."""
    clock = MutableClock(NOON)
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as client:
        client.clock = clock
        yield client


def key_row(db, key_id: int) -> ApiKey:
    with db.session() as s:
        return s.get(ApiKey, key_id)


def count(db, model=ApiKey) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def figure(html: str, row: str) -> tuple[str, str, str]:
    """(used, limit, left) of one line of a key page's usage table, as shown."""
    match = re.search(rf'<tr id="use-{row}">(.*?)</tr>', html, re.S)
    assert match, f"no line {row}"
    cells = dict(re.findall(r'<td class="num (used|limit|left)"[^>]*>(.*?)</td>', match.group(1), re.S))
    return tuple(re.sub(r"<[^>]+>", "", cells[name]).strip() for name in ("used", "limit", "left"))


def chat_from(server, key: str, address: str):
    """A chat request with ``key`` from ``address`` (127.0.0.1, the test client, is a trusted proxy)."""
    return server.chat(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}, key, headers={"X-Forwarded-For": address}
    )


def input_value(html: str, name: str) -> str:
    match = re.search(rf'<input id="edit-[^"]+" name="{name}"[^>]* value="([^"]*)"', html)
    assert match, name
    return match.group(1)


# -- post/redirect/get ---------------------------------------------------------------------------


def test_a_new_key_is_shown_once_after_a_redirect_and_a_reload_makes_nothing(server):
    seen: list[str] = []
    with Browser(server) as b:
        b.sign_up("prg@example.com")
        b.http.event_hooks["response"] = [lambda r: r.read() and seen.append(str(r.headers) + r.text)]
        posted = b.post("/keys", {"name": "laptop"})
        assert posted.status_code == 303 and "aimichat_" not in posted.text
        location = posted.headers["location"]
        assert re.fullmatch(r"/keys\?shown=[A-Za-z0-9_-]{20,64}", location)
        shown = b.get(location)
        assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
        key = new_key_of(shown.text)
        assert key not in location and "Your new key “laptop”" in shown.text
        assert chat(server, key).status_code == 200

        again = b.get(location)  # the browser's reload of the page that showed it
        assert again.status_code == 200 and 'id="new-key"' not in again.text and key not in again.text
        assert 'id="key-gone"' in again.text
        listed = b.get("/keys")
        assert 'id="new-key"' not in listed.text and listed.text.count("data-key-id=") == 1
    assert count(server.db) == 1, "no second key"
    assert count(server.db, KeyHandoff) == 0, "the hand-off is gone once read"
    assert sum(key in body for body in seen) == 1, "the key is in one response, never in a header"


def test_the_hand_off_is_this_browsers_alone_and_the_database_never_holds_the_secret(server):
    with Browser(server) as laptop, Browser(server) as phone:
        laptop.sign_up("handoff@example.com")
        phone.log_in("handoff@example.com")  # the same account, another session
        location = laptop.post("/keys", {"name": "ci"}).headers["location"]
        with server.db.session() as s:
            sealed = s.scalars(select(KeyHandoff.sealed)).one()
            row = s.scalars(select(ApiKey)).one()
        stolen = phone.get(location)  # the URL alone is not enough
        assert 'id="new-key"' not in stolen.text and 'id="key-gone"' in stolen.text
        key = new_key_of(laptop.get(location).text)  # the browser that made it still gets it, once
        assert tokens.hash_key(key) == row.key_hash
        assert key not in sealed and key.encode().hex() not in sealed, "stored masked"

        # A hand-off nobody came back for goes with the session at log-out.
        laptop.post("/keys", {"name": "left behind"})
        assert count(server.db, KeyHandoff) == 1
        assert laptop.post("/logout").status_code == 303
        assert count(server.db, KeyHandoff) == 0


def test_an_unread_hand_off_expires_after_five_minutes(clocked):
    with Browser(clocked) as b:
        b.sign_up("late@example.com")
        location = b.post("/keys", {"name": "slow"}).headers["location"]
        clocked.clock.advance(minutes=5)
        late = b.get(location)
        assert 'id="new-key"' not in late.text and 'id="key-gone"' in late.text
        assert count(clocked.db) == 1, "the key was made all the same (and can be regenerated)"


# -- limits on the generate form -----------------------------------------------------------------


def test_generate_with_limits(server):
    with Browser(server) as b:
        b.sign_up("limits@example.com")
        form = {
            "daily_cap": "5",
            "monthly_cap": "1,000",
            "rpm": "10",
            "tpm": "5000",
            "expires_in": "30",
            "models": ["aimichat-1"],
            "ips": "10.0.0.0/8, 192.168.1.7\n2001:db8::/32",
        }
        key_id, key = b.generate_key("scoped", **form)
        row = key_row(server.db, key_id)
        assert (row.daily_cap, row.monthly_cap, row.rpm, row.tpm) == (5, 1000, 10, 5000)
        assert row.models == ["aimichat-1"] and row.ips == ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"]
        assert (
            dt.timedelta(days=29)
            < row.expires_at - dt.datetime.now(dt.UTC).replace(tzinfo=None)
            <= dt.timedelta(days=30)
        )
        assert chat_from(server, key, "10.1.2.3").status_code == 200
        assert chat(server, key).status_code == 403, "127.0.0.1 is outside its ranges"
        listed = b.get("/keys").text
        assert "5 credits/day · 1,000 credits/month · 10 requests/min" in listed
        assert f'<a href="/keys/{key_id}">scoped</a>' in listed

        plain_id, _ = b.generate_key("plain")
        assert key_row(server.db, plain_id).daily_cap is None and key_row(server.db, plain_id).models is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("daily_cap", "-1", "The daily cap cannot be negative."),
        ("rpm", "0", "Requests per minute must be at least 1."),
        ("tpm", "lots", "The tokens per minute must be a whole number."),
        ("monthly_cap", "99999999999", "The monthly cap is too large."),
        ("ips", "10.0.0.0/8, not-an-ip", "Not an IP range (CIDR)"),
        ("models", "no-such-model", "No model named no-such-model is available to this account."),
        ("expires_at", "2001-01-01T00:00:00", "The expiry must be in the future."),
        ("expires_at", "next tuesday", "The expiry is not a date and time"),
        ("expires_in", "0", "A key expires in 1 to"),
    ],
)
def test_bad_limits_are_a_400_page_and_make_no_key(server, field, value, message):
    with Browser(server) as b:
        b.sign_up("bad@example.com")
        r = b.post("/keys", {"name": "refused", field: value})
        assert r.status_code == 400 and message in r.text
        assert 'id="new-key"' not in r.text and '<details class="limits" open>' in r.text, "shown again, open"
        assert f'value="{value}"' in r.text or f'value="{value}" checked' in r.text or field == "models"
        assert 'value="refused"' in r.text
    assert count(server.db) == 0 and count(server.db, KeyHandoff) == 0


# -- the page of a key ---------------------------------------------------------------------------


def test_the_key_page_shows_use_against_the_keys_caps_and_the_accounts(server):
    with Browser(server) as b:
        b.sign_up("figures@example.com")
        key_id, capped = b.generate_key("capped", daily_cap="5", monthly_cap="50", rpm="10")
        _, other = b.generate_key("other")
        assert [chat(server, capped).status_code for _ in range(3)] == [200, 200, 200]
        assert chat(server, other).status_code == 200
        page = b.get(f"/keys/{key_id}")
        assert page.status_code == 200
        html = page.text
        assert "Key “capped”" in html and key_row(server.db, key_id).prefix + "…" in html
        assert figure(html, "key-day") == ("3", "5", "2")
        assert figure(html, "key-month") == ("3", "50", "47")
        assert figure(html, "key-rpm") == ("3", "10", "7")
        assert figure(html, "key-tpm")[1:] == ("None", "—")
        assert figure(html, "account-day") == ("4", "100", "96"), "the account counts every key"
        assert capped not in html and other not in html
        assert re.search(r'id="key-last-used"><time datetime="\d{4}-', html), "last used"
        assert input_value(html, "daily_cap") == "5" and input_value(html, "tpm") == ""

        # Up to the cap, then the key's own refusal; the page says so.
        assert [chat(server, capped).status_code for _ in range(3)] == [200, 200, 429]
        assert figure(b.get(f"/keys/{key_id}").text, "key-day") == ("5", "5", "0")

        listed = b.get("/keys").text
        assert f'href="/keys/{key_id}"' in listed


def test_the_key_page_has_no_inline_script_or_style(server):
    with Browser(server) as b:
        b.sign_up("csp-key@example.com")
        key_id, _ = b.generate_key("strict")
        r = b.get(f"/keys/{key_id}")
        assert "unsafe-inline" not in r.headers["content-security-policy"]
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text) and not re.search(r"\s(on[a-z]+|style)=", r.text)


def test_edit_limits_and_remove_one(server):
    with Browser(server) as b:
        b.sign_up("edit@example.com")
        key_id, key = b.generate_key("edited", daily_cap="5", monthly_cap="50", expires_in="10")
        expires = key_row(server.db, key_id).expires_at
        html = b.get(f"/keys/{key_id}").text
        kept = {name: input_value(html, name) for name in ("daily_cap", "monthly_cap", "rpm", "tpm", "expires_at")}

        r = b.post(f"/keys/{key_id}/limits", {**kept, "daily_cap": "8", "monthly_cap": "", "rpm": "30"})
        assert r.status_code == 303 and r.headers["location"] == f"/keys/{key_id}?saved=1"
        row = key_row(server.db, key_id)
        assert (row.daily_cap, row.monthly_cap, row.rpm, row.expires_at) == (8, None, 30, expires)
        saved = b.get(r.headers["location"]).text
        assert 'id="saved"' in saved and figure(saved, "key-day")[1] == "8" and figure(saved, "key-month")[1] == "None"

        # Everything empty: no limits at all.
        assert b.post(f"/keys/{key_id}/limits", {}).status_code == 303
        row = key_row(server.db, key_id)
        assert (row.daily_cap, row.monthly_cap, row.rpm, row.tpm, row.expires_at, row.models, row.ips) == (None,) * 7
        assert chat(server, key).status_code == 200

        # A refused edit changes nothing and comes back with what was typed.
        bad = b.post(f"/keys/{key_id}/limits", {"daily_cap": "3", "ips": "300.1.1.1"})
        assert bad.status_code == 400 and "Not an IP range (CIDR)" in bad.text and 'value="300.1.1.1"' in bad.text
        assert key_row(server.db, key_id).daily_cap is None

        # A revoked key's limits no longer change.
        b.post(f"/keys/{key_id}/revoke", {"confirm": "yes"})
        refused = b.post(f"/keys/{key_id}/limits", {"daily_cap": "3"})
        assert refused.status_code == 400 and key_row(server.db, key_id).daily_cap is None


def test_models_to_tick_are_the_plans(server):
    with server.db.session() as s:
        registry.add_embedded(s, "second")
        s.commit()
    with Browser(server) as b:
        b.sign_up("models@example.com")
        b.get("/plan")  # reads the registry at once; the keys page takes the catalog as last polled
        page = b.get("/keys").text
        assert 'name="models" value="aimichat-1"' in page and 'name="models" value="second"' in page
        key_id, _ = b.generate_key("one model", models=["second"])
        assert key_row(server.db, key_id).models == ["second"]
        html = b.get(f"/keys/{key_id}").text
        assert 'value="second" checked' in html and 'value="aimichat-1" checked' not in html


# -- regenerate with a grace period --------------------------------------------------------------


def test_regenerate_with_grace_keeps_both_secrets_until_it_ends(clocked):
    with Browser(clocked) as b:
        b.sign_up("grace@example.com")
        key_id, old = b.generate_key("rotated", daily_cap="10")
        assert chat(clocked, old).status_code == 200

        # Without JavaScript, the confirmation page offers the same choice, keeping the one made.
        confirm = b.post(f"/keys/{key_id}/regenerate", {"grace": "24h"})
        assert confirm.status_code == 200 and '<option value="24h" selected>' in confirm.text
        assert key_row(clocked.db, key_id).previous_hash is None, "nothing done before confirming"

        same_id, new, page = b.regenerate(key_id, grace="1h")
        assert same_id == key_id and new != old, "the same key, a new secret"
        assert "keeps working until" in page.text and "2026-11-30 13:00 UTC" in page.text
        assert chat(clocked, new).status_code == 200 and chat(clocked, old).status_code == 200
        detail = b.get(f"/keys/{key_id}").text
        assert 'id="key-grace"' in detail and figure(detail, "key-day") == ("3", "10", "7"), "use is kept"

        clocked.clock.advance(hours=1)
        assert chat(clocked, old).status_code == 401
        assert chat(clocked, new).status_code == 200
        assert 'id="key-grace"' not in b.get(f"/keys/{key_id}").text

        _, newest, page = b.regenerate(key_id)  # no grace: the old secret stops at once
        assert "stopped working at once" in page.text
        assert chat(clocked, new).status_code == 401 and chat(clocked, newest).status_code == 200

        before = key_row(clocked.db, key_id).key_hash
        assert b.post(f"/keys/{key_id}/regenerate", {"confirm": "yes", "grace": "2y"}).status_code == 400
        assert key_row(clocked.db, key_id).key_hash == before


def test_a_revoked_key_is_not_regenerated(server):
    with Browser(server) as b:
        b.sign_up("revived@example.com")
        key_id, old = b.generate_key("revived", daily_cap="7", rpm="9")
        b.post(f"/keys/{key_id}/revoke", {"confirm": "yes"})
        for confirm in ("", "yes"):  # refused before the confirmation page too: there is nothing to confirm
            refused = b.post(f"/keys/{key_id}/regenerate", {"confirm": confirm, "grace": "7d"})
            assert refused.status_code == 409 and "revoked and stays revoked" in refused.text
        assert count(server.db) == 1 and chat(server, old).status_code == 401


# -- CSRF and ownership --------------------------------------------------------------------------


def test_forms_without_the_csrf_token_change_nothing(server):
    with Browser(server) as b:
        b.sign_up("forged@example.com")
        key_id, key = b.generate_key("kept", daily_cap="5")
        for token in (None, "wrong"):
            extra = {} if token is None else {"csrf_token": token}
            assert b.post("/keys", {"name": "forged", "daily_cap": "1", **extra}, csrf=False).status_code == 403
            assert b.post(f"/keys/{key_id}/limits", {"daily_cap": "", **extra}, csrf=False).status_code == 403
            regenerate = {"confirm": "yes", "grace": "7d", **extra}
            assert b.post(f"/keys/{key_id}/regenerate", regenerate, csrf=False).status_code == 403
            r = b.api("POST", f"/api/account/keys/{key_id}/limits", csrf=False, json={"daily_cap": None})
            assert r.status_code == 403
        row = key_row(server.db, key_id)
        assert count(server.db) == 1 and row.daily_cap == 5 and row.previous_hash is None
        assert chat(server, key).status_code == 200


def test_another_accounts_key_is_404_on_every_new_route(server):
    with Browser(server) as owner, Browser(server) as other:
        owner.sign_up("owner2@example.com")
        key_id, key = owner.generate_key("mine", daily_cap="5")
        other.sign_up("other2@example.com")
        assert other.get(f"/keys/{key_id}").status_code == 404
        r = other.post(f"/keys/{key_id}/limits", {"daily_cap": ""})
        assert r.status_code == 404 and "Key not found" in r.text
        assert other.post(f"/keys/{key_id}/regenerate", {"confirm": "yes", "grace": "1h"}).status_code == 404
        r = other.api("POST", f"/api/account/keys/{key_id}/limits", json={"daily_cap": None})
        assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found"
        r = other.api("POST", f"/api/account/keys/{key_id}/regenerate", json={"grace": "1h"})
        assert r.status_code == 404
        assert other.get("/keys/999999").status_code == 404, "the same answer as a missing key"
        row = key_row(server.db, key_id)
        assert row.daily_cap == 5 and row.previous_hash is None and chat(server, key).status_code == 200


# -- the JSON account API ------------------------------------------------------------------------


def test_account_api_limits(clocked):
    with Browser(clocked) as b:
        b.sign_up("api-limits@example.com")
        body = {"name": "ci", "daily_cap": 5, "rpm": 10, "expires_at": "2027-01-31T12:00:00Z", "ips": ["10.0.0.0/8"]}
        created = b.api("POST", "/api/account/keys", json=body)
        assert created.status_code == 201
        made = created.json()
        assert made["limits"] == {
            "daily_cap": 5,
            "monthly_cap": None,
            "rpm": 10,
            "tpm": None,
            "expires_at": "2027-01-31T12:00:00Z",
            "models": None,
            "ips": ["10.0.0.0/8"],
        }
        for bad, param in (
            ({"name": "x", "daily_cap": "5"}, "daily_cap"),
            ({"name": "x", "daily_cap": True}, "daily_cap"),
            ({"name": "x", "rpm": 0}, None),
            ({"name": "x", "ips": ["nope"]}, None),
            ({"name": "x", "models": ["no-such-model"]}, "models"),
            ({"name": "x", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
            ({"name": "x", "colour": "red"}, "colour"),
            ({"name": " "}, "name"),
        ):
            r = b.api("POST", "/api/account/keys", json=bad)
            assert r.status_code == 400, bad
            assert r.json()["error"]["param"] == param, bad
        assert len(b.api("GET", "/api/account/keys").json()["data"]) == 1

        key_id = made["id"]
        changed = b.api("POST", f"/api/account/keys/{key_id}/limits", json={"daily_cap": None, "monthly_cap": 40})
        assert changed.status_code == 200
        limits = changed.json()["limits"]
        assert (limits["daily_cap"], limits["monthly_cap"], limits["rpm"]) == (None, 40, 10), "the rest stays"
        assert b.api("POST", f"/api/account/keys/{key_id}/limits", json={"tpm": -1}).status_code == 400
        assert b.api("POST", f"/api/account/keys/{key_id}/limits", content=b"[]").status_code == 400

        for grace in ("2y", -5, 31 * 86400, True):
            r = b.api("POST", f"/api/account/keys/{key_id}/regenerate", json={"grace": grace})
            assert r.status_code == 400 and r.json()["error"]["param"] == "grace", grace
        rotated = b.api("POST", f"/api/account/keys/{key_id}/regenerate", json={"grace": "24h"})
        assert rotated.status_code == 201
        answer = rotated.json()
        assert answer["id"] == key_id and answer["replaces"] == key_id
        assert answer["old_secret_valid_until"] == "2026-12-01T12:00:05Z"
        assert answer["limits"]["monthly_cap"] == 40
        seconds = b.api("POST", f"/api/account/keys/{key_id}/regenerate", json={"grace": 3600}).json()
        assert seconds["old_secret_valid_until"] == "2026-11-30T13:00:05Z"
        assert chat_from(clocked, answer["key"], "10.0.0.1").status_code == 200, "the previous secret, in its grace"
        assert chat_from(clocked, seconds["key"], "10.0.0.1").status_code == 200
        assert chat_from(clocked, made["key"], "10.0.0.1").status_code == 401, "two rotations ago"


def test_the_plan_caps_the_number_of_keys_on_the_form(server):
    with server.db.session() as s:
        accounts.set_tier(s, "small", daily_credits=10)
        accounts.set_tier_limits(s, "small", max_keys=1)
        accounts.create_account(s, "small@example.com", "correct horse battery", tier="small")
        s.commit()
    with Browser(server) as b:
        b.log_in("small@example.com")
        key_id, _ = b.generate_key("only")
        r = b.post("/keys", {"name": "second"})
        assert r.status_code == 400 and "allows 1 active keys" in r.text
        b.post(f"/keys/{key_id}/revoke", {"confirm": "yes"})
        b.generate_key("second")
        refused = b.post("/keys", {"name": "third"})
        assert refused.status_code == 400 and "allows 1 active keys" in refused.text
    assert count(server.db) == 2
