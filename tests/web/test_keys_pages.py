"""The keys pages (issue 17), in-process over HTTP on SQLite and PostgreSQL:

- A key form POSTed after the session lapsed keeps what was typed: the log-in page carries it (never the CSRF
  token) and, after the log-in, the form's page shows it filled in, to be sent again with a fresh token.
  Nothing is made or changed before that; only local key-page addresses come back, bounded in size.
- A refused key form says why next to the field at fault (aria-invalid, aria-describedby, focus).
- The list: active keys first, revoked ones out of the way after a week ("Show revoked keys"), times as
  "3 h ago" with the exact time in the title; rename a key; the new key's card has the export line and the
  OpenAI SDK snippet with this server's base URL, and takes focus.

The rules are called directly; the pages through the real app.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from types import SimpleNamespace
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import pytest
from sqlalchemy import func, select, update
from starlette.datastructures import FormData, QueryParams
from web_helpers import PASSWORD, Browser, chat

from aimichat.audit import service as audit
from aimichat.keys import service as keys
from aimichat.store.clock import utcnow
from aimichat.store.db import Database
from aimichat.store.models import Account, ApiKey, AuditEvent, WebSession
from aimichat.web import auth, key_actions, key_input
from aimichat.web.render import MAX_NEXT, safe_next, time_ago
from conftest import MutableClock, app_client, make_account
from scripted_engine import ScriptedEngine

NOW = dt.datetime(2026, 11, 30, 12, 0, 0)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One app over SQLite for the tests whose database plays no part (each uses its own account)."""
    tmp = tmp_path_factory.mktemp("keys-pages")
    db = Database(f"sqlite:///{tmp / 'aimichat.db'}")
    with app_client(ScriptedEngine(), db, tmp) as client:
        yield client
    db.dispose()


@pytest.fixture
def clocked(database, tmp_path):
    """The app in-process over ``database`` on a clock the test moves, starting at the wall clock (keys are
    stamped with it)."""
    clock = MutableClock(utcnow().replace(microsecond=0))
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as client:
        client.clock = clock
        yield client


def key_count(db, email: str | None = None) -> int:
    """Keys in the database, or of ``email``'s account."""
    query = select(func.count()).select_from(ApiKey)
    if email is not None:
        query = query.join(Account, Account.id == ApiKey.account_id).where(Account.email == email)
    with db.session() as s:
        return s.scalar(query) or 0


def the_key(db, key_id: int) -> ApiKey:
    with db.session() as s:
        return s.get(ApiKey, key_id)


def enter(site, browser: Browser, email: str) -> None:
    """An account made directly, then logged in (the module's one app would hit the sign-up limit)."""
    make_account(site.db, email, password=PASSWORD)
    assert browser.log_in(email).status_code == 303


def field_block(page: str, input_id: str) -> str:
    """The ``<div class="field...">`` holding the input ``input_id``: where its label, error and hint are."""
    for block in re.findall(r'<div class="field[^"]*">.*?</div>', page, re.S):
        if f'id="{input_id}"' in block:
            return block
    raise AssertionError(f"no field {input_id}")


def tag(page: str, element_id: str) -> str:
    match = re.search(rf'<[a-z]+ [^>]*id="{element_id}"[^>]*>', page)
    assert match, element_id
    return match.group(0)


SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}  # what a browser sends with a form of this site
SITE = "https://aimi.example"
KEY = "k" * 43  # a pre-log-in CSRF secret, as long as deps.get_visitor makes them


def unsigned(target: str) -> str:
    """A draft's way back without its stamp and signature, which it must end with."""
    page, _, query = target.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    assert [name for name, _ in pairs[-2:]] == ["at", "sig"], target
    return f"{page}?{urlencode(pairs[:-2])}"


def login_next(location: str) -> tuple[str, str]:
    """(next, reason) of a redirect to the log-in page."""
    parts = urlsplit(location)
    assert parts.path == "/login" and not parts.netloc, location
    query = parse_qs(parts.query)
    return query.get("next", [""])[0], query["reason"][0]


# -- the rules -----------------------------------------------------------------------------------


def form(*pairs: tuple[str, str]) -> FormData:
    return FormData(list(pairs))


def test_a_draft_keeps_the_typed_fields_and_never_the_token():
    typed = form(
        ("csrf_token", "secret-token"),
        ("confirm", "yes"),
        ("grace", "24h"),
        ("name", "laptop"),
        ("daily_cap", "50"),
        ("rpm", ""),
        ("models", "aimichat-1"),
        ("models", "second"),
        ("ips", "203.0.113.0/24"),
    )
    query = key_input.draft_query(typed)
    assert parse_qs(query) == {
        "draft": ["1"],
        "name": ["laptop"],
        "daily_cap": ["50"],
        "models": ["aimichat-1", "second"],
        "ips": ["203.0.113.0/24"],
    }
    assert "token" not in query and "confirm" not in query and "grace" not in query
    back = key_input.LimitsForm.from_form(QueryParams(query))
    assert back == key_input.LimitsForm(daily_cap="50", models=("aimichat-1", "second"), ips="203.0.113.0/24")


