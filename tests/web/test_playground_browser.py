"""The playground in Debian's Chromium, driven by Playwright, at 1280 px and 390 px: Markdown replies that
cannot run script, Copy on code blocks, Stop (and what the ledger charged for a stopped reply), the settings
as the engine receives them, "View code" (run as printed), the conversation kept across reloads, New chat,
and a view that follows a streaming reply unless the person scrolled up.

One server per module (a real socket, answered by a scripted engine whose reply each test sets); each test
logs in with its own account. Console errors (CSP violations among them) fail a test.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from browser_kit import axe_violations, browser_fixture, live_server, require_axe
from playwright.sync_api import expect
from sqlalchemy import select
from web_helpers import PASSWORD

from aimichat.accounts import service as accounts
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import OUTPUT, make_account, make_key
from scripted_engine import REPLY, endless

pytestmark = pytest.mark.browser

WIDTHS = {1280: 900, 390: 844}  # a laptop and a phone: viewport width -> height
SLOW = 60_000  # ms: how long a streaming reply may take under a loaded machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory, "playground-browser") as live:
        yield live


browser = browser_fixture()


@pytest.fixture
def engine(server):
    """The scripted engine behind the default model; each test sets its reply, and gets the default back."""
    engine = server.engine
    yield engine
    engine.reply, engine.token_delay = REPLY, 0.0


@pytest.fixture(params=sorted(WIDTHS, reverse=True), ids=lambda w: f"{w}px")
def width(request):
    return request.param


@pytest.fixture
def context(browser, server, width):
    ctx = browser.new_context(base_url=server.url, viewport={"width": width, "height": WIDTHS[width]})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    yield ctx
    ctx.close()


@pytest.fixture
def errors() -> list[str]:
    """The page's console errors and script exceptions; a test may take out the ones it provokes."""
    return []


@pytest.fixture
def page(context, errors):
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    assert errors == [], "no console errors or CSP violations"


def enter(page, server, name: str, width: int, **tier) -> str:
    """A new account (``tier``: make_account's limits), logged in, on the playground; its email."""
    email = f"{name}-{width}@example.com"
    make_account(server.db, email, password=PASSWORD, **tier)
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/keys")
    page.goto("/playground")
    return email


def send(page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def finished(page, count: int = 1):
    """The ``count``-th reply, once it has finished streaming."""
    replies = page.locator(".msg.assistant:not(.pending)")
    expect(replies).to_have_count(count, timeout=SLOW)
    return replies.nth(count - 1)


def fits(page, width: int) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= width, "nothing scrolls sideways"


def shot(page, name: str, width: int) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"web-playground-{name}-{width}.png"), full_page=True)


def words(*tokens: str):
    """A reply of exactly these tokens (the scripted engine puts a space before each one but the first),
    so a reply can hold the newlines Markdown needs."""
    return lambda messages: list(tokens)


def settings(page, system: str | None = None, temperature: str | None = None, max_tokens: str | None = None):
    panel = page.locator("details#settings")
    if panel.get_attribute("open") is None:
        panel.locator("summary").click()
    for label, value in (("System prompt", system), ("Temperature", temperature), ("Max tokens", max_tokens)):
        if value is not None:
            page.get_by_label(label, exact=True).fill(value)


# -- Markdown, safely ------------------------------------------------------------------------------

CODE = "print('hello')\nx = 1  # " + "a long line " * 20
HOSTILE = words(
    "Here",
    "is",
    "**bold**",
    f"code:\n\n```python\n{CODE}\n```\n\n<script>window.__pwned = 'script'</script>\n\n<img",
    "src=x",
    "onerror=\"window.__pwned = 'img'\">",
    "and\n\n[a",
    "link](javascript:window.__pwned='link')",
    "next",
    "to",
    "[a",
    "safe",
    "one](https://example.com/).",
)


def _safe(reply, page) -> None:
    for tag in ("script", "img", "[onerror]", "a[href^='javascript']", "[style]"):
        expect(reply.locator(tag)).to_have_count(0)
    assert page.evaluate("window.__pwned") is None, "nothing in the reply ran"


