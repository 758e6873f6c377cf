"""Recovery paths and small page fixes (issue 17): the common-password rule wherever a password is set,
`aimichat accounts set-password`, the HTML 404 for a mistyped page address, the support contact, and a keys
list that puts active keys first and offers no "Regenerate" on a revoked key.

The rules are called directly; the pages through the real app (SQLite, and PostgreSQL where the database
takes part in what is tested), the CLI through Click's runner over the same database as the app.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from web_helpers import PASSWORD, Browser, chat

from aimichat.accounts import service as accounts
from aimichat.cli import cli
from aimichat.config import Settings
from aimichat.store.db import Database
from aimichat.store.models import Account, ApiKey, WebSession
from aimichat.web import key_actions, not_found, pages, support
from fixtures import app_client
from scripted_engine import ScriptedEngine

SUPPORT = "help@example.com"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One app over SQLite with a support contact, for the tests that only read pages."""
    tmp = tmp_path_factory.mktemp("recovery")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with app_client(ScriptedEngine(), db, tmp, support_contact=SUPPORT) as client:
        yield client
    db.dispose()


# -- the rules -----------------------------------------------------------------------------------


def test_the_bundled_list_holds_1000_common_passwords_of_8_or_more():
    common = accounts.common_passwords()
    assert len(common) == 1000
    assert all(len(p) >= accounts.MIN_PASSWORD and p == p.lower() for p in common)
    assert {"password", "12345678", "iloveyou", "sunshine", "password1"} <= common


@pytest.mark.parametrize("password", ["password", "Password1", "ILOVEYOU", "qwerty123", "1q2w3e4r"])
def test_common_passwords_are_refused_in_any_case(password):
    with pytest.raises(accounts.AccountError, match="one of the most common"):
        accounts.check_password_strength(password)


def test_other_passwords_pass():
    for password in (PASSWORD, "correct horse", "tangerine-kettle-41"):
        accounts.check_password_strength(password)
    with pytest.raises(accounts.AccountError, match="at least 8 characters"):
        accounts.check_password_strength("abc")


def test_the_sign_up_field_at_fault():
    assert pages.field_at_fault("not-an-email", "password") == "email", "checked in sign-up's order"
    assert pages.field_at_fault("a@example.com", "short") == "password"
    assert pages.field_at_fault("a@example.com", "sunshine") == "password"
    assert pages.field_at_fault("a@example.com", PASSWORD) is None


@pytest.mark.parametrize(
    ("method", "path", "accept", "page"),
    [
        ("GET", "/keyz", BROWSER["Accept"], True),
        ("HEAD", "/keyz", "text/html", True),
        ("GET", "/keyz", "*/*", False),  # curl
        ("GET", "/keyz", "application/json", False),
        ("POST", "/keyz", "text/html", False),
        ("GET", "/v1/chat", "text/html", False),
        ("GET", "/v1", "text/html", False),
        ("GET", "/admin/v1/accountz", "text/html", False),
        ("GET", "/api/account/keyz", "text/html", False),
        ("GET", "/admin/nope", "text/html", True),  # the admin pages are pages
    ],
)
def test_which_404s_are_pages(method, path, accept, page):
    assert not_found.wants_page(method, path, accept) is page


def test_the_support_contact_becomes_a_link(tmp_path):
    def contact(value: str | None) -> support.Contact | None:
        return support.contact(Settings(data_dir=tmp_path, support_contact=value))

    assert contact(None) is None and contact("  ") is None
    assert contact(" help@example.com ") == support.Contact("mailto:help@example.com", "help@example.com")
    assert contact("https://example.com/help") == support.Contact(
        "https://example.com/help", "https://example.com/help"
    )
    for bad in ("javascript:alert(1)", "data:text/html,hi", "help", "https://x.example/a b", 'a"@b.c'):
        with pytest.raises(ValidationError, match=r"an email address .* or an http"):
            Settings(data_dir=tmp_path, support_contact=bad)


def test_the_keys_list_puts_active_keys_first_newest_first():
    def key(id: int, revoked: bool) -> SimpleNamespace:
        return SimpleNamespace(id=id, revoked_at="then" if revoked else None)

    listed = [key(1, False), key(2, True), key(3, False), key(4, True)]
    assert [k.id for k in key_actions.in_list_order(listed)] == [3, 1, 4, 2]  # type: ignore[arg-type]