@pytest.mark.parametrize(
    "typed",
    [
        (),  # nothing typed
        (("name", "  "),),
        (("ips", "10.0.0.0/8, " * 60),),  # one field longer than any form of the site holds
        tuple(("models", f"model-{n}") for n in range(key_input.MAX_DRAFT_MODELS + 1)),
        tuple((name, "9" * 400) for name in ("name", "daily_cap", "monthly_cap", "rpm", "tpm")),  # too long in all
    ],
)
def test_no_draft_when_nothing_or_too_much_was_typed(typed):
    assert key_input.draft_query(form(*typed)) == ""


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/keys", "/keys?draft=1&name=laptop"),
        ("/keys/7/limits", "/keys/7?draft=1&name=laptop"),
        ("/keys/007/rename", "/keys/7?draft=1&name=laptop"),
        ("/keys/7/revoke", "/keys/7"),  # an action is asked again on the key's page, never carried out
        ("/keys/7/regenerate", "/keys/7"),
        ("/account/password", ""),
        ("/keys/7/limits/extra", ""),
        ("/keys/../admin", ""),
        ("//evil.example/keys", ""),
    ],
)
def test_a_draft_comes_back_only_to_the_key_pages(path, target):
    made = key_input.draft_target(path, form(("name", "laptop")), key=KEY, now=NOW)
    drafted = "draft=1" in target
    assert (unsigned(made) if drafted else made) == target
    assert key_input.is_draft(made) is drafted
    if drafted:
        page, _, query = made.partition("?")
        assert key_input.genuine_draft(page, parse_qsl(query), KEY, NOW) is not None


@pytest.mark.parametrize("key", [None, "", "short"])
def test_without_this_browsers_secret_only_the_page_comes_back(key):
    """No secret to sign with (a POST from another site, a visitor not looked up): the page, nothing typed."""
    assert key_input.draft_target("/keys/7/limits", form(("daily_cap", "0")), key=key, now=NOW) == "/keys/7"


def signed_draft(page: str = "/keys/7", key: str = KEY, now: dt.datetime = NOW, **typed: str) -> list:
    """The parameters of a draft of ``typed`` for ``page``, signed with ``key`` at ``now``."""
    query = key_input.draft_query(form(*(typed or {"daily_cap": "9", "ips": "203.0.113.0/24"}).items()))
    return parse_qsl(key_input.sign_draft(page, query, key, now), keep_blank_values=True)


def replaced(pairs: list, name: str, value: str) -> list:
    return [(n, value if n == name else v) for n, v in pairs]


NOT_GENUINE = [
    ("unsigned", "/keys/7", [("draft", "1"), ("daily_cap", "0")], KEY, NOW),
    ("signed elsewhere", "/keys/7", signed_draft(key="m" * 43), KEY, NOW),
    ("for another key", "/keys/8", signed_draft(), KEY, NOW),
    ("a value edited", "/keys/7", replaced(signed_draft(), "ips", ""), KEY, NOW),
    ("a field added", "/keys/7", [*signed_draft(), ("rpm", "1")], KEY, NOW),
    ("a field dropped", "/keys/7", [p for p in signed_draft() if p[0] != "ips"], KEY, NOW),
    ("restamped", "/keys/7", replaced(signed_draft(), "at", str(int(dict(signed_draft())["at"]) + 60)), KEY, NOW),
    ("a forged signature", "/keys/7", replaced(signed_draft(), "sig", "A" * 43), KEY, NOW),
    ("two signatures", "/keys/7", [*signed_draft(), ("sig", "A" * 43)], KEY, NOW),
    ("a signature not ASCII", "/keys/7", replaced(signed_draft(), "sig", "é" * 43), KEY, NOW),
    ("too old", "/keys/7", signed_draft(), KEY, NOW + key_input.DRAFT_LIFETIME + dt.timedelta(seconds=1)),
    ("from the future", "/keys/7", signed_draft(now=NOW + dt.timedelta(minutes=5)), KEY, NOW),
    ("no secret in this browser", "/keys/7", signed_draft(), None, NOW),
    ("a secret too short", "/keys/7", signed_draft(key="x"), "x", NOW),
]


@pytest.mark.parametrize(("why", "page", "pairs", "key", "now"), NOT_GENUINE, ids=[case[0] for case in NOT_GENUINE])
def test_a_draft_not_signed_here_for_this_page_lately_is_ignored(why, page, pairs, key, now):
    assert key_input.genuine_draft(page, pairs, key, now) is None, why


