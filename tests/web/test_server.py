"""The account pages and account API over HTTP (in-process, the scripted engine answering), on SQLite and
PostgreSQL.

Covers the issue's server tests: CSRF refusal, log-in throttling, XSS escaping, another account's
key id -> 404, session fixation, and a key appearing in exactly one response.
"""

from __future__ import annotations

import html
import re
import subprocess

import pytest
from web_helpers import PASSWORD, Browser, chat, csrf_of

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.store.models import ApiKey, UsageEvent, WebSession
from conftest import app_client, make_account, tool_missing
from scripted_engine import ScriptedEngine


def key_row(db, key_id: int) -> ApiKey:
    with db.session() as s:
        return s.get(ApiKey, key_id)


def key_count(db) -> int:
    with db.session() as s:
        return s.query(ApiKey).count()


# -- CSRF ----------------------------------------------------------------------------------------


def test_post_without_valid_csrf_token_is_refused_and_changes_nothing(server):
    with Browser(server) as b:
        b.sign_up("csrf@example.com")
        key_id, key = b.generate_key("kept")
        before = key_count(server.db)
        for token in (None, "", "wrong", b.token[:-1] + ("0" if b.token[-1] != "0" else "1")):
            data = {"name": "forged"} if token is None else {"name": "forged", "csrf_token": token}
            assert b.post("/keys", data, csrf=False).status_code == 403
            revoke = {"confirm": "yes"} if token is None else {"confirm": "yes", "csrf_token": token}
            assert b.post(f"/keys/{key_id}/revoke", revoke, csrf=False).status_code == 403
            assert b.post(f"/keys/{key_id}/regenerate", revoke, csrf=False).status_code == 403
        assert key_count(server.db) == before
        assert key_row(server.db, key_id).revoked_at is None
        assert chat(server, key).status_code == 200

        # Log-out and password change are state changes too.
        assert b.post("/logout", {"csrf_token": "wrong"}, csrf=False).status_code == 403
        refused = b.post(
            "/account/password",
            {"current_password": PASSWORD, "new_password": "another password", "csrf_token": "x"},
            csrf=False,
        )
        assert refused.status_code == 403
        assert b.get("/keys").status_code == 200, "still logged in"
        assert b.log_in("csrf@example.com", "another password").status_code != 303