# -- sign-up and passwords on the pages ----------------------------------------------------------


def test_sign_up_refuses_a_common_password_next_to_the_field_and_makes_nothing(server):
    with Browser(server) as b:
        b.get("/signup")
        refused = b.post("/signup", {"email": "new@example.com", "password": "Sunshine"})
        assert refused.status_code == 400
        field = re.search(r'<div class="field">\s*<label for="password">.*?</div>', refused.text, re.S).group(0)
        assert 'id="password-error"' in field and "one of the most common" in field
        assert 'aria-invalid="true"' in field and 'aria-describedby="password-error password-hint"' in field
        assert refused.text.count("guessed first") == 1, "said once, at the field"
        assert 'value="new@example.com"' in refused.text, "what was typed stays"
        bad_email = b.post("/signup", {"email": "not-an-email", "password": PASSWORD})
        assert bad_email.status_code == 400 and 'id="email-error"' in bad_email.text
        b.sign_up("taken@example.com")
    with Browser(server) as other:  # a taken email gets the same answer: sign-up tells nothing about accounts
        other.get("/signup")
        taken = other.post("/signup", {"email": "taken@example.com", "password": "Sunshine"})
        assert taken.status_code == 400 and 'id="password-error"' in taken.text
    with server.db.session() as s:
        assert s.query(Account).filter(Account.email == "new@example.com").count() == 0
        assert accounts.verify_password(accounts.get_account(s, "taken@example.com"), PASSWORD), "unchanged"


def test_a_common_password_is_refused_on_the_account_page(site):
    with Browser(site) as b:
        b.sign_up("changer@example.com")
        b.get("/account")
        r = b.post("/account/password", {"current_password": PASSWORD, "new_password": "iloveyou"})
        assert r.status_code == 400 and "one of the most common" in r.text
    with Browser(site) as other:
        assert other.log_in("changer@example.com").status_code == 303, "the old password still works"


# -- aimichat accounts set-password --------------------------------------------------------------


def test_set_password_from_the_cli_signs_the_account_out_everywhere(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", server.db.url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    with Browser(server) as first, Browser(server) as second:
        first.sign_up("locked@example.com")
        second.log_in("locked@example.com")
        assert first.get("/keys").status_code == 200 and second.get("/keys").status_code == 200

        prompted = runner.invoke(
            cli, ["accounts", "set-password", "Locked@example.com"], input="new horse battery\nnew horse battery\n"
        )
        assert prompted.exit_code == 0, prompted.output
        assert "new horse battery" not in prompted.output, "the password is not echoed"
        assert "set a new password for locked@example.com; ended 2 browser sessions" in prompted.output
        for browser in (first, second):
            assert browser.get("/keys").status_code == 303, "logged out"
        with server.db.session() as s:
            assert s.query(WebSession).count() == 0
        assert first.log_in("locked@example.com", PASSWORD).status_code == 400
        assert first.log_in("locked@example.com", "new horse battery").status_code == 303

        piped = runner.invoke(
            cli, ["accounts", "set-password", "locked@example.com", "--stdin"], input="piped horse 42\n"
        )
        assert piped.exit_code == 0, piped.output
        assert "ended 1 browser session" in piped.output
    with Browser(server) as again:
        assert again.log_in("locked@example.com", "piped horse 42").status_code == 303


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["locked@example.com", "--stdin"], "password1\n", "one of the most common"),
        (["locked@example.com", "--stdin"], "short\n", "at least 8 characters"),
        (["locked@example.com", "--stdin"], "\n", "the first line of standard input is empty"),
        (["nobody@example.com", "--stdin"], "fine horse battery\n", "no account for nobody@example.com"),
        (["locked@example.com"], "one horse battery\nanother horse\n", "do not match"),
    ],
)
def test_set_password_refuses_what_sign_up_refuses(site, tmp_path, monkeypatch, args, stdin, message):
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", site.db.url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    with site.db.session() as s:
        if s.query(Account).filter(Account.email == "locked@example.com").count() == 0:
            accounts.create_account(s, "locked@example.com", PASSWORD)
            s.commit()
    result = CliRunner().invoke(cli, ["accounts", "set-password", *args], input=stdin)
    assert result.exit_code != 0 and message in result.output
    with site.db.session() as s:
        assert accounts.verify_password(accounts.get_account(s, "locked@example.com"), PASSWORD), "unchanged"


