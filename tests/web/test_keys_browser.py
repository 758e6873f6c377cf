"""The keys pages in Debian's Chromium, driven by Playwright, on a 1280 px screen and a 390 px phone:

- a "Generate key" form sent after the session lapsed comes back filled in after the log-in (Chromium's own
  Sec-Fetch-Site says it is this site's form), its notice focused so that Enter sends nothing before the
  person has looked; then "Generate key" makes it; the new key's card takes focus, and its OpenAI SDK snippet
  runs as printed;
- a refused field says why next to itself and has focus;
- "Show revoked keys" works without JavaScript; rename from the key's page; "3 h ago" with the local time
  in the title;
- no label or badge of the keys list breaks mid-word ("Statu / s", "Revoke / d").

Console errors (CSP violations among them) fail the tests.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest
from browser_kit import axe_violations, browser_fixture, live_server, log_in, require_axe
from playwright.sync_api import expect
from sqlalchemy import delete, select, update
from starlette.datastructures import FormData
from web_helpers import PASSWORD

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.store.clock import utcnow
from aimichat.store.models import ApiKey, WebSession
from aimichat.web import key_input
from conftest import OUTPUT, make_account

pytestmark = pytest.mark.browser

SCREENS = {"1280": {"width": 1280, "height": 900}, "390": {"width": 390, "height": 844}}
# A refused form is a 400 document: Chromium logs it as a failed load, which is what is tested there.
FAILED_LOAD = "Failed to load resource: the server responded with a status of 400"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory, "keys-browser") as live:
        yield live


browser = browser_fixture()


@pytest.fixture(params=list(SCREENS), ids=lambda width: f"{width}px")
def screen(request) -> str:
    return request.param


def open_page(browser, server, screen: str, **options):
    """A page on a screen ``screen`` px wide, in a context of its own, and the list its console errors go to."""
    phone = screen == "390"
    ctx = browser.new_context(
        base_url=server.url, viewport=SCREENS[screen], is_mobile=phone, has_touch=phone, **options
    )
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and not m.text.startswith(FAILED_LOAD) and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


@pytest.fixture
def page(browser, server, screen):
    page, errors = open_page(browser, server, screen)
    yield page
    page.context.close()
    assert errors == [], "no console errors or CSP violations"


def account(server, screen: str, name: str) -> str:
    email = f"{name}-{screen}@example.com"
    make_account(server.db, email, password=PASSWORD)
    return email


def draft_url(page, path: str, *typed: tuple[str, str]) -> str:
    """A draft of ``typed`` for ``path``, signed as this browser's own form would be (its pre-log-in secret)."""
    secret = next(c["value"] for c in page.context.cookies() if c["name"] == "aimichat_csrf")
    query = key_input.draft_query(FormData(list(typed)))
    return f"{path}?{key_input.sign_draft(path, query, secret, utcnow())}"


def shot(page, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUTPUT / f"web-keys-{name}.png"), full_page=True)


def key_named(server, name: str) -> ApiKey:
    with server.db.session() as s:
        return s.scalars(select(ApiKey).where(ApiKey.name == name)).one()


# -- a form that meets a lapsed session ------------------------------------------------------------