def test_a_draft_signed_here_comes_back_for_half_an_hour():
    pairs = signed_draft()
    for later in (dt.timedelta(0), dt.timedelta(minutes=29), key_input.DRAFT_LIFETIME):
        fields = key_input.genuine_draft("/keys/7", pairs, KEY, NOW + later)
        assert fields is not None and key_input.LimitsForm.from_form(fields).ips == "203.0.113.0/24"
    shuffled = list(reversed(pairs))  # the order parameters arrive in does not matter
    assert key_input.genuine_draft("/keys/7", shuffled, KEY, NOW) is not None


@pytest.mark.parametrize(
    ("fetch_site", "origin", "ours"),
    [
        ("same-origin", None, True),  # what a browser sends with this site's own form
        ("Same-Origin", "https://evil.example", True),  # Sec-Fetch-Site decides when the browser sent it
        ("cross-site", SITE, False),
        ("same-site", SITE, False),  # a sibling subdomain is another site's form here
        ("none", None, False),
        (None, SITE, True),  # an older browser: its Origin
        (None, "HTTPS://AIMI.EXAMPLE", True),
        (None, "https://evil.example", False),
        (None, "null", False),
        (None, "https://aimi.example.evil.example", False),
        (None, None, False),  # neither: not known to be ours, so no draft
    ],
)
def test_only_this_sites_own_forms_make_a_draft(fetch_site, origin, ours):
    assert auth.from_this_site(fetch_site, origin, frozenset({SITE})) is ours


def test_the_log_in_page_says_the_form_is_kept_in_its_own_words():
    draft = key_input.draft_target("/keys", form(("name", "laptop")), key=KEY, now=NOW)
    assert auth.login_notice(draft, "expired") == (
        "Your session expired before your form was sent. Nothing was changed. "
        "Log in and your form comes back as you typed it, to send again."
    )
    assert auth.login_notice(draft, "login").startswith("Nothing was changed.")
    unsigned_words = "Your session expired. Log in to see your API keys."
    assert auth.login_notice("/keys?draft=1&name=laptop", "expired") == unsigned_words, "no promise without a sig"
    assert auth.login_notice("/keys?draft=0", "expired") == unsigned_words
    assert auth.login_notice("/usage?draft=1&sig=x", "login") == "Log in to see your usage."
    assert auth.login_notice(draft, "made-up") == ""


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example/keys",
        "/\t/evil.example",
        "/\n/evil.example",
        "/keys?" + "a" * MAX_NEXT,
        "keys",
        "",
    ],
)
def test_a_log_in_goes_back_to_local_bounded_paths_only(target):
    assert safe_next(target) == "/keys"


def test_safe_next_keeps_a_draft():
    target = key_input.draft_target("/keys", form(("name", "laptop"), ("ips", "203.0.113.0/24")), key=KEY, now=NOW)
    assert safe_next(target) == target
    biggest = "/keys/1234567890?" + "x" * key_input.MAX_DRAFT_QUERY + "&at=1234567890&sig=" + "A" * 43
    assert len(biggest) <= MAX_NEXT, "the largest draft kept, signed, still fits the log-in's way back"


@pytest.mark.parametrize(
    ("typed", "field"),
    [
        ({"daily_cap": "-1"}, "daily_cap"),
        ({"monthly_cap": "ten"}, "monthly_cap"),
        ({"rpm": "0"}, "rpm"),
        ({"tpm": "99999999999"}, "tpm"),
        ({"expires_in": "0"}, "expires_in"),
        ({"expires_at": "2000-01-01T00:00:00"}, "expires_at"),
        ({"expires_at": "soon"}, "expires_at"),
        ({"models": ("ghost",)}, "models"),
        ({"ips": "10.0.0.0/8, not-a-range"}, "ips"),
    ],
)
def test_a_refused_limit_names_its_field(typed, field):
    with pytest.raises(ValueError) as refused:
        key_input.LimitsForm(**typed).limits(NOW, ["aimichat-1"])
    assert key_input.field_of(refused.value) == field


def test_a_refused_name_names_its_field_and_the_service_rule_holds():
    for bad in ("", "   ", "x" * 101):
        with pytest.raises(ValueError) as refused:
            key_input.key_name(bad)
        assert key_input.field_of(refused.value) == "name"
    assert key_input.key_name("  my   laptop ") == "my laptop"
    assert key_input.field_of(ValueError("the plan allows 1 active key")) is None


