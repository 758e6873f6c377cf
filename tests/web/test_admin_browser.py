"""The admin pages in Debian's Chromium, driven by Playwright, on a 390 px phone and a 1280 px screen: an
admin searches for an account, opens it and disables it through the confirmation step (its keys stop at
once), revokes a key after the browser's dialog, and fixes a tier's form; and axe-core finds no serious
violation on these pages in light and dark mode.

One server (a real socket, answered by the scripted engine) and one browser per module; each test uses
accounts of its own. Screenshots go to the test output folder (``test-output/web-admin-*.png``).
"""

from __future__ import annotations

import re

import pytest
from browser_kit import DESKTOP, PHONE, Watched, axe_violations, browser_fixture, live_server, log_in, require_axe
from playwright.sync_api import expect
from web_helpers import PASSWORD, chat

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from conftest import OUTPUT

pytestmark = pytest.mark.browser

ADMIN = "chief@example.com"
SIZES = {390: PHONE, 1280: DESKTOP}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory, "admin-web") as live:
        with live.db.session() as s:
            accounts.create_account(s, ADMIN, PASSWORD, is_admin=True)
            for n in range(1, 4):  # others the search must leave out
                accounts.create_account(s, f"ada{n}@lovelace.example", PASSWORD)
            s.commit()
        yield live


chromium = browser_fixture("chromium")


def member_with_keys(server, email: str) -> list[str]:
    """An account with two keys, one of them used twice today: their secrets."""
    with server.db.session() as s:
        account = accounts.create_account(s, email, PASSWORD)
        secrets = [keys.create_key(s, account, name).secret for name in ("laptop", "server")]
        s.commit()
    for _ in range(2):
        assert chat(server, secrets[0]).status_code == 200
    return secrets


def new_page(chromium, server, width: int, **options):
    phone = width < 600
    ctx = chromium.new_context(base_url=server.url, viewport=SIZES[width], is_mobile=phone, has_touch=phone, **options)
    return ctx, Watched(ctx.new_page())


def fits(page, width: int) -> None:
    scrolled = page.evaluate("document.documentElement.scrollWidth")
    assert scrolled <= width, f"{page.url} scrolls sideways ({scrolled}px)"


def shot(page, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"web-admin-{name}.png"), full_page=True)