def test_markdown_is_rendered_and_script_never_runs(page, server, engine, width):
    engine.reply, engine.token_delay = HOSTILE, 0.02
    enter(page, server, "markdown", width)
    send(page, "Show me some code")
    reply = finished(page)
    expect(reply.locator(".text strong")).to_have_text("bold")
    code = reply.locator("pre code")
    expect(code).to_have_class("language-python")
    assert code.inner_text().rstrip("\n") == CODE
    # The payloads are shown as the text they are, and none of them is an element or runs.
    expect(reply.locator(".text")).to_contain_text("<script>window.__pwned = 'script'</script>")
    expect(reply.locator(".text")).to_contain_text("onerror=\"window.__pwned = 'img'\">")
    _safe(reply, page)
    reply.get_by_text("a link", exact=True).click()  # its javascript: address was taken away
    assert page.evaluate("window.__pwned") is None
    safe = reply.get_by_role("link", name="a safe one")
    expect(safe).to_have_attribute("href", "https://example.com/")
    expect(safe).to_have_attribute("rel", re.compile("noopener"))
    fits(page, width)  # the long code line scrolls inside its block

    reply.get_by_role("button", name="Copy code").click()
    expect(reply.get_by_role("button", name="Copy code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()").rstrip("\n") == CODE
    shot(page, "markdown", width)

    page.reload()  # rendered again from what was kept: still harmless
    reply = finished(page)
    expect(reply.locator("pre code")).to_have_class("language-python")
    _safe(reply, page)


# -- Stop ------------------------------------------------------------------------------------------


def _settled(db: Database, email: str, count: int) -> list[UsageEvent]:
    """The account's ledger rows once ``count`` of them are settled (a hang-up settles when the server
    notices it, a moment after the browser stopped reading)."""
    deadline = time.monotonic() + 30
    while True:
        with db.session() as s:
            rows = list(
                s.scalars(
                    select(UsageEvent).where(UsageEvent.account_id == _account_id(db, email)).order_by(UsageEvent.id)
                )
            )
        if sum(r.status != "reserved" for r in rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"the ledger was not settled: {[r.status for r in rows]}"
        time.sleep(0.05)


def _account_id(db: Database, email: str) -> int:
    with db.session() as s:
        return accounts.get_account(s, email).id


def test_stop_keeps_the_partial_answer_and_charges_only_what_was_streamed(page, server, engine, width):
    engine.reply, engine.token_delay = endless(), 0.03  # it would go on to max_tokens (512) if not stopped
    # One credit per token, so the ledger's charge counts the tokens it billed.
    email = enter(page, server, "stop", width, daily=100_000, cost_rule="per_token", per_1k=1000)
    before = len(engine.generations)
    send(page, "Count for me")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    pending = page.locator(".msg.assistant.pending .text")
    expect(pending).to_have_text(re.compile(r"^(\S+\s+){12}"), timeout=SLOW)  # a dozen words in
    stop.click()
    reply = finished(page)
    expect(stop).to_be_hidden()
    expect(reply.locator(".stopped-note")).to_contain_text("Stopped")
    expect(page.get_by_label("Message")).to_be_focused()
    shown = len(reply.locator(".text").inner_text().split())
    assert shown >= 12

    expect(page.locator("#remaining")).not_to_have_text("100,000")  # asked again after the Stop
    (row,) = _settled(server.db, email, 1)
    (generation,) = engine.generations[before:]
    assert generation.outcome == "closed", "the engine stopped generating"
    assert row.status == "charged"
    assert row.credits == row.prompt_tokens + row.completion_tokens, "one credit a token"
    assert row.credits < row.reserved_credits, "the unsent part of the reservation came back"
    assert shown <= row.completion_tokens <= generation.tokens < 512, "charged no more than was streamed"
    shot(page, "stopped", width)

    # The stopped answer stays in the conversation (and is sent with the next turn); credits add up.
    engine.reply, engine.token_delay = "Done counting.", 0.0
    send(page, "Thanks")
    finished(page, 2)
    assert [m.content for m in engine.generations[-1].messages][:2] == [
        "Count for me",
        reply.locator(".text").inner_text(),
    ]
    first, second = _settled(server.db, email, 2)
    expect(page.locator("#remaining")).to_have_text(f"{100_000 - first.credits - second.credits:,}")
    page.reload()
    expect(page.locator(".msg.assistant").first.locator(".stopped-note")).to_be_visible()


# -- settings --------------------------------------------------------------------------------------


REFUSED = "Failed to load resource: the server responded with a status of 400"  # Chromium logs each refusal


def test_settings_reach_the_engine_and_bad_values_are_named_next_to_their_field(page, server, engine, width, errors):
    engine.reply = endless()
    enter(page, server, "settings", width)
    settings(page, system="Answer like a pirate.", temperature="0.3", max_tokens="5")
    send(page, "Hello")
    reply = finished(page)
    expect(reply.locator(".text")).to_have_text("one two three four five")  # max_tokens cut it
    generation = engine.generations[-1]
    assert [(m.role, m.content) for m in generation.messages] == [
        ("system", "Answer like a pirate."),
        ("user", "Hello"),
    ]
    assert generation.params.temperature == 0.3 and generation.params.max_tokens == 5

    sent = len(engine.generations)
    for label, field, value, message in (
        ("Temperature", "temperature", "5", "Temperature must be a number from 0 to 2."),
        ("Max tokens", "max_tokens", "0", "Max tokens must be a whole number from 1 to 2,048."),
        ("Max tokens", "max_tokens", "2.5", "Max tokens must be a whole number from 1 to 2,048."),
    ):
        settings(page, **{field: value})
        send(page, "Another one")
        error = page.locator(f"#{field}-error")
        expect(error).to_have_text(message)
        box = page.get_by_label(label, exact=True)
        expect(box).to_have_attribute("aria-invalid", "true")
        expect(box).to_be_focused()
        assert page.evaluate(  # right under its own field
            f"document.querySelector('#{field}-error').closest('.field').contains(document.getElementById('{field}'))"
        )
        expect(page.get_by_label("Message")).to_have_value("Another one")  # not lost
        expect(page.locator(".msg")).to_have_count(2)  # nothing was added to the conversation
        assert len(engine.generations) == sent, "nothing reached the engine"
        if value == "5":
            shot(page, "invalid-setting", width)
        settings(page, temperature="0.3", max_tokens="5")
    assert len(errors) == 3 and all(e.startswith(REFUSED) for e in errors)
    errors.clear()
    page.get_by_role("button", name="Send").click()
    finished(page, 2)
    for field in ("temperature", "max_tokens"):
        expect(page.locator(f"#{field}-error")).to_be_hidden()
        expect(page.locator(f"#{field}")).not_to_have_attribute("aria-invalid", "true")

    page.reload()  # the settings are kept with the conversation
    expect(page.get_by_label("System prompt")).to_have_value("Answer like a pirate.")
    expect(page.get_by_label("Max tokens")).to_have_value("5")


# -- View code -------------------------------------------------------------------------------------


def test_view_code_shows_this_request_for_this_server_and_runs_as_printed(page, context, server, engine, width):
    engine.reply = "Bonjour from the scripted engine."
    email = enter(page, server, "code", width)
    send(page, "Say hello in French")
    finished(page)
    settings(page, system="Be brief.", temperature="0.2", max_tokens="40")
    page.get_by_label("Message").fill("And in a 'quoted' way?")  # typed, not sent: the request Send would make
    page.locator("details#view-code summary").click()
    expected = [
        ("system", "Be brief."),
        ("user", "Say hello in French"),
        ("assistant", "Bonjour from the scripted engine."),
        ("user", "And in a 'quoted' way?"),
    ]
    secrets = [c["value"] for c in context.cookies()] + [page.locator("meta[name=csrf-token]").get_attribute("content")]
    key = make_key(server.db, email, name=f"code {width}")
    programs = {
        "curl": ["bash", "-c"],
        "python": [sys.executable, "-c"],
        "node": ["node", "-e"],
    }
    for lang, command in programs.items():
        code = page.locator(f"#code-{lang}")
        expect(code).to_contain_text(f"{server.url}/v1")  # the page's origin
        text = code.inner_text()
        assert "AIMICHAT_API_KEY" in text and "quoted" in text  # (escaped for the shell in curl's)
        assert not any(secret and secret in text for secret in secrets), "no session cookie or CSRF token"
        assert not re.search(r"aimichat_[0-9A-Za-z]{20,}", text), "no real key"
        if lang == "node" and not shutil.which("node"):
            continue
        before = len(engine.generations)
        done = subprocess.run(
            [*command, text],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "AIMICHAT_API_KEY": key},
        )
        assert done.returncode == 0, f"{lang}: {done.stderr}"
        assert "Bonjour from the scripted engine." in done.stdout, f"{lang}: {done.stdout}"
        (generation,) = engine.generations[before:]
        assert [(m.role, m.content) for m in generation.messages] == expected, lang
        assert generation.params.temperature == 0.2 and generation.params.max_tokens == 40, lang

    # The code follows the page: a new draft shows up at once; Copy copies what is shown.
    page.get_by_label("Message").fill("Something else")
    expect(page.locator("#code-curl")).to_contain_text("Something else")
    page.locator("details#view-code").get_by_role("button", name="Copy code").first.click()
    assert page.evaluate("navigator.clipboard.readText()") == page.locator("#code-curl").inner_text()
    fits(page, width)
    shot(page, "view-code", width)


# -- kept across reloads; New chat -----------------------------------------------------------------


def test_the_conversation_survives_a_reload_until_new_chat(page, context, server, engine, width):
    engine.reply = "Sure, **noted**."
    email = enter(page, server, "history", width)
    send(page, "Remember the number 42")
    finished(page)
    send(page, "And the colour blue")
    finished(page, 2)
    page.reload()
    expect(page.locator(".msg .text")).to_have_text(
        ["Remember the number 42", "Sure, noted.", "And the colour blue", "Sure, noted."]
    )
    expect(page.locator(".msg.assistant .text strong")).to_have_count(2)  # rendered again
    send(page, "What did I ask first?")
    finished(page, 3)
    sent = [(m.role, m.content) for m in engine.generations[-1].messages]
    assert sent == [  # the kept history goes with the next turn, as the Markdown it was, not as rendered
        ("user", "Remember the number 42"),
        ("assistant", "Sure, **noted**."),
        ("user", "And the colour blue"),
        ("assistant", "Sure, **noted**."),
        ("user", "What did I ask first?"),
    ]

    page.get_by_role("link", name="New chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.get_by_label("Message")).to_be_focused()
    page.reload()
    expect(page.locator("#log")).to_be_attached()
    expect(page.locator(".msg")).to_have_count(0)

    # Kept per account, and only until log-out: the next person at a shared computer sees none of it.
    send(page, "Mine")
    finished(page)
    stored = page.evaluate("Object.keys(localStorage)")
    assert [k for k in stored if k.startswith("aimichat.playground.")] == [
        f"aimichat.playground.{_account_id(server.db, email)}"
    ]
    menu = page.get_by_role("button", name="Menu")  # phones fold the header's links and Log out behind it
    if menu.is_visible():
        menu.click()
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/login")
    assert not [k for k in page.evaluate("Object.keys(localStorage)") if k.startswith("aimichat.playground.")]
    enter(page, server, "history-other", width)
    expect(page.locator("#log")).to_be_attached()
    expect(page.locator(".msg")).to_have_count(0)


def test_a_refused_message_goes_back_in_the_box(page, context, server, engine, width, errors):
    """A message the server refuses (here: the session ended) is not part of the conversation: it leaves
    the log, returns to the box, and the page says in plain words what to do."""
    engine.reply = "Hello."
    enter(page, server, "lapsed", width)
    send(page, "Before")
    finished(page)
    context.clear_cookies()  # the session is gone (expired, or logged out in another tab)
    send(page, "Are you there?")
    expect(page.get_by_role("alert").filter(has_text="Your session expired")).to_be_visible()
    expect(page.get_by_role("link", name="Log in again")).to_have_attribute(
        "href", "/login?next=/playground&reason=expired"
    )
    expect(page.get_by_label("Message")).to_have_value("Are you there?")
    expect(page.locator(".msg .text")).to_have_text(["Before", "Hello."])
    assert len(errors) == 1 and "status of 401" in errors[0]
    errors.clear()


# -- following a streaming reply -------------------------------------------------------------------


def test_the_view_follows_a_reply_unless_scrolled_up(page, server, engine, width):
    engine.reply = lambda messages: (f"Line{i}\n\n" for i in itertools.count())
    engine.token_delay = 0.02
    enter(page, server, "follow", width)
    settings(page, max_tokens="2048")
    page.locator("details#settings summary").click()  # folded again
    send(page, "Write many lines")
    reply = page.locator(".msg.assistant")
    # The composer sits under the conversation: in view while the page follows the reply, pushed out of
    # view by it otherwise. (The reply's own paragraphs are rendered afresh with each chunk.)
    stop = page.get_by_role("button", name="Stop")
    to_bottom = "document.scrollingElement.scrollHeight - window.scrollY - window.innerHeight"
    expect(reply.get_by_text("Line40", exact=True)).to_be_attached(timeout=SLOW)
    expect(stop).to_be_in_viewport()
    assert page.evaluate("window.scrollY") > 0 and page.evaluate(to_bottom) < 48, "at the bottom, with the reply"

    page.mouse.move(width / 2, 200)
    page.mouse.wheel(0, -100_000)  # the person scrolls up to read
    expect(page.get_by_role("heading", name="Playground")).to_be_in_viewport()
    expect(reply.get_by_text("Line100", exact=True)).to_be_attached(timeout=SLOW)
    top = page.evaluate("window.scrollY")
    expect(reply.get_by_text("Line130", exact=True)).to_be_attached(timeout=SLOW)
    assert page.evaluate("window.scrollY") == top, "left where the person put it"
    expect(stop).not_to_be_in_viewport()

    page.mouse.wheel(0, 1_000_000)  # back down to the reply's end: following again
    expect(stop).to_be_in_viewport()
    expect(reply.get_by_text("Line190", exact=True)).to_be_attached(timeout=SLOW)
    expect(stop).to_be_in_viewport()
    assert page.evaluate(to_bottom) < 48
    shot(page, "following", width)
    stop.click()
    finished(page)


# -- accessibility, with everything unfolded -------------------------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_everything_unfolded_has_no_serious_axe_violation(browser, server, engine, width, scheme):
    """A Markdown reply with its code block and Copy button, a stopped reply, a setting refused next to its
    field and the code view open: axe-core finds nothing serious (contrast included) in either scheme."""
    require_axe()
    ctx = browser.new_context(
        base_url=server.url,
        viewport={"width": width, "height": WIDTHS[width]},
        color_scheme=scheme,
        bypass_csp=True,  # lets axe's script in (the other tests run under the CSP)
    )
    page = ctx.new_page()
    engine.reply, engine.token_delay = HOSTILE, 0.0
    enter(page, server, f"axe-{scheme}", width)
    send(page, "Show me some code")
    finished(page)
    engine.reply, engine.token_delay = endless(), 0.02
    send(page, "Count")
    expect(page.locator(".msg.assistant.pending .text")).not_to_be_empty(timeout=SLOW)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".stopped-note")).to_be_visible()
    settings(page, temperature="9")
    send(page, "Once more")
    expect(page.locator("#temperature-error")).to_be_visible()
    page.locator("details#view-code summary").click()
    expect(page.locator("#code-python")).not_to_be_empty()
    violations = axe_violations(page)
    ctx.close()
    serious = [
        (v["id"], v["help"], [n["target"] for n in v["nodes"]][:4])
        for v in violations
        if v["impact"] in ("serious", "critical")
    ]
    assert serious == []