def test_a_key_form_sent_after_the_session_lapsed_comes_back_after_log_in(page, server, screen):
    email = account(server, screen, "lapsed")
    log_in(page, email)
    page.get_by_label("Key name", exact=True).fill(f"deploy {screen}")
    page.locator("summary", has_text="Limits").click()
    page.get_by_label("Daily cap").fill("40")
    page.get_by_label("IP ranges").fill("203.0.113.0/24")
    with server.db.session() as s:  # the session lapses while the form is being filled in
        s.execute(delete(WebSession))
        s.commit()
    page.get_by_role("button", name="Generate key").click()

    page.wait_for_url(re.compile(r"/login\?.*reason=expired"))
    expect(page.locator("#login-notice")).to_have_text(
        "Your session expired before your form was sent. Nothing was changed. "
        "Log in and your form comes back as you typed it, to send again."
    )
    carried = page.locator("input[name=next]").get_attribute("value") or ""
    assert carried.startswith("/keys?draft=1&") and "csrf" not in carried
    shot(page, f"lapsed-login-{screen}")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()

    page.wait_for_url("**/keys?draft=1*")
    notice = page.locator("#draft-notice")
    expect(notice).to_be_focused()  # not the button: nothing is sent by a single Enter
    name = page.get_by_label("Key name", exact=True)
    expect(name).to_have_value(f"deploy {screen}")
    expect(page.get_by_label("Daily cap")).to_have_value("40")
    expect(page.get_by_label("IP ranges")).to_have_value("203.0.113.0/24")
    with server.db.session() as s:
        assert s.scalars(select(ApiKey).where(ApiKey.name == f"deploy {screen}")).first() is None, "nothing made yet"
    shot(page, f"lapsed-back-{screen}")

    page.keyboard.press("Enter")  # on the notice: nothing happens (a key sent here would make two below)
    expect(notice).to_be_focused()
    page.keyboard.press("Tab")  # the notice leads into the form
    expect(name).to_be_focused()
    page.get_by_role("button", name="Generate key").click()  # the person looked, and sends it
    page.wait_for_url("**/keys?shown=*")
    expect(page.locator("#new-key-card")).to_be_focused()
    made = key_named(server, f"deploy {screen}")  # exactly one key of that name
    assert (made.daily_cap, made.ips) == (40, ["203.0.113.0/24"])


# -- the new key's card ----------------------------------------------------------------------------


def test_the_new_key_card_takes_focus_and_its_python_snippet_runs(page, server, screen):
    log_in(page, account(server, screen, "snippet"))
    page.get_by_label("Key name", exact=True).fill("sdk")
    page.get_by_role("button", name="Generate key").click()
    page.wait_for_url("**/keys?shown=*")
    card = page.locator("#new-key-card")
    expect(card).to_be_focused()
    assert card.bounding_box()["y"] < SCREENS[screen]["height"], "in view"
    shot(page, f"new-key-{screen}")

    key = page.locator("#new-key").inner_text()
    export = page.locator("#try-env").inner_text()
    assert export == f"export AIMICHAT_API_KEY={key}"
    snippet = page.locator("#try-python").inner_text()
    assert f'base_url="{server.url}/v1"' in snippet
    script = f"{export}\n{sys.executable} - <<'PYTHON'\n{snippet}\nPYTHON\n"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the model's reply, printed"


# -- errors next to the field --------------------------------------------------------------------


def test_a_refused_field_says_why_next_to_itself_and_has_focus(page, server, screen):
    log_in(page, account(server, screen, "refused"))
    page.get_by_label("Key name", exact=True).fill("   ")  # passes `required`; the server's rule refuses it
    page.get_by_role("button", name="Generate key").click()
    name = page.get_by_label("Key name", exact=True)
    expect(page.locator("#key-name-error")).to_have_text("A key needs a name.")
    expect(name).to_be_focused()
    expect(name).to_have_attribute("aria-invalid", "true")
    expect(name).to_have_accessible_description(
        "A key needs a name. A name to tell your keys apart, such as where the key is used."
    )
    below(page, "#key-name", "#key-name-error")

    name.fill("office")
    page.locator("summary", has_text="Limits").click()
    page.get_by_label("IP ranges").fill("10.0.0.0/8, not-a-range")  # they come back open: something is typed
    page.get_by_role("button", name="Generate key").click()
    ips = page.get_by_label("IP ranges")
    expect(page.locator("#new-ips-error")).to_contain_text("Not an IP range (CIDR)")
    expect(ips).to_be_focused()
    expect(ips).to_have_attribute("aria-invalid", "true")
    expect(ips).to_have_value("10.0.0.0/8, not-a-range")
    expect(page.get_by_label("Key name", exact=True)).to_have_value("office")
    below(page, "#new-ips", "#new-ips-error")
    shot(page, f"field-error-{screen}")


def below(page, field: str, message: str) -> None:
    """``message`` sits right under ``field``, inside the field's own block."""
    assert page.locator(message).evaluate(f"(m) => m.closest('.field').contains(document.querySelector('{field}'))")
    box, said = page.locator(field).bounding_box(), page.locator(message).bounding_box()
    assert box and said and 0 <= said["y"] - (box["y"] + box["height"]) < 40