def test_json_calls_need_the_csrf_header(server):
    with Browser(server) as b:
        b.sign_up("json-csrf@example.com")
        key_id, _ = b.generate_key()
        for headers in ({}, {"X-CSRF-Token": "nope"}):
            r = b.api("POST", "/api/account/keys", csrf=False, headers=headers, json={"name": "forged"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
            r = b.api("POST", f"/api/account/keys/{key_id}/revoke", csrf=False, headers=headers)
            assert r.status_code == 403
            r = b.api(
                "POST",
                "/playground/stream",
                csrf=False,
                headers=headers,
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 403
        assert key_count(server.db) == 1 and key_row(server.db, key_id).revoked_at is None
        assert b.api("GET", "/api/account/keys", csrf=False).status_code == 200, "reads need no token"


def test_login_and_signup_forms_need_the_pre_session_token(server):
    make_account(server.db, "pre@example.com", password=PASSWORD)
    with Browser(server) as b:
        login = b.get("/login")
        assert "aimichat_csrf" in login.headers.get("set-cookie", "")
        # A forged cross-site form has no way to know the cookie's value.
        assert (
            b.post(
                "/login", {"email": "pre@example.com", "password": PASSWORD, "csrf_token": "forged"}, csrf=False
            ).status_code
            == 403
        )
        assert b.post("/signup", {"email": "new@example.com", "password": PASSWORD}, csrf=False).status_code == 403
        assert b.session_cookie() is None
        assert b.log_in("pre@example.com").status_code == 303
    with server.db.session() as s, pytest.raises(accounts.AccountError):
        accounts.get_account(s, "new@example.com")


# -- log-in throttling ---------------------------------------------------------------------------


def test_login_is_throttled_per_email(server):
    make_account(server.db, "victim@example.com", password=PASSWORD)
    with Browser(server) as b:
        b.get("/login")
        for i in range(30):
            # From thirty different addresses (uvicorn trusts X-Forwarded-For from 127.0.0.1); a browser that has
            # logged in to the account before would not be held back (tests/web/test_auth_hardening.py).
            r = b.log_in("victim@example.com", "wrong password", headers={"X-Forwarded-For": f"203.0.113.{i}"})
            assert r.status_code == 400 and "Wrong email or password" in r.text
        r = b.log_in("victim@example.com", PASSWORD, headers={"X-Forwarded-For": "198.51.100.7"})
        assert r.status_code == 429
        assert "Too many failed log-in attempts" in r.text and "Wait 15 minutes" in r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 900
        assert b.session_cookie() is None, "even the right password waits"
        # Another account from a fresh address is unaffected.
        make_account(server.db, "other@example.com", password=PASSWORD)
        assert b.log_in("other@example.com", PASSWORD, headers={"X-Forwarded-For": "198.51.100.8"}).status_code == 303


def test_login_is_throttled_per_address(server):
    make_account(server.db, "real@example.com", password=PASSWORD)
    with Browser(server) as b:
        b.get("/login")
        for i in range(10):
            assert (
                b.log_in(f"guess{i}@example.com", "password1", headers={"X-Forwarded-For": "192.0.2.66"}).status_code
                == 400
            )
        r = b.log_in("real@example.com", PASSWORD, headers={"X-Forwarded-For": "192.0.2.66"})
        assert r.status_code == 429 and "Too many failed log-in attempts" in r.text
        assert b.log_in("real@example.com", PASSWORD, headers={"X-Forwarded-For": "192.0.2.67"}).status_code == 303


# -- escaping ------------------------------------------------------------------------------------


XSS = "<script>alert(1)</script>"


def test_user_input_is_escaped_everywhere(server):
    with Browser(server) as b:
        b.sign_up(XSS + "@example.com")  # a valid address, as far as the email check goes
        key_id, key = b.generate_key(XSS)
        assert chat(server, key).status_code == 200
        pages = [b.follow(b.post("/keys", {"name": XSS + " 2"}))]  # the page that shows the new key
        pages += [b.get(p) for p in ("/keys", "/usage", "/account")]
        pages.append(b.post(f"/keys/{key_id}/revoke", {}))  # the no-JavaScript confirmation page
        for page in pages:
            assert XSS not in page.text, page.url
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, page.url
        playground = b.post("/playground", {"message": XSS})
        assert XSS not in playground.text and "&lt;script&gt;alert(1)" in playground.text
        with server.db.session() as s:
            accounts.set_admin(s, XSS + "@example.com")
            s.commit()
        admin = b.get("/admin")
        assert XSS not in admin.text and "&lt;script&gt;alert(1)&lt;/script&gt;@example.com" in admin.text
        csv = b.get("/usage.csv")
        assert csv.headers["content-type"].startswith("text/csv") and XSS in csv.text  # CSV is data, not HTML
    with Browser(server) as anon:
        r = anon.get("/login")
        r = anon.post("/login", {"email": f'"><img src=x onerror=alert(1)>{XSS}', "password": "x"})
        assert "<img src=x" not in r.text and XSS not in r.text


def test_pages_carry_csp_and_no_inline_script_or_style(server):
    with Browser(server) as b:
        b.sign_up("csp@example.com")
        for path in ("/keys", "/usage", "/plan", "/docs", "/playground", "/account", "/login", "/signup"):
            r = b.get(path) if path not in ("/login", "/signup") else b.http.get(path)
            assert r.status_code in (200, 303), path
            if r.status_code != 200:
                continue
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
            assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), f"inline script on {path}"
            assert not re.search(r"\son[a-z]+=", r.text), f"inline event handler on {path}"
            assert not re.search(r"\sstyle=", r.text), f"inline style on {path}"


# -- ownership -----------------------------------------------------------------------------------


def test_another_accounts_key_id_is_404(server):
    with Browser(server) as owner, Browser(server) as other:
        owner.sign_up("owner@example.com")
        key_id, key = owner.generate_key("mine")
        other.sign_up("other@example.com")
        for action in ("revoke", "regenerate"):
            r = other.post(f"/keys/{key_id}/{action}", {"confirm": "yes"})
            assert r.status_code == 404 and "Key not found" in r.text
            r = other.api("POST", f"/api/account/keys/{key_id}/{action}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found"
        assert other.post("/keys/999999/revoke", {"confirm": "yes"}).status_code == 404, "same answer as a missing key"
        assert key_row(server.db, key_id).revoked_at is None
        assert chat(server, key).status_code == 200
        assert all(k["id"] != key_id for k in other.api("GET", "/api/account/keys").json()["data"])


# -- sessions ------------------------------------------------------------------------------------


def test_session_id_changes_at_login(server):
    make_account(server.db, "fix@example.com", password=PASSWORD)
    with Browser(server) as b:
        # An attacker plants a session id before the victim logs in...
        b.http.cookies.set("aimichat_session", "planted-by-attacker-" + "x" * 30, domain="127.0.0.1")
        b.get("/login")
        assert b.log_in("fix@example.com").status_code == 303
        first = b.session_cookie()
        assert first and not first.startswith("planted")
        # ...or even a real session of their own: logging in again replaces it and ends it.
        b.get("/keys")
        assert b.log_in("fix@example.com").status_code == 303
        second = b.session_cookie()
        assert second != first
    with Browser(server) as stale:
        stale.http.cookies.set("aimichat_session", first, domain="127.0.0.1")
        assert stale.get("/keys").headers["location"].startswith("/login"), "the old session is gone"
    with server.db.session() as s:
        stored = [row.token_hash for row in s.query(WebSession)]
    assert second not in stored and len(stored[0]) == 64, "only the SHA-256 of the token is stored"


def test_logout_and_password_change_end_sessions(server):
    with Browser(server) as phone, Browser(server) as laptop:
        phone.sign_up("pw@example.com")
        laptop.log_in("pw@example.com")
        laptop.get("/keys")
        assert (
            laptop.post(
                "/account/password", {"current_password": "wrong one", "new_password": "new password 1"}
            ).status_code
            == 400
        )
        r = laptop.post("/account/password", {"current_password": PASSWORD, "new_password": "new password 1"})
        assert r.status_code == 303 and laptop.session_cookie()
        assert laptop.get("/account?changed=1").status_code == 200
        assert phone.get("/keys").status_code == 303, "the other browser was logged out"
        assert laptop.post("/logout").status_code == 303
        assert laptop.get("/keys").status_code == 303
        assert laptop.log_in("pw@example.com", "new password 1").status_code == 303


def test_cookie_flags(server, database, tmp_path):
    with Browser(server) as b:
        cookie = b.sign_up("flags@example.com").headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    https = app_client(ScriptedEngine(), database, tmp_path, public_url="https://chat.example.com")
    with https, https.client() as c:
        form = c.get("/signup")
        pre = form.headers["set-cookie"]
        assert pre.startswith("__Host-aimichat_csrf=") and "Secure" in pre
        # httpx keeps Secure cookies off plain http, so send the pre-session cookie by hand.
        value = pre.split(";")[0].split("=", 1)[1]
        data = {"email": "flags2@example.com", "password": PASSWORD, "csrf_token": csrf_of(form.text)}
        sent = {"Cookie": f"__Host-aimichat_csrf={value}"}
        assert c.post("/signup", data=data, headers=sent).status_code == 303
        r = c.post("/login", data=data, headers=sent)
        assert r.status_code == 303
        cookies = {line.split("=", 1)[0]: line for line in r.headers.get_list("set-cookie")}
        assert set(cookies) == {"__Host-aimichat_session", "__Host-aimichat_device"}
        for cookie in cookies.values():
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        assert "Max-Age=31536000" in cookies["__Host-aimichat_device"], "a known device is remembered for a year"


# -- keys shown once -----------------------------------------------------------------------------


def test_a_key_appears_in_exactly_one_response(server):
    seen: list[str] = []
    with Browser(server) as b:
        b.http.event_hooks["response"] = [lambda r: r.read() and seen.append(r.text)]
        b.sign_up("once@example.com")
        key_id, key = b.generate_key("shown once")
        assert chat(server, key).status_code == 200
        for path in (
            "/keys",
            "/usage",
            "/plan",
            "/docs",
            "/playground",
            "/account",
            "/usage.csv",
            "/api/account/keys",
            "/api/account/usage",
        ):
            b.get(path)
        b.post(f"/keys/{key_id}/revoke", {})  # confirmation page
        created = b.api("POST", "/api/account/keys", json={"name": "json"}).json()["key"]
        b.api("GET", "/api/account/keys")
        _, new_key, shown = b.regenerate(key_id)
        assert b.get(str(shown.url)).status_code == 200, "the page that showed it, reloaded"
        b.get("/keys")
    assert sum(key in body for body in seen) == 1
    assert sum(created in body for body in seen) == 1
    assert sum(new_key in body for body in seen) == 1
    with server.db.session() as s:
        assert all(key not in (row.key_hash, row.prefix) for row in s.query(ApiKey))


# -- account API ---------------------------------------------------------------------------------


def test_account_api_refuses_api_keys(server):
    with Browser(server) as b:
        b.sign_up("apikey@example.com")
        _, key = b.generate_key()
        for headers, params in (
            ({"Authorization": f"Bearer {key}"}, {}),
            ({"X-API-Key": key}, {}),
            ({}, {"api_key": key}),
        ):
            with server.client() as c:  # no session cookie: the key alone
                r = c.get("/api/account/keys", headers=headers, params=params)
                assert r.status_code == 403 and r.json()["error"]["code"] == "mode_not_allowed"
                r = c.post("/api/account/keys", headers=headers, params=params, json={"name": "minted"})
                assert r.status_code == 403 and r.json()["error"]["code"] == "mode_not_allowed"
            # Even with a session, a key in the request is refused.
            r = b.api("GET", "/api/account/usage", headers=headers, params=params)
            assert r.status_code == 403 and r.json()["error"]["code"] == "mode_not_allowed"
        with server.client() as c:
            r = c.get("/api/account/keys")
            assert r.status_code == 401 and r.json()["error"]["code"] == "session_required"


def test_account_api_manages_keys_and_reads_usage(server):
    with Browser(server) as b:
        b.sign_up("api@example.com")
        created = b.api("POST", "/api/account/keys", json={"name": "ci"})
        assert created.status_code == 201
        body = created.json()
        assert body["key"].startswith("aimichat_") and body["status"] == "active" and body["prefix"] == body["key"][:13]
        assert b.api("POST", "/api/account/keys", json={"name": "  "}).status_code == 400
        assert (
            b.api(
                "POST", "/api/account/keys", content=b"not json", headers={"Content-Type": "application/json"}
            ).status_code
            == 400
        )
        assert chat(server, body["key"]).status_code == 200

        listed = b.api("GET", "/api/account/keys").json()["data"]
        assert [k["name"] for k in listed] == ["ci"] and "key" not in listed[0] and listed[0]["last_used"]

        regenerated = b.api("POST", f"/api/account/keys/{body['id']}/regenerate").json()
        assert regenerated["name"] == "ci" and regenerated["replaces"] == body["id"]
        assert chat(server, body["key"]).status_code == 401 and chat(server, regenerated["key"]).status_code == 200
        revoked = b.api("POST", f"/api/account/keys/{regenerated['id']}/revoke").json()
        assert revoked["status"] == "revoked" and chat(server, regenerated["key"]).status_code == 401

        usage = b.api("GET", "/api/account/usage?days=30").json()
        assert usage["daily"]["used"] == 2 and len(usage["days"]) == 30 and usage["days"][-1]["credits"] == 2
        assert b.api("GET", "/api/account/usage?days=0").status_code == 400


# -- usage page, CSV, plan -----------------------------------------------------------------------


def test_usage_page_and_csv(server):
    with Browser(server) as b:
        b.sign_up("usage@example.com")
        key_id, key = b.generate_key("=HYPERLINK(1)")
        assert chat(server, key).status_code == 200
        page = b.get("/usage").text
        assert re.search(r'id="day-used">1</span> <span class="of">of 100 credits used', page)
        assert len(re.findall(r'<rect class="bar', page)) == 30
        row = re.search(rf'<tr data-key-id="{key_id}">.*?</tr>', page, re.S).group(0)
        assert '<td data-label="Credits" class="num credits">1</td>' in row and "<time" in row  # last used

        csv = b.get("/usage.csv")
        assert csv.status_code == 200 and "attachment" in csv.headers["content-disposition"]
        lines = csv.text.strip().splitlines()
        assert lines[0].startswith("time_utc,day,request_id") and len(lines) == 2
        assert ",'=HYPERLINK(1),aimichat_" in lines[1] and ",charged,1," in lines[1]
        assert b.get("/usage.csv?start=2020-01-01&end=2019-01-01").status_code == 400
        assert b.get("/usage.csv?start=2020-01-01&end=2024-01-01").status_code == 400
        assert b.get("/usage.csv?start=yesterday").status_code == 400
        assert len(b.get("/usage.csv?start=2000-01-01&end=2000-01-31").text.strip().splitlines()) == 1

        plan = b.get("/plan").text
        assert "free" in plan and "100 a day" in plan and "1 credit per request" in plan


def test_pages_need_a_session(server):
    with server.client() as c:
        for path in ("/keys", "/usage", "/plan", "/playground", "/account", "/admin", "/usage.csv"):
            r = c.get(path)
            assert r.status_code == 303 and r.headers["location"] == f"/login?next={path}&reason=login", path
        assert c.get("/docs").status_code == 200 and c.get("/").status_code == 200
        assert c.get("/login?next=//evil.example").status_code == 200
    make_account(server.db, "next@example.com", password=PASSWORD)
    with Browser(server) as b:
        b.get("/login?next=//evil.example/x")
        assert (
            "evil"
            not in b.post(
                "/login", {"email": "next@example.com", "password": PASSWORD, "next": "//evil.example/x"}
            ).headers["location"]
        )


# -- playground ----------------------------------------------------------------------------------


def test_playground_charges_the_account(server):
    with Browser(server) as b:
        b.sign_up("talk@example.com")
        page = b.post("/playground", {"message": "Say hello"})
        assert page.status_code == 200
        assert re.search(r'id="remaining">99<', page.text), "one credit gone"
        assert page.text.count('class="msg assistant"') == 1
        follow_up = b.post(
            "/playground", {"role": ["user", "assistant"], "content": ["Say hello", "Hello!"], "message": "And again"}
        )
        assert re.search(r'id="remaining">98<', follow_up.text) and follow_up.text.count('class="msg ') == 4

        stream = b.api("POST", "/playground/stream", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        assert '"x_ratelimit":{"limit":100,"remaining":97' in stream.text
        assert (
            b.api("POST", "/playground/stream", json={"messages": [{"role": "system", "content": "x"}]}).status_code
            == 400
        )
        assert b.api("POST", "/playground/stream", json={"messages": []}).status_code == 400
        lone = b.api(  # JSON can escape a lone surrogate; it is no text (it used to be a 500)
            "POST",
            "/playground/stream",
            content='{"messages": [{"role": "user", "content": "\\ud800"}]}',
            headers={"Content-Type": "application/json"},
        )
        assert lone.status_code == 400 and "Unicode" in lone.json()["error"]["message"]
    with server.db.session() as s:
        events = s.query(UsageEvent).all()
        assert len(events) == 3 and all(e.api_key_id is None and e.credits == 1 for e in events)


def test_a_conversation_longer_than_the_context_is_explained_on_the_page(server):
    with Browser(server) as b:
        b.sign_up("long@example.com")
        earlier = "word " * 1500  # each turn within the page's limit, together past the model's window
        assert 1500 < server.engine.context_length < 3000
        page = b.post("/playground", {"role": ["user", "assistant"], "content": [earlier, earlier], "message": "and?"})
        assert page.status_code == 400 and "maximum context length" in page.text
        assert page.text.count('class="msg assistant"') == 1  # the earlier turn, and no new reply


def test_playground_shows_when_credits_are_spent(server):
    make_account(server.db, "broke@example.com", daily=1, password=PASSWORD)
    with Browser(server) as b:
        b.log_in("broke@example.com")
        assert b.post("/playground", {"message": "one"}).status_code == 200
        spent = b.post("/playground", {"message": "two"})
        assert spent.status_code == 429 and "Daily credit limit reached" in spent.text
        r = b.api("POST", "/playground/stream", json={"messages": [{"role": "user", "content": "three"}]})
        assert r.status_code == 429 and r.json()["message"] == "Daily credit limit reached"


# -- admin ---------------------------------------------------------------------------------------


def test_admin_changes_tier_and_disables_accounts(server):
    with server.db.session() as s:
        accounts.set_tier(s, "pro", daily_credits=1000)
        accounts.create_account(s, "admin@example.com", PASSWORD, is_admin=True)
        s.commit()
    with Browser(server) as user, Browser(server) as admin:
        user.sign_up("user@example.com")
        _, key = user.generate_key()
        assert user.get("/admin").status_code == 403
        assert user.post("/admin/accounts/1/tier", {"tier": "pro"}).status_code == 403

        admin.log_in("admin@example.com")
        page = admin.get("/admin")
        assert page.status_code == 200 and "user@example.com" in page.text
        user_id = int(
            re.search(
                r'<tr id="account-(\d+)"[^>]*>\s*<th scope="row" data-label="Email"[^>]*><a [^>]*>user@example.com',
                page.text,
            ).group(1)
        )
        assert admin.post(f"/admin/accounts/{user_id}/tier", {"tier": "pro"}).status_code == 303
        assert admin.post(f"/admin/accounts/{user_id}/tier", {"tier": "nope"}).status_code == 400
        assert "1,000 a day" in user.get("/plan").text

        assert admin.post(f"/admin/accounts/{user_id}/disable").status_code == 200  # the confirmation step
        assert admin.post(f"/admin/accounts/{user_id}/disable", {"confirm": "yes"}).status_code == 303
        assert chat(server, key).status_code == 403
        assert user.get("/keys").status_code == 303, "its sessions ended"
        assert user.log_in("user@example.com").status_code == 403
        admin.get("/admin")
        assert admin.post(f"/admin/accounts/{user_id}/enable").status_code == 303
        assert chat(server, key).status_code == 200
        own_id = int(
            re.search(
                r'<tr id="account-(\d+)"[^>]*>\s*<th scope="row" data-label="Email"[^>]*><a [^>]*>admin@example.com',
                admin.get("/admin").text,
            ).group(1)
        )
        assert admin.post(f"/admin/accounts/{own_id}/disable").status_code == 400
        assert admin.post("/admin/accounts/424242/disable").status_code == 404


# -- docs ----------------------------------------------------------------------------------------


def test_docs_page_fills_in_this_server(server):
    page = html.unescape(server.http.get("/docs").text)  # the text a reader sees, whichever quotes are escaped
    assert "aimichat.app" not in page and "aimichat_your_api_key_here" not in page
    for fragment in (
        f"curl -X POST {server.url}/v1/chat/completions",
        f'url = "{server.url}/v1/chat/completions"',
        f"const url = '{server.url}/v1/chat/completions';",
        "Bearer YOUR_API_KEY",
        "Never commit API keys to version control",
    ):
        assert fragment in page, fragment


def docs_examples(page: str) -> dict[str, str]:
    """The docs page's labelled code examples, as a reader copies them."""
    blocks = re.findall(r'<p class="code-label">(.*?)</p>.*?<code id="code-[^"]+">(.*?)</code>', page, re.S)
    return {html.unescape(label): html.unescape(code) for label, code in blocks}


def test_docs_examples_are_this_servers_and_valid_code(api_server, tmp_path):
    page = api_server.http.get("/docs").text
    code = docs_examples(page)
    assert set(code) >= {"Python", "Node.js", "curl", "Request", "Response", "429 response body"}
    for label in ("Python", "Node.js", "curl"):
        assert f"{api_server.url}/v1/chat/completions" in code[label], label
        assert "YOUR_API_KEY" in code[label] and "aimichat.app" not in code[label], label
    compile(code["Python"], "example.py", "exec")
    assert '    "Authorization": f"Bearer {api_key}",' in code["Python"]
    practices = re.search(r'<section id="best-practices".*?</section>', page, re.S).group(0)
    assert practices.count("<li>") == 4 and re.search(r'<section id="help"', page)
    (tmp_path / "example.js").write_text(code["Node.js"])
    if subprocess.run(["node", "--version"], capture_output=True).returncode != 0:
        tool_missing("node is not installed")
    assert subprocess.run(["node", "--check", str(tmp_path / "example.js")], capture_output=True).returncode == 0


def test_signup_validation(server):
    with Browser(server) as b:
        b.get("/signup")
        assert "at least 8 characters" in b.post("/signup", {"email": "short@example.com", "password": "short"}).text
        assert b.post("/signup", {"email": "not-an-email", "password": PASSWORD}).status_code == 400
        b.sign_up("dupe@example.com")
    with Browser(server) as again:
        again.get("/signup")
        r = again.post("/signup", {"email": "DUPE@example.com", "password": PASSWORD})
        # As for a free email (which would not tell which emails have accounts): nothing made, nobody logged in.
        assert r.status_code == 303 and r.headers["location"] == "/login?signed_up=1"
        assert again.session_cookie() is None
    with server.db.session() as s:
        assert accounts.get_account(s, "dupe@example.com").tier.name == "free"
        assert keys.list_keys(s, accounts.get_account(s, "dupe@example.com").id) == []
