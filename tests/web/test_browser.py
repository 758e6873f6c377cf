"""The account pages in Debian's Chromium, driven by Playwright: the newcomer's whole path from sign-up
to a working key, the playground, the docs, keyboard-only use, 360 px screens and no JavaScript.

One server (a real socket, answered by the scripted engine) and one browser per module; each test uses
its own account. Screenshots of every page go to the test output folder (``test-output/web-*.png``).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from browser_kit import CHROMIUM, Watched, browser_fixture, live_server, log_in
from playwright.sync_api import expect
from sqlalchemy import select
from web_helpers import PASSWORD, chat

from aimichat.accounts import service as accounts
from aimichat.registry import service as registry
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import OUTPUT, make_account, serve_app, settled, tool_missing
from scripted_engine import ScriptedEngine

pytestmark = pytest.mark.browser

PAGES = ["/keys", "/usage", "/plan", "/playground", "/docs", "/account"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A reply that arrives word by word, as a model's does, for the playground to stream.
    with live_server(tmp_path_factory, "web", ScriptedEngine(token_delay=0.01)) as live:
        yield live


browser = browser_fixture()


@pytest.fixture
def context(browser, server):
    ctx = browser.new_context(base_url=server.url, viewport={"width": 1200, "height": 900})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context):
    watched = Watched(context.new_page())
    yield watched.page
    assert watched.errors == [], "no console errors or CSP violations"


def shot(page, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"web-{name}.png"), full_page=True)


def key_row(page, name: str):
    return page.locator("table.keys tbody tr").filter(has=page.get_by_role("rowheader", name=name, exact=True))


# -- the newcomer's path -------------------------------------------------------------------------


def test_sign_up_generate_use_revoke_regenerate(page, server):
    page.goto("/")
    shot(page, "landing")
    page.get_by_label("Email").fill("newcomer@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    # A sign-up logs nobody in (it must answer alike for a taken email): the log-in page says what to do.
    page.wait_for_url("**/login?signed_up=1")
    expect(page.get_by_role("status")).to_contain_text("Log in with the email and password you chose")
    shot(page, "signed-up")
    page.get_by_label("Email").fill("newcomer@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/keys")
    shot(page, "keys-empty")

    page.get_by_label("Key name").fill("laptop")
    page.get_by_role("button", name="Generate key").click()
    key = page.locator("#new-key").inner_text()
    assert re.fullmatch(r"aimichat_[0-9A-Za-z]{38}", key)
    assert page.get_by_text("It will not be shown again").is_visible()
    page.get_by_role("button", name="Copy key").click()
    assert page.evaluate("navigator.clipboard.readText()") == key
    shot(page, "key-created")

    # The newcomer copies the curl example shown with the key and runs it: it works as printed.
    page.get_by_role("button", name="Copy code").first.click()
    example = page.evaluate("navigator.clipboard.readText()")
    assert example.startswith(f"curl {server.url}/v1/chat/completions") and key in example
    done = subprocess.run(["bash", "-c", example], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["choices"][0]["message"]["content"]
    settled(server)  # its settlement, written once curl had the answer, before /usage reads the ledger

    page.goto("/usage")
    assert page.locator("#day-used").inner_text() == "1"
    assert "1 of 100 credits used" in page.locator("#today-title + p").inner_text().replace("\n", " ")
    row = page.locator("tr", has=page.get_by_role("rowheader", name=re.compile("^laptop")))
    assert row.locator("td.credits").inner_text() == "1"
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", row.locator("td.last-used time").inner_text())
    assert page.locator("svg.bars rect.bar").count() == 30
    assert page.locator("time[data-local] + .local-time").count() >= 1, "reset time in local time too"
    shot(page, "usage")

    page.goto("/keys")
    assert "Never" not in key_row(page, "laptop").locator(".last-used").inner_text()
    page.once("dialog", lambda d: d.accept())
    key_row(page, "laptop").get_by_role("button", name="Revoke").click()
    page.wait_for_url("**/keys?revoked=*")
    assert key_row(page, "laptop").locator(".badge").inner_text() == "Revoked"
    assert chat(server, key).status_code == 401

    # A revoked key stays revoked: no Regenerate on it; a new key takes its place.
    assert key_row(page, "laptop").get_by_role("button", name="Regenerate").count() == 0
    page.get_by_label("Key name").fill("laptop")
    page.get_by_role("button", name="Generate key").click()
    new_key = page.locator("#new-key").inner_text()
    assert new_key != key and "Your new key “laptop”" in page.locator("#new-key-title").inner_text()
    assert chat(server, new_key).status_code == 200
    assert chat(server, key).status_code == 401
    shot(page, "key-regenerated")
    page.goto("/keys")
    assert key_row(page, "laptop").count() == 2, "the revoked key stays listed"
    badges = key_row(page, "laptop").locator(".badge").all_inner_texts()
    assert badges == ["Active", "Revoked"], "active keys first"
    assert new_key not in page.content(), "never shown again"
    shot(page, "keys")


def test_dismissing_the_confirmation_keeps_the_key(page, server):
    make_account(server.db, "careful@example.com", password=PASSWORD)
    log_in(page, "careful@example.com")
    page.get_by_label("Key name").fill("keep me")
    page.get_by_role("button", name="Generate key").click()
    key = page.locator("#new-key").inner_text()
    page.goto("/keys")
    page.once("dialog", lambda d: d.dismiss())
    key_row(page, "keep me").get_by_role("button", name="Revoke").click()
    page.wait_for_timeout(300)
    assert key_row(page, "keep me").locator(".badge").inner_text() == "Active"
    assert chat(server, key).status_code == 200


def test_limits_reload_edit_and_regenerate_with_grace(page, server):
    """A key with a daily cap made under "Limits"; reloading the page that showed it makes no second key and
    shows it no more; its page edits the limits; regenerating with a 1 h grace leaves both secrets working."""
    make_account(server.db, "limited@example.com", password=PASSWORD)
    log_in(page, "limited@example.com")
    page.get_by_label("Key name").fill("capped")
    page.locator("summary", has_text="Limits").click()
    page.get_by_label("Daily cap").fill("5")
    page.get_by_role("button", name="Generate key").click()
    page.wait_for_url("**/keys?shown=*")
    key = page.locator("#new-key").inner_text()
    assert "aimichat_" not in page.url
    page.reload()
    expect(page.locator("#key-gone")).to_be_visible()
    assert page.locator("#new-key").count() == 0 and key not in page.content()
    assert key_row(page, "capped").count() == 1, "the reload made no second key"
    assert "5 credits/day" in key_row(page, "capped").locator(".limits-summary").inner_text()
    assert chat(server, key).status_code == 200

    key_row(page, "capped").get_by_role("link", name="capped").click()
    page.wait_for_url(re.compile(r".*/keys/\d+$"))
    assert page.locator("#use-key-day .used").inner_text() == "1"
    assert page.locator("#use-key-day .limit").inner_text() == "5"
    page.get_by_label("Daily cap").fill("8")
    page.get_by_label("Requests per minute").fill("30")
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url("**?saved=1")
    expect(page.locator("#saved")).to_be_visible()
    assert page.locator("#use-key-day .limit").inner_text() == "8"
    assert page.locator("#use-key-rpm .limit").inner_text() == "30"
    shot(page, "key-page")

    page.get_by_label("Old key stops working").select_option(label="In 1 hour")
    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.accept()))
    page.get_by_role("button", name="Regenerate").click()
    page.wait_for_url("**/keys?shown=*")
    assert asked and "keeps working for 1 hour" in asked[0]
    new_key = page.locator("#new-key").inner_text()
    assert new_key != key and "keeps working until" in page.locator("#old-key-fate").inner_text()
    assert chat(server, new_key).status_code == 200 and chat(server, key).status_code == 200
    shot(page, "key-rotated")
    page.goto("/keys")
    assert key_row(page, "capped").count() == 1, "the same key, a new secret"


# -- playground and docs -------------------------------------------------------------------------


def test_playground_streams_and_shows_remaining_credits(page, server):
    make_account(server.db, "talker@example.com", password=PASSWORD)
    log_in(page, "talker@example.com")
    page.goto("/playground")
    assert page.locator("#remaining").inner_text() == "100"
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#remaining")).to_have_text("99", timeout=120_000)  # (wait_for_function would need eval: CSP)
    page.wait_for_selector(".msg.assistant:not(.pending)")
    assert page.locator(".msg.assistant .text").inner_text().strip()
    assert page.locator(".msg.user .text").inner_text() == "What is the capital of France?"
    page.get_by_label("Message").fill("Thanks!")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#remaining")).to_have_text("98", timeout=120_000)
    assert page.locator(".msg").count() == 4
    shot(page, "playground")


def test_playground_answers_with_the_model_picked(browser, tmp_path):
    """A second model in the registry: picked in the playground, it answers, and the reply names it."""
    if not CHROMIUM.exists():
        tool_missing("Debian's chromium is not installed (make browser)")

    def factory(spec, threads):
        return ScriptedEngine(f"This is {spec.name} speaking.", model_id=spec.name, token_delay=0.01)

    db = Database(f"sqlite:///{tmp_path / 'models.db'}")
    with serve_app(ScriptedEngine(token_delay=0.01), db, tmp_path, engine_factory=factory) as live:
        make_account(db, "picker@example.com", password=PASSWORD)
        with db.session() as s:
            registry.add_embedded(s, "second")
            s.commit()
        ctx = browser.new_context(base_url=live.url, viewport={"width": 1200, "height": 900})
        watched = Watched(ctx.new_page())
        page = watched.page
        log_in(page, "picker@example.com")
        page.goto("/playground")
        picker = page.get_by_label("Model")
        assert picker.input_value() == "aimichat-1", "the default model comes first"
        picker.select_option("second")
        page.get_by_label("Message").fill("Who are you?")
        page.get_by_label("Message").press("Enter")
        reply = page.locator(".msg.assistant")
        expect(reply.locator(".text")).to_have_text("This is second speaking.", timeout=60_000)
        expect(reply.locator(".who")).to_have_text("second")
        expect(page.locator("#remaining")).to_have_text("99")
        shot(page, "playground-models")
        ctx.close()
        with db.session() as s:
            assert s.scalars(select(UsageEvent.model)).all() == ["second"]
    db.dispose()
    assert watched.errors == [], "no console errors or CSP violations"


def test_docs_page(page, server):
    page.goto("/docs")
    assert page.get_by_role("heading", name="API documentation").is_visible()
    for label in ("Python", "Node.js", "curl"):
        block = page.locator(".code", has=page.locator(".code-label", has_text=re.compile(f"^{re.escape(label)}$")))
        text = block.locator("code").inner_text()
        assert f"{server.url}/v1/chat/completions" in text and "YOUR_API_KEY" in text
    assert page.locator("button.copy:visible").count() >= 5
    assert page.get_by_text("Never commit API keys to version control").is_visible()
    shot(page, "docs")


# -- reach: keyboard, narrow screens, no JavaScript ----------------------------------------------


def test_keyboard_alone(page, server):
    page.goto("/signup")
    expect(page.locator("#email")).to_be_focused()  # the page focuses it once loaded: typing before would be lost
    page.keyboard.type("keys@example.com")  # the Email field has focus on arrival
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url("**/login?signed_up=1")
    expect(page.locator("#email")).to_be_focused()  # the URL commits before the page has focused the field
    page.keyboard.type("keys@example.com")  # and on the log-in page it has too
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url("**/keys")
    expect(page.locator("input[name=name]").first).to_be_focused()
    page.keyboard.type("keyboard")  # Key name has focus when there are no keys yet
    page.keyboard.press("Enter")
    expect(page.locator("#new-key")).to_be_visible()
    # From the top of the page, Tab reaches the first Revoke button, and Enter plus the dialog revokes.
    page.goto("/keys")
    page.once("dialog", lambda d: d.accept())
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent.trim()") == "Revoke":
            break
    else:
        pytest.fail("Revoke is not reachable with Tab")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none", "focus is visible"
    page.keyboard.press("Enter")
    page.wait_for_url("**/keys?revoked=*")


def test_pages_fit_a_360px_screen(browser, server):
    with server.db.session() as s:
        accounts.create_account(s, "narrow@example.com", PASSWORD, is_admin=True)
        s.commit()
    ctx = browser.new_context(
        base_url=server.url,
        viewport={"width": 360, "height": 740},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    watched = Watched(ctx.new_page())
    page = watched.page
    page.goto("/login")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    shot(page, "360-login")
    log_in(page, "narrow@example.com")
    page.get_by_label("Key name").fill("phone")
    page.get_by_role("button", name="Generate key").click()
    for path in ["/keys?fresh", *PAGES, "/admin", "/admin/models"]:
        page.goto(path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360, f"{path} scrolls sideways ({width}px)"
        shot(page, "360-" + path.strip("/").replace("?", "-").replace("/", "-"))
    ctx.close()
    assert watched.errors == []


def test_without_javascript(browser, server):
    make_account(server.db, "nojs@example.com", password=PASSWORD)
    ctx = browser.new_context(base_url=server.url, java_script_enabled=False)
    page = ctx.new_page()
    log_in(page, "nojs@example.com")
    page.get_by_label("Key name").fill("plain form")
    page.get_by_role("button", name="Generate key").click()
    key = page.locator("#new-key").inner_text()
    assert not page.locator("button[data-copy]").first.is_visible(), "copy buttons need script, so they stay hidden"
    page.goto("/keys")
    key_row(page, "plain form").get_by_role("button", name="Revoke").click()
    assert "Revoke the key “plain form”?" in page.locator("h1").inner_text()
    shot(page, "revoke-confirm")
    page.get_by_role("button", name="Revoke").click()
    page.wait_for_url("**/keys?revoked=*")
    assert chat(server, key).status_code == 401
    page.goto("/playground")
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    assert page.locator(".msg.assistant").count() == 1 and page.locator("#remaining").inner_text() == "99"
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/login")
    ctx.close()


def test_admin_pages(page, server):
    with server.db.session() as s:
        accounts.set_tier(s, "pro", daily_credits=10_000, monthly_credits=200_000)
        accounts.create_account(s, "boss@example.com", PASSWORD, is_admin=True)
        accounts.create_account(s, "member@example.com", PASSWORD)
        s.commit()
    log_in(page, "boss@example.com")
    page.get_by_role("link", name="Admin").click()
    row = page.locator("tr", has=page.get_by_role("rowheader", name="member@example.com"))
    row.get_by_label("Tier").select_option("pro")
    row.get_by_role("button", name="Change tier").click()
    page.wait_for_url("**/admin?updated=*")
    assert "tier pro" in page.locator(".alert.success").inner_text()
    row = page.locator("tr", has=page.get_by_role("rowheader", name="member@example.com"))
    row.get_by_role("button", name="Disable").click()
    page.get_by_role("button", name="Disable account").click()  # the confirmation step
    row = page.locator("tr", has=page.get_by_role("rowheader", name="member@example.com"))
    assert row.locator(".badge").last.inner_text() == "Disabled"
    shot(page, "admin")
    row.get_by_role("button", name="Enable").click()
    with server.db.session() as s:
        member = accounts.get_account(s, "member@example.com")
        assert member.tier.name == "pro" and not member.disabled