# -- the list ------------------------------------------------------------------------------------


def seed_keys(server, email: str) -> dict[str, int]:
    """An active key with limits, a key revoked just now and one revoked ten days ago, made directly."""
    with server.db.session() as s:
        owner = accounts.get_account(s, email)
        made = {
            name: keys.create_key(s, owner, name, keys.KeyLimits(daily_cap=50, rpm=10)).key.id
            for name in ("revoked long ago", "revoked today", "a rather long name for the office laptop")
        }
        s.flush()
        for name in ("revoked today", "revoked long ago"):
            keys.revoke_key(s, made[name])
        s.execute(
            update(ApiKey)
            .where(ApiKey.id == made["revoked long ago"])
            .values(revoked_at=utcnow() - dt.timedelta(days=10))
        )
        s.commit()
    return made


def test_show_revoked_keys_works_without_javascript(browser, server, screen):
    email = account(server, screen, "nojs")
    seed_keys(server, email)
    page, errors = open_page(browser, server, screen, java_script_enabled=False)
    log_in(page, email)
    rows = page.locator("table.keys tbody tr")
    expect(rows).to_have_count(2)
    expect(page.get_by_role("rowheader", name="revoked long ago")).to_have_count(0)
    page.get_by_role("link", name="Show revoked keys (1)").click()
    page.wait_for_url("**/keys?show=revoked")
    expect(rows).to_have_count(3)
    assert rows.locator("th").all_inner_texts()[-1] == "revoked long ago", "active keys first, revoked last"
    shot(page, f"show-revoked-{screen}")
    page.get_by_role("link", name="Hide old revoked keys").click()
    page.wait_for_url("**/keys")
    expect(rows).to_have_count(2)
    page.context.close()
    assert errors == []


def test_rename_a_key_from_its_page(page, server, screen):
    email = account(server, screen, "rename")
    made = seed_keys(server, email)
    log_in(page, email)
    page.get_by_role("link", name="a rather long name for the office laptop").click()
    page.wait_for_url(f"**/keys/{made['a rather long name for the office laptop']}")
    page.get_by_label("Key name").fill(f"office {screen}")
    page.get_by_role("button", name="Rename").click()
    expect(page.locator("#renamed")).to_be_visible()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Key “office {screen}”")
    page.get_by_role("link", name="API keys").first.click()
    expect(page.get_by_role("rowheader", name=f"office {screen}")).to_be_visible()


def test_times_read_how_long_ago_with_the_local_time_in_the_title(browser, server, screen):
    email = account(server, screen, "times")
    made = seed_keys(server, email)["a rather long name for the office laptop"]
    created = utcnow().replace(microsecond=0) - dt.timedelta(hours=3, minutes=20)
    with server.db.session() as s:
        s.execute(update(ApiKey).where(ApiKey.id == made).values(created_at=created))
        s.commit()
    page, errors = open_page(browser, server, screen, timezone_id="Asia/Tokyo", locale="en-GB")
    log_in(page, email)
    time = page.locator(f"tr[data-key-id='{made}'] td.created time")
    expect(time).to_have_text("3 h ago")
    local = created + dt.timedelta(hours=9)  # Tokyo, no daylight saving
    # The script puts the reader's local time first; the UTC time the page was sent with stays in brackets.
    title = re.compile(rf"^.*\b{local:%H:%M} your time \({created:%Y-%m-%d %H:%M} UTC\)$")
    expect(time).to_have_attribute("title", title)
    page.context.close()
    assert errors == []


# -- no word broken in two ------------------------------------------------------------------------