def test_old_revoked_keys_leave_the_list_unless_asked_for():
    def key(id: int, revoked_days_ago: float | None) -> SimpleNamespace:
        revoked = None if revoked_days_ago is None else NOW - dt.timedelta(days=revoked_days_ago)
        return SimpleNamespace(id=id, revoked_at=revoked)

    listed = [key(1, None), key(2, 30), key(3, 1), key(4, None), key(5, 6.9), key(6, 7)]
    default = key_actions.key_list(listed, NOW, show_revoked=False)  # type: ignore[arg-type]
    assert [k.id for k in default.keys] == [4, 1, 5, 3], "active first, then revoked within a week; newest first"
    assert default.old_revoked == 2
    everything = key_actions.key_list(listed, NOW, show_revoked=True)  # type: ignore[arg-type]
    assert [k.id for k in everything.keys] == [4, 1, 6, 5, 3, 2]
    assert everything.old_revoked == 2, "what Hide old revoked keys hides"
    recent = key_actions.key_list(listed[2:5], NOW, show_revoked=True)  # type: ignore[arg-type]
    assert recent.old_revoked == 0, "nothing old: no toggle"


@pytest.mark.parametrize(
    ("ago", "words"),
    [
        (dt.timedelta(seconds=-30), "just now"),  # another replica's clock a little ahead
        (dt.timedelta(seconds=59), "just now"),
        (dt.timedelta(minutes=5, seconds=59), "5 min ago"),
        (dt.timedelta(hours=3, minutes=59), "3 h ago"),
        (dt.timedelta(days=1), "1 d ago"),
        (dt.timedelta(days=59, hours=23), "59 d ago"),
        (dt.timedelta(days=60), "2026-10-01"),
    ],
)
def test_times_on_the_keys_list_read_in_one_unit(ago, words):
    assert time_ago(NOW - ago, NOW, coarse=True) == words


# -- a form that meets a lapsed session ------------------------------------------------------------


def draft_notice_has_focus(page: str) -> None:
    """The draft's notice has the page's one autofocus (Enter on it sends nothing), no button has it."""
    assert 'tabindex="-1" autofocus' in tag(page, "draft-notice")
    assert page.count(" autofocus") == 1
    assert not re.search(r"<button[^>]* autofocus", page)


def test_generate_after_the_session_expired_keeps_the_form_through_the_log_in(clocked):
    with Browser(clocked) as b:
        b.sign_up("drafter@example.com")
        b.get("/keys")
        clocked.clock.advance(days=8)  # past the 7 idle days: the session is gone
        typed = {
            "name": "build server",
            "daily_cap": "50",
            "rpm": "30",
            "ips": "203.0.113.0/24",
            "models": "aimichat-1",
        }
        posted = b.post("/keys", typed, headers=SAME_ORIGIN)
        assert posted.status_code == 303 and key_count(clocked.db) == 0, "nothing made without a session"
        location = posted.headers["location"]
        assert "csrf" not in location and b.token not in location, "the old token is not carried"
        target, reason = login_next(location)
        assert reason == "expired"
        assert urlsplit(target).path == "/keys"
        assert parse_qs(urlsplit(unsigned(target)).query) == {"draft": ["1"], **{k: [v] for k, v in typed.items()}}

        login = b.get(location)
        assert login.status_code == 200
        assert f'<input type="hidden" name="next" value="{html.escape(target)}">' in login.text, "the page carries it"
        notice = re.search(r'<p class="alert" role="status" id="login-notice">(.*?)</p>', login.text).group(1)
        assert notice.startswith("Your session expired before your form was sent. Nothing was changed.")

        logged_in = b.post("/login", {"email": "drafter@example.com", "password": PASSWORD, "next": target})
        assert logged_in.status_code == 303 and logged_in.headers["location"] == target
        back = b.get(target)
        assert back.status_code == 200 and key_count(clocked.db) == 0, "the form is back, nothing is made yet"
        assert 'id="draft-notice"' in back.text
        assert 'value="build server"' in tag(back.text, "key-name")
        assert 'value="50"' in tag(back.text, "new-daily-cap") and 'value="30"' in tag(back.text, "new-rpm")
        assert 'value="203.0.113.0/24"' in tag(back.text, "new-ips")
        assert re.search(r'value="aimichat-1" checked', back.text)
        assert '<details class="limits" open>' in back.text
        draft_notice_has_focus(back.text)

        clocked.clock.advance(minutes=31)  # the same link, half an hour on: the plain page
        stale = b.get(target).text
        assert 'id="draft-notice"' not in stale and 'value="build server"' not in stale

        made = b.follow(b.post("/keys", typed))  # sent again by the person, with the new session's token
        key_id = int(re.search(r'data-shown-id="(\d+)"', made.text).group(1))
    key = the_key(clocked.db, key_id)
    assert (key.name, key.daily_cap, key.rpm, key.ips, key.models) == (
        "build server",
        50,
        30,
        ["203.0.113.0/24"],
        ["aimichat-1"],
    )