# -- the 404 page --------------------------------------------------------------------------------


def test_a_mistyped_page_address_gets_a_page_with_a_way_back(site):
    with Browser(site) as b:
        r = b.get("/keyz", headers=BROWSER)
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert '<h1 id="not-found-title">Page not found</h1>' in r.text and "<code>/keyz</code>" in r.text
        assert 'href="/login"' in r.text and '<a href="/">The start page</a>' in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert not re.search(r"<script(?![^>]*\bsrc=)|\sstyle=|\son[a-z]+=", r.text), "no inline script or style"

        b.sign_up("lost@example.com")
        mine = b.get("/usagee", headers=BROWSER)
        assert mine.status_code == 404 and "lost@example.com" in mine.text, "the header of a logged-in visitor"
        assert '<a href="/keys">Your API keys</a>' in mine.text

        slash = b.get("/keys/", headers=BROWSER)
        assert slash.status_code == 404 and 'Did you mean <a href="/keys">/keys</a>?' in slash.text


def test_api_paths_and_programs_keep_the_json_error(site):
    for path, headers in (
        ("/v1/chat/completion", BROWSER),
        ("/admin/v1/accountz", BROWSER),
        ("/api/account/keyz", BROWSER),
        ("/keyz", {"Accept": "*/*"}),
        ("/keyz", {"Accept": "application/json"}),
    ):
        r = site.http.get(path, headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    slash = site.http.get("/v1/usage/", headers=BROWSER)
    assert "Did you mean /v1/usage" in slash.json()["error"]["message"]
    assert site.http.post("/keyz", headers=BROWSER).json()["error"]["code"] == "not_found"


# -- the support contact -------------------------------------------------------------------------


def test_the_support_contact_is_on_the_plan_docs_and_error_pages(site):
    link = f'<a href="mailto:{SUPPORT}">{SUPPORT}</a>'
    with Browser(site) as b:
        assert link in b.get("/docs").text
        assert link in b.get("/nowhere", headers=BROWSER).text
        b.sign_up("helped@example.com")
        assert link in b.get("/plan").text
        missing = b.get("/keys/999999")
        assert missing.status_code == 404 and "Key not found" in missing.text and link in missing.text


def test_without_a_support_contact_no_page_invents_one(server):
    with Browser(server) as b:
        b.sign_up("alone@example.com")
        for path in ("/docs", "/plan", "/keys/999999", "/nowhere"):
            assert 'id="support"' not in b.get(path, headers=BROWSER).text, path
        assert "contact the operator of this server" in b.get("/plan").text


# -- keys ----------------------------------------------------------------------------------------


def test_revoked_keys_come_last_and_offer_no_regenerate(server):
    with Browser(server) as b:
        b.sign_up("keys@example.com")
        old_id, old = b.generate_key("old")
        newer_id, _ = b.generate_key("newer")
        b.post(f"/keys/{newer_id}/revoke", {"confirm": "yes"})
        newest_id, _ = b.generate_key("newest")
        listed = b.get("/keys").text
        order = [int(i) for i in re.findall(r'<tr class="\w+" data-key-id="(\d+)">', listed)]
        assert order == [newest_id, old_id, newer_id], "active first, newest first within each"
        rows = dict(re.findall(r'data-key-id="(\d+)">(.*?)</tr>', listed, re.S))
        assert f"/keys/{old_id}/regenerate" in rows[str(old_id)]
        assert "/regenerate" not in rows[str(newer_id)] and "/revoke" not in rows[str(newer_id)]
        page = b.get(f"/keys/{newer_id}").text
        assert "/regenerate" not in page and "A revoked key stays revoked" in page
        refused = b.post(f"/keys/{newer_id}/regenerate", {"confirm": "yes"})
        assert refused.status_code == 409 and "generate a new key" in refused.text
        assert chat(server, old).status_code == 200
    with server.db.session() as s:
        assert s.query(ApiKey).count() == 3, "the refused regenerate made no key"