# For each label of the stacked rows (a ::before) and each badge, label, legend, column heading and button of
# /keys: the number of lines it takes, and the words that start on one line and end on another.
MEASURE = """() => {
  const lineCount = (el) => {
    const range = document.createRange();
    range.selectNodeContents(el);
    return new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top))).size;
  };
  const brokenWords = (el) => {
    const broken = [];
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const match of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, match.index);
        range.setEnd(node, match.index + match[0].length);
        const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
        if (tops.size > 1) broken.push(match[0]);
      }
    }
    return broken;
  };
  // Seen: laid out, and not in the 1 px box that keeps a phone's column headings for screen readers only.
  const seen = (el) => el.getClientRects().length > 0 && !el.closest(".sr-only") &&
    !(el.closest("thead") && getComputedStyle(el.closest("thead")).position === "absolute");
  const labels = [...document.querySelectorAll("table.keys [data-label]")].map((cell) => {
    const before = getComputedStyle(cell, "::before");
    return before.content === "none" ? null :
      {label: cell.dataset.label, lines: parseFloat(before.height) / parseFloat(before.lineHeight)};
  }).filter(Boolean);
  const words = [...document.querySelectorAll(".badge, label, legend, summary, thead th, button, .list-head a")]
    .filter(seen).map((el) => ({text: el.textContent.trim(), lines: lineCount(el), broken: brokenWords(el)}));
  return {labels, words};
}"""


def test_no_label_or_badge_breaks_mid_word(page, server, screen):
    email = account(server, screen, "words")
    seed_keys(server, email)
    log_in(page, email)
    page.goto("/keys?show=revoked")
    page.locator("summary", has_text="Limits").click()
    shot(page, f"list-{screen}")
    measured = page.evaluate(MEASURE)
    stacked = screen == "390"
    assert len(measured["labels"]) == (18 if stacked else 0), "the stacked rows' labels, 6 a row"
    for label in measured["labels"]:
        assert label["lines"] < 1.5, f"label {label['label']!r} takes {label['lines']:.1f} lines"
    badges = [w for w in measured["words"] if w["text"] in ("Active", "Revoked")]
    assert len(badges) == 3
    for word in measured["words"]:
        assert word["broken"] == [], f"{word['text']!r} breaks mid-word"
        if word in badges:
            assert word["lines"] == 1, f"badge {word['text']!r} takes {word['lines']} lines"

    # The measure itself can fail: squeezed, a badge that may wrap breaks mid-word, and it tells.
    page.locator(".badge.revoked").first.evaluate("(b) => { b.style.whiteSpace = 'normal'; b.style.width = '3em'; }")
    squeezed = next(w for w in page.evaluate(MEASURE)["words"] if w["text"] == "Revoked")
    assert squeezed["broken"] == ["Revoked"] and squeezed["lines"] > 1


# -- accessibility of the new states ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_new_states_have_no_serious_accessibility_violations(browser, server, screen, scheme):
    require_axe()
    email = account(server, screen, f"axe-{scheme}")
    made = seed_keys(server, email)["a rather long name for the office laptop"]
    page, errors = open_page(browser, server, screen, color_scheme=scheme, bypass_csp=True)  # lets axe's script in
    log_in(page, email)
    found: list[tuple[str, str, str, list[str]]] = []

    def check(where: str) -> None:
        found.extend(
            (where, v["id"], v["help"], [" ".join(n["target"]) for n in v["nodes"]])
            for v in axe_violations(page)
            if v["impact"] in ("serious", "critical")
        )

    page.get_by_label("Key name", exact=True).fill(" ")
    page.get_by_role("button", name="Generate key").click()
    expect(page.locator("#key-name-error")).to_be_visible()
    check("/keys, a refused name")
    page.goto(draft_url(page, "/keys", ("name", "ci"), ("ips", "nope"), ("models", "aimichat-1")))
    expect(page.locator("#draft-notice")).to_be_focused()
    check("/keys, a draft")
    page.get_by_role("button", name="Generate key").click()
    expect(page.locator("#new-ips-error")).to_be_visible()
    check("/keys, a refused limit")
    page.goto("/keys?show=revoked")
    check("/keys, revoked keys shown")
    page.goto(f"/keys/{made}")
    page.get_by_label("Key name").fill(" ")
    page.get_by_role("button", name="Rename").click()
    expect(page.locator("#rename-name-error")).to_be_visible()
    check("a key's page, a refused name")
    page.goto(draft_url(page, f"/keys/{made}", ("rpm", "5")))
    expect(page.locator("#draft-notice")).to_be_focused()
    check("a key's page, a draft")
    page.context.close()
    assert found == []
    assert errors == []