def test_a_form_from_a_browser_logged_out_elsewhere_is_kept_too(server):
    with Browser(server) as b:
        b.sign_up("elsewhere@example.com")
        b.get("/keys")
        with server.db.session() as s:  # logged out from another browser (or by a password change)
            s.execute(WebSession.__table__.delete())
            s.commit()
        b.http.cookies.clear()  # and this browser no longer sends a session cookie, nor its pre-log-in secret
        # An older browser says where the form came from with Origin alone (no Sec-Fetch-Site).
        posted = b.post("/keys", {"name": "kept", "csrf_token": "old"}, csrf=False, headers={"Origin": server.url})
        target, reason = login_next(posted.headers["location"])
        assert (unsigned(target), reason) == ("/keys?draft=1&name=kept", "login")
        assert b.http.cookies.get("aimichat_csrf"), "the new secret the draft is signed with reaches the browser"
        login = b.get(posted.headers["location"])
        assert "Nothing was changed. Log in and your form comes back as you typed it" in login.text
        b.post("/login", {"email": "elsewhere@example.com", "password": PASSWORD, "next": target})
        back = b.get(target).text
        assert 'value="kept"' in tag(back, "key-name")
        draft_notice_has_focus(back)
    assert key_count(server.db) == 0


def test_key_page_forms_come_back_filled_in_and_actions_are_asked_again(clocked):
    with Browser(clocked) as b:
        b.sign_up("keypage@example.com")
        key_id, secret = b.generate_key("ci", daily_cap="5")
        b.get(f"/keys/{key_id}")
        clocked.clock.advance(days=8)

        limits = b.post(f"/keys/{key_id}/limits", {"daily_cap": "9", "rpm": "12"}, headers=SAME_ORIGIN)
        target, _ = login_next(limits.headers["location"])
        assert unsigned(target) == f"/keys/{key_id}?draft=1&daily_cap=9&rpm=12"
        renamed = b.post(f"/keys/{key_id}/rename", {"name": "ci runner"}, headers=SAME_ORIGIN)
        rename_target = login_next(renamed.headers["location"])[0]
        assert unsigned(rename_target) == f"/keys/{key_id}?draft=1&name=ci+runner"
        for action in ("revoke", "regenerate"):
            asked = b.post(f"/keys/{key_id}/{action}", {"confirm": "yes", "grace": "24h"}, headers=SAME_ORIGIN)
            assert login_next(asked.headers["location"])[0] == f"/keys/{key_id}", "the key's page, no action"

        b.get(limits.headers["location"])
        back = b.post("/login", {"email": "keypage@example.com", "password": PASSWORD, "next": target})
        assert back.status_code == 303 and back.headers["location"] == target
        page = b.get(target).text
        assert 'value="9"' in tag(page, "edit-daily-cap") and 'value="12"' in tag(page, "edit-rpm")
        draft_notice_has_focus(page)
        notice_at = page.index('id="draft-notice"')
        assert page.index('id="limits-title"') < notice_at < page.index(f'action="/keys/{key_id}/limits"')
        assert "press “Save limits”" in page
        rename_page = b.get(rename_target).text
        assert 'value="ci runner"' in tag(rename_page, "rename-name")
        assert 'value="5"' in tag(rename_page, "edit-daily-cap"), "a rename draft leaves the limits as they are"
        draft_notice_has_focus(rename_page)
        assert rename_page.index('id="draft-notice"') < rename_page.index(f'action="/keys/{key_id}/rename"')
        assert "press “Rename”" in rename_page
        other = b.get(target.replace(f"/keys/{key_id}?", f"/keys/{key_id + 1}?"))
        assert other.status_code == 404, "another key's page (none here) is no way around the signature"
    key = the_key(clocked.db, key_id)
    assert (key.name, key.daily_cap, key.rpm, key.revoked_at) == ("ci", 5, None, None), "nothing changed"
    assert chat(clocked, secret).status_code == 200


def test_a_draft_too_large_is_dropped_and_a_crafted_one_makes_nothing(site):
    with Browser(site) as b:
        enter(site, b, "large@example.com")
        b.get("/keys")
        b.http.cookies.delete("aimichat_session")
        big = {"name": "big", "ips": "10.0.0.0/8, " * 60, "csrf_token": "x"}
        posted = b.post("/keys", big, csrf=False, headers=SAME_ORIGIN)
        assert login_next(posted.headers["location"])[0] == "/keys", "the page, without a part of the form"
        crafted = "/login?next=" + "/keys%3Fdraft%3D1%26name%3D" + "a" * 3000 + "&reason=expired"
        page = b.get(crafted).text
        assert 'name="next"' not in page, "an over-long way back is dropped"
        for bad in ("//evil.example/keys", "https://evil.example", "/\\evil.example"):
            assert 'name="next"' not in b.get("/login", params={"next": bad}).text
        b.log_in("large@example.com")
        filled = b.get("/keys?draft=1&name=phished&daily_cap=0")  # a crafted link fills nothing in
        assert filled.status_code == 200 and 'value="phished"' not in filled.text
        assert 'id="draft-notice"' not in filled.text
    assert key_count(site.db, "large@example.com") == 0