@pytest.mark.parametrize("width", [390, 1280])
def test_search_open_the_account_and_disable_it_after_confirming(chromium, server, width):
    email = f"member{width}@example.com"
    laptop, spare = member_with_keys(server, email)
    ctx, watched = new_page(chromium, server, width)
    page = watched.page
    log_in(page, ADMIN)
    page.goto("/admin")
    fits(page, width)

    page.get_by_label("Search by email").fill(f"MEMBER{width}")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(rf".*/admin\?q=MEMBER{width}&per_page=50$"))
    rows = page.locator("table.accounts tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.get_by_role("rowheader")).to_have_text(email)
    expect(rows.first.locator("td.used-today")).to_contain_text("2 of 100")
    fits(page, width)
    shot(page, f"search-{width}")

    page.get_by_role("link", name=email, exact=True).click()
    page.wait_for_url(re.compile(r".*/admin/accounts/\d+$"))
    expect(page.get_by_role("heading", level=1)).to_have_text(email)
    expect(page.locator("#use-today .big")).to_contain_text("2 of 100 credits")
    expect(page.locator("table.admin-keys tbody tr")).to_have_count(2)
    fits(page, width)
    shot(page, f"account-{width}")

    page.get_by_role("button", name="Disable", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Disable {email}?")
    expect(page.locator("main")).to_contain_text("This stops every key of this person at once: 2 active keys")
    assert chat(server, laptop).status_code == 200, "nothing stops before the confirmation"
    fits(page, width)
    shot(page, f"confirm-disable-{width}")

    page.get_by_role("button", name="Disable account").click()
    page.wait_for_url(re.compile(r".*/admin/accounts/\d+\?done=disabled$"))
    expect(page.get_by_role("status")).to_contain_text("Disabled: its keys stopped working")
    expect(page.locator("#person-status .badge").first).to_have_text("Disabled")
    assert chat(server, laptop).status_code == 403 and chat(server, spare).status_code == 403
    fits(page, width)
    ctx.close()
    assert watched.errors == [], "no console errors or CSP violations"


def test_revoke_a_key_with_the_dialog_and_without_javascript(chromium, server):
    email = "keys@example.com"
    laptop, spare = member_with_keys(server, email)
    ctx, watched = new_page(chromium, server, 1280)
    page = watched.page
    log_in(page, ADMIN)
    page.goto(f"/admin?q={email}")
    page.get_by_role("link", name=email, exact=True).click()
    row = page.locator("table.admin-keys tbody tr", has=page.get_by_role("rowheader", name="laptop"))
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.get_by_role("button", name="Revoke").click()
    expect(row.get_by_role("button", name="Revoke")).to_be_visible()
    assert chat(server, laptop).status_code == 200, "dismissing the dialog revokes nothing"
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    page.wait_for_url(re.compile(r".*/admin/accounts/\d+\?done=revoked$"))
    assert chat(server, laptop).status_code == 401 and chat(server, spare).status_code == 200
    ctx.close()
    assert watched.errors == []

    plain, without_script = new_page(chromium, server, 390, java_script_enabled=False)
    page = without_script.page
    log_in(page, ADMIN)
    page.goto(f"/admin?q={email}")
    page.get_by_role("link", name=email, exact=True).click()
    page.get_by_role("button", name="Revoke").click()  # the one live key left: a confirmation page
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"Revoke the key “server” of {email}?")
    page.get_by_role("button", name="Revoke").click()
    page.wait_for_url(re.compile(r".*/admin/accounts/\d+\?done=revoked$"))
    assert chat(server, spare).status_code == 401
    plain.close()


def test_a_tier_form_says_what_to_fix_next_to_the_field(chromium, server):
    ctx, watched = new_page(chromium, server, 390)
    page = watched.page
    log_in(page, ADMIN)
    page.goto("/admin#tiers")
    page.get_by_role("link", name="Add a tier").click()
    page.get_by_label("Name", exact=True).fill("team")
    page.get_by_label("Daily credits").fill("-3")
    page.get_by_label("Requests at once (per account)").fill("0")
    page.get_by_role("button", name="Create tier").click()
    daily = page.get_by_label("Daily credits")
    expect(daily).to_have_attribute("aria-invalid", "true")
    expect(daily).to_be_focused()
    expect(page.locator("#daily_credits-error")).to_have_text("Must be at least 0.")
    expect(page.locator("#max_concurrent-error")).to_have_text("Must be at least 1.")
    fits(page, 390)
    shot(page, "tier-errors-390")
    daily.fill("500")
    page.get_by_label("Requests at once (per account)").fill("3")
    page.get_by_role("button", name="Create tier").click()
    page.wait_for_url(re.compile(r".*/admin\?tier_saved=team#tiers$"))
    expect(page.get_by_role("status")).to_have_text("Saved the tier team.")
    expect(page.locator("table.tiers")).to_contain_text("3 requests at once")
    ctx.close()
    refused = "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    assert [e for e in watched.errors if e != refused] == [], "only the refused form's own 400"


@pytest.mark.parametrize("width", [390, 1280])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violation_on_the_admin_pages(chromium, server, scheme, width):
    require_axe()
    email = f"axe-{scheme}-{width}@example.com"
    member_with_keys(server, email)
    # The pages' CSP forbids axe's injected script: this context bypasses it (the pages are unchanged).
    ctx, watched = new_page(chromium, server, width, color_scheme=scheme, bypass_csp=True)
    page = watched.page
    log_in(page, ADMIN)
    found = []

    def check(where: str) -> None:
        found.extend(
            f"{where}: {v['id']} ({v['impact']}) {v['help']}: {[n['target'] for n in v['nodes']][:3]}"
            for v in axe_violations(page)
            if v["impact"] in ("serious", "critical")
        )

    page.goto(f"/admin?q={email}")
    check("/admin (a search)")
    page.get_by_role("link", name=email, exact=True).click()
    check("an account")
    page.get_by_role("button", name="Disable", exact=True).click()
    check("the disable step")
    page.goto("/admin/tiers/edit?name=free")
    check("a tier")
    page.get_by_label("Daily credits").fill("many")
    page.get_by_role("button", name="Save tier").click()
    expect(page.locator("#daily_credits-error")).to_be_visible()
    check("a tier refused")
    ctx.close()
    assert found == []
