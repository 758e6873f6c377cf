"""In Chromium: "Forgot password?" on the log-in page, the link read from the mail a real SMTP server received,
a new password set on the page it opens, and a log-in with it. No console errors (CSP violations among them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mail_helpers import NEW_PASSWORD, link_in
from playwright.sync_api import expect

from conftest import OUTPUT, LiveServer, build_app, free_port, make_account, migrated, tool_missing
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
EMAIL = "forgetful@example.com"


def test_reset_link_from_the_mail_works_in_chromium(tmp_path, smtp_server):
    if not CHROMIUM.exists():
        tool_missing("Debian's chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    db = migrated(f"sqlite:///{tmp_path / 'aimichat.db'}")
    port = free_port()
    app = build_app(ScriptedEngine(), db, tmp_path, smtp_url=smtp_server.url, public_url=f"http://127.0.0.1:{port}")
    with LiveServer(app, port=port) as server, sync_playwright() as p:
        make_account(db, EMAIL)
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_context(base_url=server.url).new_page()
        errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto("/login")
        page.get_by_role("link", name="Forgot password?").click()
        page.get_by_label("Email").fill(EMAIL)
        page.get_by_role("button", name="Email me a link").click()
        expect(page.get_by_role("status")).to_contain_text("If an account exists for that address")
        OUTPUT.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(OUTPUT / "web-password-forgot.png"), full_page=True)

        [mail] = smtp_server.wait(1)  # sent after the response, by the live server
        page.goto(link_in(mail, "/password/reset"))
        expect(page.get_by_text(EMAIL)).to_be_visible()
        page.get_by_label("New password").fill(NEW_PASSWORD)
        page.get_by_role("button", name="Set the new password").click()
        expect(page.get_by_role("status")).to_contain_text("Your password is changed")
        page.screenshot(path=str(OUTPUT / "web-password-reset.png"), full_page=True)

        page.locator("main").get_by_role("link", name="Log in").click()
        page.get_by_label("Email").fill(EMAIL)
        page.get_by_label("Password").fill(NEW_PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/keys")
        expect(page.get_by_role("heading", name="API keys")).to_be_visible()
        browser.close()
        assert errors == [], "no console errors or CSP violations"
    db.dispose()