# -- drafts somebody else made ---------------------------------------------------------------------


def victims_key(site, b: Browser, email: str) -> int:
    """``email`` logged in in ``b``, with a key capped at 5 a day and allowed from one range only."""
    enter(site, b, email)
    key_id, _ = b.generate_key("prod", daily_cap="5", ips="203.0.113.0/24")
    return key_id


def shows_no_draft(page: str) -> None:
    assert 'id="draft-notice"' not in page
    assert 'value="5"' in tag(page, "edit-daily-cap") and 'value="203.0.113.0/24"' in tag(page, "edit-ips")


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},  # a current browser
        {"Origin": "https://evil.example"},  # an older one
        {},  # one that says neither
        {"Sec-Fetch-Site": "same-site", "Origin": "https://other.127.0.0.1:8000"},  # a sibling site
    ],
)
def test_another_sites_form_never_comes_back_filled_in(site, headers):
    """The reviewer's chain: another site auto-submits "Save limits" with a zero cap and no IP ranges. The
    browser sends it without the SameSite=Lax cookies (so it looks logged out), then follows the redirect to
    the log-in page with them, which forwards the logged-in victim: the key's page must be the plain one."""
    with Browser(site) as b:
        key_id = victims_key(site, b, f"victim-{len(headers)}-{'same-site' in str(headers)}@example.com")
        with site.client() as cookieless:  # the cross-site POST: no session cookie, no pre-log-in secret
            forged = cookieless.post(f"/keys/{key_id}/limits", data={"daily_cap": "0"}, headers=headers)
        assert forged.status_code == 303
        b.http.cookies.update(forged.cookies)  # a top-level navigation's answer may set a Lax cookie, as this one
        target, _ = login_next(forged.headers["location"])
        assert target == f"/keys/{key_id}", "the key's page, with nothing typed"
        forwarded = b.get(forged.headers["location"])  # the victim's browser, logged in, follows
        assert forwarded.status_code == 303 and forwarded.headers["location"] == target
        shows_no_draft(b.get(target).text)
    assert the_key(site.db, key_id).ips == ["203.0.113.0/24"]


def test_a_draft_signed_in_another_browser_is_ignored(site):
    """Outside a browser anybody can send a same-origin Origin and get a signed draft: it is signed with
    their own pre-log-in secret, so in the victim's browser the link shows the plain page."""
    with Browser(site) as b:
        key_id = victims_key(site, b, "victim-link@example.com")
        with Browser(site) as attacker:
            attacker.get("/login")
            minted = attacker.post(
                f"/keys/{key_id}/limits",
                {"daily_cap": "0", "csrf_token": "x"},
                csrf=False,
                headers={"Origin": site.url},
            )
        link = minted.headers["location"]
        target, _ = login_next(link)
        assert key_input.is_draft(target), "the attacker did get a signed draft, for their own browser"
        assert b.get(link).headers["location"] == target
        shows_no_draft(b.get(target).text)
        for forged in (
            f"/keys/{key_id}?draft=1&daily_cap=0",  # unsigned
            f"/keys/{key_id}?draft=1&daily_cap=0&at=9999999999&sig={'A' * 43}",  # a made-up signature
        ):
            shows_no_draft(b.get(forged).text)
    assert the_key(site.db, key_id).ips == ["203.0.113.0/24"]


# -- errors next to the field --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "input_id", "message"),
    [
        ({"name": "   "}, "key-name", "A key needs a name."),
        ({"name": "x" * 101}, "key-name", "Key names are at most 100 characters."),
        ({"daily_cap": "-1"}, "new-daily-cap", "The daily cap cannot be negative."),
        ({"rpm": "0"}, "new-rpm", "Requests per minute must be at least 1."),
        ({"expires_in": "0"}, "new-expires-in", "A key expires in 1 to"),
        ({"expires_at": "2000-01-01T00:00:00"}, "new-expires-at", "The expiry must be in the future."),
        ({"ips": "nope"}, "new-ips", "Not an IP range (CIDR)"),
    ],
)
def test_a_refused_key_form_says_why_next_to_the_field(site, typed, input_id, message):
    with Browser(site) as b:
        email = f"field-{input_id}-{len(message)}@example.com"
        enter(site, b, email)
        b.get("/keys")
        refused = b.post("/keys", {"name": "laptop", **typed})
        assert refused.status_code == 400
        page = refused.text
        block = field_block(page, input_id)
        error_id = f"{input_id}-error"
        assert re.search(
            rf'<p class="alert error field-error" id="{error_id}" role="alert">{re.escape(message)}', block
        )
        field = tag(page, input_id)
        assert 'aria-invalid="true"' in field and f'aria-describedby="{error_id} {input_id}-hint"' in field
        assert " autofocus" in field and page.count(" autofocus") == 1, "the field at fault has focus"
        assert page.count('role="alert"') == 1, "said once, at the field"
        for value in typed.values():
            if value.strip():
                assert f'value="{value}"' in field, "what was typed stays"
    assert key_count(site.db, email) == 0


