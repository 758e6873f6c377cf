"""The usage page's history and recent requests in Chromium on a 390 px phone: nothing wider than the screen
(the chart, its table, the keys and the requests, with long names and big numbers), the metric switch and the
pages of requests followed as links (with JavaScript and without), local times in the relative times' titles.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

import pytest
from browser_kit import PHONE, Watched, axe_violations, browser_fixture, live_server, log_in, require_axe
from playwright.sync_api import expect
from web_helpers import PASSWORD

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.store.clock import utcnow
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from conftest import OUTPUT

pytestmark = pytest.mark.browser

EMAIL = "usage-phone@example.com"
LONG_KEY = "production-ingest-worker-eu-west-" + "x" * 60  # one word, longer than the screen is wide
LONG_MODEL = "meta-llama/Llama-3.1-70B-Instruct-GGUF-Q4_K_M-with-a-long-name"


browser = browser_fixture()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live app over SQLite with one account: a long-named key, a revoked key, and 60 requests today."""
    with live_server(tmp_path_factory, "usage") as live:
        seed(live.db)
        yield live


def seed(db: Database) -> None:
    now = utcnow()
    with db.session() as s:
        account = accounts.create_account(s, EMAIL, PASSWORD)
        long_key = keys.create_key(s, account, LONG_KEY).key
        old = keys.create_key(s, account, "old laptop").key
        keys.revoke_key(s, old.id)
        for i in range(60):
            at = now - dt.timedelta(minutes=3 * i)
            s.add(
                UsageEvent(
                    request_id=f"seed-{i}",
                    account_id=account.id,
                    api_key_id=(long_key.id, old.id, None)[i % 3],
                    created_at=at,
                    day=at.date(),
                    reserved_credits=123_456,
                    credits=123_456,
                    prompt_tokens=1_234_567,
                    completion_tokens=7_654_321,
                    status="charged",
                    model=LONG_MODEL,
                )
            )
        s.commit()


def phone_page(browser: Any, server: Any, **options: Any) -> Iterator[Any]:
    ctx = browser.new_context(
        base_url=server.url, viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True, **options
    )
    watched = Watched(ctx.new_page())
    log_in(watched.page, EMAIL)
    yield watched.page
    ctx.close()
    assert watched.errors == [], "no console errors or CSP violations"


@pytest.fixture
def phone(browser, server):
    yield from phone_page(browser, server)


@pytest.fixture
def phone_without_script(browser, server):
    yield from phone_page(browser, server, java_script_enabled=False)


def assert_fits(page: Any, *selectors: str) -> None:
    """The page does not scroll sideways, and each element lies within the 390 px viewport."""
    width = page.evaluate("document.documentElement.clientWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for selector in selectors:
        box = page.locator(selector).bounding_box()
        assert box is not None, f"{selector} is shown"
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (selector, box, width)


BLOCKING = ("serious", "critical")
PARTS = ["nav.switch", "figure.chart", "svg.bars", "table.history-days", "table.by-key", "table.requests", "nav.pager"]


def test_history_and_requests_fit_a_phone(phone):
    page = phone
    page.goto("/usage?metric=tokens")
    page.get_by_text("Show as a table").click()  # the chart's table equivalent, opened
    expect(page.locator("table.history-days")).to_be_visible()
    expect(page.locator("table.requests tbody tr")).to_have_count(50)
    assert_fits(page, *PARTS)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-usage-history-390.png"), full_page=True)

    # The metric switch: a link, the chosen one marked.
    switch = page.get_by_role("navigation", name="Chart metric")
    switch.get_by_role("link", name="Requests").click()
    page.wait_for_url(re.compile(r"/usage\?metric=requests#history$"))
    expect(switch.get_by_role("link", name="Requests")).to_have_attribute("aria-current", "true")
    expect(page.locator("#chart-title")).to_have_text("Requests per day over the last 30 days, all keys")

    # One key's history and requests; the relative times name the local time when hovered.
    page.locator("table.by-key").get_by_role("link", name=LONG_KEY).click()
    expect(page.locator("#chart-title")).to_have_text(f"Requests per day over the last 30 days, {LONG_KEY}")
    expect(page.locator("table.requests tbody tr")).to_have_count(20)
    expect(page.locator("table.requests time").first).to_have_attribute("title", re.compile(r"your time \(.* UTC\)$"))
    # The older page of every key's requests.
    page.goto("/usage")
    page.get_by_role("navigation", name="Pages of requests").get_by_role("link", name="Older").click()
    page.wait_for_url(re.compile(r"/usage\?before=\d+#requests$"))
    expect(page.locator("table.requests tbody tr")).to_have_count(10)
    assert_fits(page, "figure.chart", "table.requests", "nav.pager")


def test_the_switch_and_pages_work_without_javascript(phone_without_script):
    page = phone_without_script
    page.goto("/usage")
    page.get_by_role("navigation", name="Chart metric").get_by_role("link", name="Tokens").click()
    page.wait_for_url(re.compile(r"metric=tokens"))
    expect(page.locator("#chart-title")).to_have_text("Tokens per day over the last 30 days, all keys")
    page.get_by_role("link", name="Older").click()
    page.wait_for_url(re.compile(r"metric=tokens&before=\d+"))
    page.get_by_role("link", name="Newer").click()
    page.wait_for_url(re.compile(r"metric=tokens&after=\d+"))
    expect(page.locator("table.requests tbody tr")).to_have_count(50)
    assert_fits(page, *[p for p in PARTS if p != "table.history-days"])


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_no_serious_accessibility_violations_in_the_history_views(browser, server, scheme):
    """axe-core (as tests/web/test_a11y.py runs it on /usage) on the views only links reach: a key chosen with
    its table open, and an older page of requests."""
    require_axe()
    ctx = browser.new_context(base_url=server.url, viewport=PHONE, color_scheme=scheme, bypass_csp=True)
    watched = Watched(ctx.new_page())
    page = watched.page
    log_in(page, EMAIL)
    found: list[tuple[str, str, str]] = []

    def check() -> None:
        found.extend((page.url, v["id"], v["impact"]) for v in axe_violations(page) if v["impact"] in BLOCKING)

    page.goto("/usage?metric=tokens")
    page.locator("table.by-key").get_by_role("link", name="old laptop").click()
    page.get_by_text("Show as a table").click()
    expect(page.locator("table.history-days")).to_be_visible()
    check()
    page.get_by_role("link", name="Show all keys").click()
    page.get_by_role("link", name="Older").click()
    page.wait_for_url(re.compile(r"before=\d+"))
    check()
    ctx.close()
    assert found == []
    assert watched.errors == []
