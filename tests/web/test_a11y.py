"""axe-core (from npm, tests/node) on every page, logged out, logged in and as an admin, in light and dark
mode at 1280 and 390 px: no serious or critical violation anywhere.

One server and one browser for the module; each colour scheme and width is one context whose page visits
every address in turn. The pages' CSP forbids the script axe needs, so the contexts bypass it (only here).
Every violation found, of any impact, is written to ``test-output/a11y-<scheme>-<width>.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from browser_kit import PHONE, Watched, axe_violations, browser_fixture, live_server, log_in
from playwright.sync_api import expect
from web_helpers import PASSWORD, chat

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from conftest import OUTPUT

pytestmark = pytest.mark.browser

ADMIN = "a11y@example.com"
LOGGED_OUT = ["/", "/login", "/signup", "/docs", "/password/forgot", "/no-such-page"]
LOGGED_IN = ["/keys", "/keys/{key_id}", "/usage", "/plan", "/playground", "/account", "/webhooks", "/keys/999999"]
ADMIN_PAGES = [
    "/admin",
    "/admin/accounts/{account_id}",
    "/admin/tiers/edit?name=free",
    "/admin/models",
    "/admin/models/edit?name=aimichat-1",
    "/admin/audit",
]
NOT_FOUND = {"/no-such-page", "/keys/999999"}  # the 404 page, and the error page of a key that is not there
BLOCKING = {"serious", "critical"}


@dataclass(frozen=True)
class Violation:
    where: str
    rule: str
    impact: str
    help: str
    targets: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.rule} ({self.impact}) {self.help}: {', '.join(self.targets[:4])}"


browser = browser_fixture()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory, "a11y") as live:
        with live.db.session() as s:
            account = accounts.create_account(s, ADMIN, PASSWORD, is_admin=True)
            created = keys.create_key(s, account, "laptop")
            s.commit()
        live.key_id, live.account_id = created.key.id, account.id
        for _ in range(3):  # some use, so the usage page has figures, a bar and a row per key
            assert chat(live, created.secret).status_code == 200
        yield live


class Audit:
    """axe-core run on page after page of one browser context, keeping what it found."""

    def __init__(self, page: Any, label: str):
        self.page = page
        self.label = label
        self.found: list[dict[str, Any]] = []

    def visit(self, path: str) -> None:
        response = self.page.goto(path)
        assert response is not None and response.status == (404 if path in NOT_FOUND else 200), path
        self.check(path)

    def check(self, where: str) -> None:
        self.found += [{"where": where, **v} for v in axe_violations(self.page)]

    def blocking(self) -> list[Violation]:
        return [
            Violation(
                f"{v['where']} [{self.label}]",
                v["id"],
                v["impact"],
                v["help"],
                tuple(" ".join(node["target"]) for node in v["nodes"]),
            )
            for v in self.found
            if v["impact"] in BLOCKING
        ]

    def save(self) -> None:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        kept = [{k: v[k] for k in ("where", "id", "impact", "help", "nodes")} for v in self.found]
        (OUTPUT / f"a11y-{self.label.replace(' ', '-')}.json").write_text(json.dumps(kept, indent=1))


@pytest.mark.parametrize("width", [1280, 390])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_no_serious_violations_on_any_page(browser, server, scheme, width):
    phone = width < 600
    ctx = browser.new_context(
        base_url=server.url,
        viewport={"width": width, "height": PHONE["height"] if phone else 900},
        color_scheme=scheme,
        is_mobile=phone,
        has_touch=phone,
        bypass_csp=True,  # lets axe's script in; the pages themselves are unchanged
    )
    watched = Watched(ctx.new_page())
    page = watched.page
    audit = Audit(page, f"{scheme} {width}")
    for path in LOGGED_OUT:
        audit.visit(path)

    log_in(page, ADMIN)
    page.get_by_label("Key name").fill(f"key {scheme} {width}")
    page.get_by_role("button", name="Generate key").click()
    expect(page.locator("#new-key")).to_be_visible()
    audit.check("/keys (a new key shown)")
    for path in LOGGED_IN + ADMIN_PAGES:
        audit.visit(path.format(key_id=server.key_id, account_id=server.account_id))

    page.goto("/playground")
    page.get_by_label("Message").fill("Hello there")
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".msg.assistant:not(.pending) .text")).not_to_be_empty()
    audit.check("/playground (after a reply)")
    if phone:
        page.goto("/keys")
        page.get_by_role("button", name="Menu").click()
        expect(page.get_by_role("navigation", name="Main")).to_be_visible()
        audit.check("/keys (menu open)")

    audit.save()
    ctx.close()
    problems = audit.blocking()
    assert not problems, "serious or critical accessibility violations:\n" + "\n".join(map(str, problems))
    unexpected = [e for e in watched.errors if "404 (Not Found)" not in e]  # the not-found pages' own status
    assert unexpected == [], "no console errors"