def test_a_model_not_offered_is_refused_at_the_models(site):
    with Browser(site) as b:
        enter(site, b, "models-field@example.com")
        b.get("/keys")
        page = b.post("/keys", {"name": "x", "models": "ghost"}).text
        fieldset = re.search(r"<fieldset.*?</fieldset>", page, re.S).group(0)
        assert 'aria-describedby="new-models-error new-models-hint"' in fieldset
        assert 'id="new-models-error"' in fieldset and "No model named ghost" in fieldset
        assert 'aria-invalid="true" autofocus' in fieldset


def test_a_refusal_of_the_whole_form_stays_at_the_top(server):
    with server.db.session() as s:
        from aimichat.accounts import service as accounts

        accounts.set_tier_limits(s, "free", max_keys=1)
        s.commit()
    with Browser(server) as b:
        b.sign_up("one-key@example.com")
        b.generate_key("only")
        page = b.post("/keys", {"name": "second"}).text
        assert re.search(r'<p class="alert error" role="alert">The free plan allows 1 active keys', page)
        assert "aria-invalid" not in page and "field-error" not in page


def test_the_edit_form_says_why_next_to_the_field(site):
    with Browser(site) as b:
        enter(site, b, "edit-field@example.com")
        key_id, _ = b.generate_key("edited", rpm="10")
        b.get(f"/keys/{key_id}")
        refused = b.post(f"/keys/{key_id}/limits", {"rpm": "0", "daily_cap": "4"})
        assert refused.status_code == 400
        field = tag(refused.text, "edit-rpm")
        assert 'aria-invalid="true"' in field and 'aria-describedby="edit-rpm-error edit-rpm-hint"' in field
        assert "Requests per minute must be at least 1." in field_block(refused.text, "edit-rpm")
        assert 'value="4"' in tag(refused.text, "edit-daily-cap"), "what was typed stays"
    assert the_key(site.db, key_id).rpm == 10


# -- the list ------------------------------------------------------------------------------------


def test_show_revoked_keys(site):
    with Browser(site) as b:
        enter(site, b, "revoker@example.com")
        old_id, _ = b.generate_key("old")
        recent_id, _ = b.generate_key("recent")
        live_id, _ = b.generate_key("live")
        for key_id in (old_id, recent_id):
            b.post(f"/keys/{key_id}/revoke", {"confirm": "yes"})
        ten_days_ago = utcnow() - dt.timedelta(days=10)
        with site.db.session() as s:
            s.execute(update(ApiKey).where(ApiKey.id == old_id).values(revoked_at=ten_days_ago))
            s.commit()

        def rows(page: str) -> list[int]:
            return [int(i) for i in re.findall(r'<tr class="\w+" data-key-id="(\d+)">', page)]

        default = b.get("/keys").text
        assert rows(default) == [live_id, recent_id], "a key revoked this week stays in view"
        assert '<a href="/keys?show=revoked" id="revoked-toggle">Show revoked keys (1)</a>' in default
        assert "Revoked keys leave this list 7 days after they are revoked." in default
        everything = b.get("/keys?show=revoked").text
        assert rows(everything) == [live_id, recent_id, old_id], "active first, newest first"
        assert '<a href="/keys" id="revoked-toggle">Hide old revoked keys</a>' in everything
        b.post(f"/keys/{live_id}/revoke", {"confirm": "yes"})
        with site.db.session() as s:
            mine = ApiKey.id.in_([old_id, recent_id, live_id])
            s.execute(update(ApiKey).where(mine).values(revoked_at=ten_days_ago))
            s.commit()
        empty = b.get("/keys").text
        assert rows(empty) == [] and "No active keys." in empty and "Show revoked keys (3)" in empty


def test_times_read_as_how_long_ago_with_the_exact_time_in_the_title(site):
    with Browser(site) as b:
        enter(site, b, "times@example.com")
        key_id, _ = b.generate_key("timed")
        now = utcnow().replace(microsecond=0)
        created, used = now - dt.timedelta(days=3, hours=2), now - dt.timedelta(hours=3, minutes=5)
        with site.db.session() as s:
            s.execute(update(ApiKey).where(ApiKey.id == key_id).values(created_at=created, last_used_at=used))
            s.commit()
        row = re.search(rf'data-key-id="{key_id}">(.*?)</tr>', b.get("/keys").text, re.S).group(1)
    assert (
        f'<time datetime="{created:%Y-%m-%dT%H:%M:%SZ}" title="{created:%Y-%m-%d %H:%M} UTC" data-local-title>'
        "3 d ago</time>"
    ) in row
    assert f'title="{used:%Y-%m-%d %H:%M} UTC" data-local-title>3 h ago</time>' in row


