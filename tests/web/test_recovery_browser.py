"""Recovery paths in Debian's Chromium, driven by Playwright: a mistyped page address gets the site's 404
page with a way back, and sign-up refuses a common password with the error next to the field. Console
errors (CSP violations among them) fail the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from aimichat.store.db import Database
from conftest import OUTPUT, serve_app, tool_missing
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovery-browser")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with serve_app(ScriptedEngine(), db, tmp, support_contact="help@example.com") as live:
        yield live
    db.dispose()


@pytest.fixture
def page(server):
    if not CHROMIUM.exists():
        tool_missing("Debian's chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        context = chromium.new_context(base_url=server.url, viewport={"width": 1200, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        # The 404 and 400 documents themselves are logged as failed loads: they are what is tested.
        expected = "Failed to load resource: the server responded with a status of 4"
        page.on("console", lambda m: m.type == "error" and not m.text.startswith(expected) and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        chromium.close()
    assert errors == [], "no console errors or CSP violations"


def test_a_mistyped_address_gets_the_404_page_with_a_way_back(page):
    answer = page.goto("/plann")
    assert answer is not None and answer.status == 404
    expect(page.get_by_role("heading", name="Page not found")).to_be_visible()
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Log in")).to_be_visible()
    expect(page.get_by_role("link", name="help@example.com")).to_have_attribute("href", "mailto:help@example.com")
    assert page.evaluate("getComputedStyle(document.querySelector('.card')).borderRadius") != "0px", "styled"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-404.png"), full_page=True)
    page.get_by_role("link", name="The start page").click()
    page.wait_for_url("**/")
    expect(page.get_by_role("button", name="Sign up")).to_be_visible()


def test_sign_up_refuses_a_common_password_next_to_the_field(page):
    page.goto("/signup")
    page.get_by_label("Email").fill("newcomer@example.com")
    page.get_by_label("Password").fill("Sunshine")
    page.get_by_role("button", name="Sign up").click()
    error = page.locator("#password-error")
    expect(error).to_contain_text("one of the most common")
    password = page.get_by_label("Password")
    expect(password).to_have_attribute("aria-invalid", "true")
    expect(password).to_be_focused()
    # Next to the field: inside the password field's own block, right under the input.
    assert page.evaluate(
        "document.querySelector('#password-error').closest('.field').contains(document.querySelector('#password'))"
    )
    field, message = password.bounding_box(), error.bounding_box()
    assert field and message and 0 <= message["y"] - (field["y"] + field["height"]) < 40
    expect(page.get_by_label("Email")).to_have_value("newcomer@example.com")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-signup-common-password.png"), full_page=True)
    password.fill("tangerine-kettle-41")
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_url("**/login?signed_up=1")
