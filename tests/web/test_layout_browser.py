"""The site's layout in Chromium: on a 390 px phone the header is one row with a Menu button (a disclosure:
aria-expanded, Escape, keyboard) instead of a block of links; without JavaScript the links stay in view; the
docs page puts its title before the contents and OpenAI's SDKs first, and its SDK examples run as printed.

The screenshots of the README and docs/web.md come from ``test_screenshots``: it writes them to
``test-output/screenshots`` on every run, and to the docs with
``AIMICHAT_SCREENSHOTS_DIR=docs/screenshots .venv/bin/pytest tests/web/test_layout_browser.py -k screenshots``.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from browser_kit import DESKTOP, NODE_MODULES, PHONE, Watched, browser_fixture, live_server, log_in
from playwright.sync_api import expect
from web_helpers import PASSWORD, chat

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.store.db import Database
from conftest import OUTPUT, MutableClock, make_key, serve_app, tool_missing
from scripted_engine import REPLY, ScriptedEngine

ADMIN = "admin@example.com"
LINKS = ["API keys", "Usage", "Plan", "Playground", "Docs", "Account", "Admin"]
# Words the docs page used to carry that say nothing about the API.
FILLER = ["Integrate powerful AI", "Secure, scalable", "in minutes", "Our team is here", "popular programming"]


browser = browser_fixture()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory, "layout") as live:
        with live.db.session() as s:
            accounts.create_account(s, ADMIN, PASSWORD, is_admin=True)
            s.commit()
        yield live


def new_page(browser, server, viewport, **options):
    """A page in a context of its own; the caller closes ``page.context``."""
    ctx = browser.new_context(base_url=server.url, viewport=viewport, **options)
    return Watched(ctx.new_page())


@pytest.fixture
def phone(browser, server):
    """A logged-in admin's page on a 390 px phone."""
    watched = new_page(browser, server, PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    log_in(watched.page, ADMIN)
    yield watched.page
    watched.page.context.close()
    assert watched.errors == [], "no console errors or CSP violations"


def main_nav(page):
    return page.get_by_role("navigation", name="Main")


def header_height(page) -> float:
    return page.locator("header.top").bounding_box()["height"]


def scroll_width(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


# -- the header ----------------------------------------------------------------------------------


@pytest.mark.browser
def test_on_a_phone_the_links_fold_behind_a_menu_button(phone):
    toggle = phone.get_by_role("button", name="Menu")
    expect(toggle).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    assert phone.locator(f"#{toggle.get_attribute('aria-controls')}").count() == 1, "it names what it opens"
    for name in LINKS:
        expect(main_nav(phone).get_by_role("link", name=name, exact=True)).to_be_hidden()
    expect(phone.get_by_role("button", name="Log out")).to_be_hidden()
    assert header_height(phone) < 0.1 * PHONE["height"], "one row, not a fifth of the screen"

    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    for name in LINKS:
        expect(main_nav(phone).get_by_role("link", name=name, exact=True)).to_be_visible()
    expect(phone.get_by_role("button", name="Log out")).to_be_visible()
    expect(phone.get_by_text(ADMIN)).to_be_visible()
    assert scroll_width(phone) <= PHONE["width"]

    main_nav(phone).get_by_role("link", name="Usage", exact=True).click()
    phone.wait_for_url("**/usage")
    expect(phone.get_by_role("button", name="Menu")).to_have_attribute("aria-expanded", "false")
    phone.get_by_role("button", name="Menu").click()
    expect(main_nav(phone).get_by_role("link", name="Usage", exact=True)).to_have_attribute("aria-current", "page")


@pytest.mark.browser
def test_the_menu_works_from_the_keyboard(phone):
    phone.goto("/plan")  # a page that focuses no field on arrival: Tab starts at the top
    toggle = phone.get_by_role("button", name="Menu")
    for _ in range(5):  # the skip link and the brand come first
        phone.keyboard.press("Tab")
        if phone.evaluate("document.activeElement.classList.contains('menu-toggle')"):
            break
    expect(toggle).to_be_focused()
    phone.keyboard.press("Enter")
    expect(toggle).to_have_attribute("aria-expanded", "true")
    phone.keyboard.press("Tab")
    expect(main_nav(phone).get_by_role("link", name="API keys")).to_be_focused()
    assert phone.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none", "focus is visible"
    phone.keyboard.press("Escape")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(toggle).to_be_focused()
    phone.keyboard.press("Space")
    expect(toggle).to_have_attribute("aria-expanded", "true")
    # Focus moving on past the header folds the menu, so it never covers what the reader tabbed to.
    phone.locator("footer a").first.focus()
    expect(toggle).to_have_attribute("aria-expanded", "false")


@pytest.mark.browser
def test_on_a_wide_screen_the_links_stay_in_the_bar(browser, server):
    watched = new_page(browser, server, DESKTOP)
    page = watched.page
    log_in(page, ADMIN)
    expect(page.get_by_role("button", name="Menu")).to_be_hidden()
    for name in LINKS:
        expect(main_nav(page).get_by_role("link", name=name, exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()
    assert header_height(page) < 70, "brand, links and log-out on one row"
    page.context.close()
    assert watched.errors == []


@pytest.mark.browser
def test_logged_out_on_a_phone_the_three_links_fit_the_bar(browser, server):
    watched = new_page(browser, server, PHONE, is_mobile=True, has_touch=True)
    page = watched.page
    for path in ("/", "/login", "/docs"):
        page.goto(path)
        assert page.get_by_role("button", name="Menu").count() == 0
        for name in ("Docs", "Log in", "Sign up"):
            expect(main_nav(page).get_by_role("link", name=name, exact=True)).to_be_visible()
        assert header_height(page) < 0.1 * PHONE["height"], path
        assert scroll_width(page) <= PHONE["width"], path
    page.context.close()
    assert watched.errors == []


@pytest.mark.browser
def test_without_javascript_a_phone_shows_the_links(browser, server):
    watched = new_page(browser, server, PHONE, java_script_enabled=False, is_mobile=True)
    page = watched.page
    log_in(page, ADMIN)
    expect(page.get_by_role("button", name="Menu")).to_be_hidden()  # it would do nothing without script
    for name in LINKS:
        expect(main_nav(page).get_by_role("link", name=name, exact=True)).to_be_visible()
    assert scroll_width(page) <= PHONE["width"]
    main_nav(page).get_by_role("link", name="Plan", exact=True).click()
    page.wait_for_url("**/plan")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/login")
    page.context.close()


# -- the docs page -------------------------------------------------------------------------------


@pytest.mark.browser
def test_docs_on_a_phone_title_first_then_contents_then_the_sdks(browser, server):
    watched = new_page(browser, server, PHONE, is_mobile=True, has_touch=True)
    page = watched.page
    page.goto("/docs")
    title = page.get_by_role("heading", level=1, name="API documentation")
    contents = page.get_by_role("navigation", name="On this page")
    expect(title).to_be_in_viewport()
    assert title.bounding_box()["y"] < contents.bounding_box()["y"], "the title comes before the contents"
    expect(contents.get_by_role("link").first).to_have_text("OpenAI SDKs")
    assert page.locator("article > section").first.get_attribute("id") == "openai-sdk"
    text = page.locator("main").inner_text()
    for words in FILLER:
        assert words not in text, words
    assert scroll_width(page) <= PHONE["width"]
    contents.get_by_role("link", name="Errors").click()
    expect(page.get_by_role("heading", name="Errors")).to_be_in_viewport()
    page.context.close()
    assert watched.errors == []


def sdk_examples(server) -> dict[str, str]:
    """The OpenAI SDK examples of the docs page, as a reader copies them."""
    page = httpx.get(f"{server.url}/docs").text
    found = re.findall(r'<code id="code-(openai[-\w]*)">(.*?)</code>', page, re.S)
    return {name: html.unescape(code) for name, code in found}


def test_the_docs_pages_python_sdk_example_runs_as_printed(server, tmp_path):
    key = make_key(server.db, ADMIN, "docs python")
    code = sdk_examples(server)["openai"]
    assert f'base_url="{server.url}/v1"' in code
    (tmp_path / "example.py").write_text(code.replace("YOUR_API_KEY", key))
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == REPLY


def test_the_docs_pages_node_sdk_example_runs_as_printed(server, tmp_path):
    if not (NODE_MODULES / "openai").exists():
        tool_missing("the openai npm package is not installed (make browser)")
    key = make_key(server.db, ADMIN, "docs node")
    code = sdk_examples(server)["openai-node"]
    assert f"baseURL: '{server.url}/v1'" in code
    (tmp_path / "node_modules").symlink_to(NODE_MODULES)  # `import 'openai'` resolves next to the file
    (tmp_path / "example.mjs").write_text(code.replace("YOUR_API_KEY", key))
    done = subprocess.run(["node", "example.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == REPLY


# -- screenshots ---------------------------------------------------------------------------------


def top_part(bottom: float) -> dict[str, float]:
    """A 1100 px wide clip from the top of the page down to a little below ``bottom``."""
    return {"x": 0, "y": 0, "width": 1100, "height": bottom + 80}


@pytest.mark.browser
def test_screenshots(browser, tmp_path):
    """The README's screenshots: keys right after generating one, usage over three weeks, the playground, and
    a phone with the menu open. Written to test-output/screenshots, or to AIMICHAT_SCREENSHOTS_DIR."""
    out = Path(os.environ.get("AIMICHAT_SCREENSHOTS_DIR", OUTPUT / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    # Three weeks ending an hour ago: the keys' creation times (the database's own clock) read true beside them.
    clock = MutableClock(dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=20, hours=1))
    db = Database(f"sqlite:///{tmp_path / 'shots.db'}")
    with serve_app(ScriptedEngine(), db, tmp_path, clock=clock) as live:
        with db.session() as s:
            accounts.set_tier(s, "free", daily_credits=100, monthly_credits=2000)
            account = accounts.create_account(s, "ada@example.com", PASSWORD)
            laptop = keys.create_key(s, account, "laptop").secret
            server_key = keys.create_key(s, account, "server").secret
            s.commit()
        for day in range(21):  # three weeks of uneven use, so the chart has a shape
            clock.advance(days=1 if day else 0)
            for i in range((day * 7) % 11 + 2):
                assert chat(live, laptop if i % 3 else server_key).status_code == 200

        watched = new_page(browser, live, {"width": 1100, "height": 800}, color_scheme="light")
        page = watched.page
        log_in(page, "ada@example.com")
        page.get_by_label("Key name").fill("notebook")
        page.get_by_role("button", name="Generate key").click()
        expect(page.locator("#new-key")).to_be_visible()
        page.screenshot(path=str(out / "keys.png"), full_page=True)

        page.goto("/usage")
        expect(page.locator("svg.bars rect.bar")).to_have_count(30)
        chart = page.locator("svg.bars").bounding_box()
        page.screenshot(path=str(out / "usage.png"), full_page=True, clip=top_part(chart["y"] + chart["height"]))

        page.goto("/playground")
        page.get_by_label("Message").fill("What is the capital of France?")
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".msg.assistant:not(.pending) .text")).to_have_text(REPLY)
        page.screenshot(path=str(out / "playground.png"), full_page=True)
        page.context.close()

        mobile = new_page(browser, live, PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
        log_in(mobile.page, "ada@example.com")
        mobile.page.goto("/usage")
        mobile.page.get_by_role("button", name="Menu").click()
        expect(main_nav(mobile.page).get_by_role("link", name="Usage")).to_be_visible()
        mobile.page.screenshot(path=str(out / "phone-menu.png"))
        mobile.page.context.close()
    db.dispose()
    assert watched.errors == [] and mobile.errors == []
    for name in ("keys", "usage", "playground", "phone-menu"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