def test_the_new_key_card_has_the_export_line_and_the_openai_snippet_and_takes_focus(site):
    with Browser(site) as b:
        enter(site, b, "snippets@example.com")
        page = b.follow(b.post("/keys", {"name": "sdk"})).text
        secret = re.search(r'<code id="new-key">([^<]+)</code>', page).group(1)
    assert f'<code id="try-env">export AIMICHAT_API_KEY={secret}</code>' in page
    python = html.unescape(re.search(r'<code id="try-python">(.*?)</code>', page, re.S).group(1))
    assert f'client = OpenAI(base_url="{site.url}/v1", api_key=os.environ["AIMICHAT_API_KEY"])' in python
    assert 'model="aimichat-1"' in python and secret not in python, "the key comes from the environment"
    compile(python, "snippet.py", "exec")  # valid Python as shown
    card = tag(page, "new-key-card")
    assert 'tabindex="-1"' in card and " autofocus" in card and page.count(" autofocus") == 1


# -- rename --------------------------------------------------------------------------------------


def test_rename_a_key_keeps_its_secret_usage_and_history(server):
    with Browser(server) as b:
        b.sign_up("renamer@example.com")
        key_id, secret = b.generate_key("old name", daily_cap="20")
        assert chat(server, secret).status_code == 200
        with server.db.session() as s:
            account_id = the_key(server.db, key_id).account_id
            before = {u.id: u.credits for u in keys.use_by_key(s, account_id, utcnow().date())}
        b.get(f"/keys/{key_id}")
        done = b.post(f"/keys/{key_id}/rename", {"name": "  new   name "})
        assert done.status_code == 303 and done.headers["location"] == f"/keys/{key_id}?renamed=1"
        page = b.get(done.headers["location"]).text
        assert 'id="renamed"' in page and '<h1 id="key-title">Key “new name”</h1>' in page
        assert ">new name</a>" in b.get("/keys").text
        same = b.post(f"/keys/{key_id}/rename", {"name": "new name"})
        assert same.headers["location"] == f"/keys/{key_id}", "unchanged: nothing to say, nothing recorded"
    assert chat(server, secret).status_code == 200, "the same secret works"
    with server.db.session() as s:
        key = s.get(ApiKey, key_id)
        assert (key.name, key.daily_cap) == ("new name", 20)
        after = {u.id: (u.name, u.credits) for u in keys.use_by_key(s, account_id, utcnow().date())}
        assert before[key_id] == 1 and after[key_id] == ("new name", 2), "use before and after adds up on one key"
        events = audit.list_events(s, target=f"key:{key_id}").events
        actions = [(e.action, e.detail) for e in reversed(events)]
        assert actions[0][0] == "key.created" and actions[0][1]["name"] == "old name", "history unchanged"
        renames = [d for a, d in actions if a == "key.renamed"]
        assert renames == [{"account_id": account_id, "from": "old name", "to": "new name"}]
        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "key.renamed")) == 1


def test_rename_follows_the_name_rules_and_the_key_rules(site):
    with Browser(site) as b:
        enter(site, b, "rename-rules@example.com")
        key_id, _ = b.generate_key("kept")
        b.get(f"/keys/{key_id}")
        for bad, message in (("   ", "A key needs a name."), ("y" * 101, "Key names are at most 100 characters.")):
            refused = b.post(f"/keys/{key_id}/rename", {"name": bad})
            assert refused.status_code == 400
            block = field_block(refused.text, "rename-name")
            assert f'<p class="alert error field-error" id="rename-name-error" role="alert">{message}</p>' in block
            field = tag(refused.text, "rename-name")
            assert 'aria-invalid="true"' in field and 'aria-describedby="rename-name-error rename-name-hint"' in field
            assert " autofocus" in field
        assert b.post(f"/keys/{key_id}/rename", {"name": "x", "csrf_token": "forged"}, csrf=False).status_code == 403
        assert b.post("/keys/999999/rename", {"name": "x"}).status_code == 404
        b.post(f"/keys/{key_id}/revoke", {"confirm": "yes"})
        assert "rename-name" not in b.get(f"/keys/{key_id}").text, "a revoked key offers no rename"
        assert b.post(f"/keys/{key_id}/rename", {"name": "revived"}).status_code == 409
    with Browser(site) as other:
        enter(site, other, "other-renamer@example.com")
        other.get("/keys")
        assert other.post(f"/keys/{key_id}/rename", {"name": "mine now"}).status_code == 404
    assert the_key(site.db, key_id).name == "kept"
