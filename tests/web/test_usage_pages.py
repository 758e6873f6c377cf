"""The usage page's 30-day history per key and its recent requests, on SQLite and PostgreSQL.

- The data functions directly: 30 UTC days per key (credits, requests, tokens), the window's first and last
  day, several keys, revoked keys still listed while their use is in the window, the playground; pages of
  ledger rows newest first (keyset: no row twice or missed, ties on the time broken by id), by key.
- The page over HTTP: the chart's metric switch (plain links, so it works without JavaScript), the key
  chosen, "Older"/"Newer" pages, another account's requests and keys never shown, bad parameters a 400
  page that leads back to Usage (never a 500), the CSV's error page too, times shown relative with the
  UTC time in the title.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterator

import pytest
from web_helpers import PASSWORD, Browser, chat

from aimichat.accounts import service as accounts
from aimichat.keys import service as keys
from aimichat.quota import history
from aimichat.store.db import Database
from aimichat.store.models import UsageEvent
from aimichat.web import usage_data
from aimichat.web.render import time_ago
from aimichat.web.usage_data import Totals
from conftest import AppClient, MutableClock, app_client, make_account
from scripted_engine import ScriptedEngine

NOW = dt.datetime(2026, 3, 15, 12, 0, 0)
TODAY = NOW.date()
FIRST = TODAY - dt.timedelta(days=29)  # the 30-day window's first day


def add_key(db: Database, email: str, name: str, *, revoked: bool = False) -> int:
    with db.session() as s:
        created = keys.create_key(s, accounts.get_account(s, email), name)
        if revoked:
            keys.revoke_key(s, created.key.id)
        s.commit()
        return created.key.id


_serial = iter(range(1, 1_000_000))


def ledger_row(
    db: Database,
    account_id: int,
    key_id: int | None,
    at: dt.datetime,
    *,
    credits: int = 1,
    prompt: int = 0,
    completion: int = 0,
    status: str = "charged",
    model: str | None = "aimichat-1",
) -> int:
    """One ledger row as a settled request leaves it (its day is its UTC day); returns its id."""
    with db.session() as s:
        event = UsageEvent(
            request_id=f"req-{next(_serial)}",
            account_id=account_id,
            api_key_id=key_id,
            created_at=at,
            day=at.date(),
            reserved_credits=credits,
            credits=credits,
            prompt_tokens=prompt,
            completion_tokens=completion,
            status=status,
            model=model,
        )
        s.add(event)
        s.commit()
        return event.id


def on(day: dt.date, hour: int = 12, minute: int = 0, second: int = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour, minute, second))


# -- the data functions --------------------------------------------------------------------------


def test_key_history_per_day_per_key_over_30_utc_days(database):
    me = make_account(database, "me@example.com")
    other = make_account(database, "other@example.com")
    laptop = add_key(database, "me@example.com", "laptop")
    idle = add_key(database, "me@example.com", "idle")  # live, never used: listed with zeros
    old = add_key(database, "me@example.com", "old", revoked=True)  # revoked, used in the window: listed
    gone = add_key(database, "me@example.com", "gone", revoked=True)  # revoked, used only before: not listed
    theirs = add_key(database, "other@example.com", "theirs")

    ledger_row(database, me, laptop, on(TODAY, 0, 0, 0), credits=3, prompt=10, completion=5)  # today's first second
    ledger_row(database, me, laptop, on(TODAY, 9), credits=2, prompt=1, completion=1)
    ledger_row(database, me, laptop, on(TODAY - dt.timedelta(days=1), 23, 59, 59), credits=4)  # yesterday's last
    ledger_row(database, me, laptop, on(TODAY, 10), credits=0, status="released")  # counted as a request
    ledger_row(database, me, old, on(FIRST, 0, 0, 0), credits=7, prompt=100, completion=20)  # the window's first day
    ledger_row(database, me, old, on(FIRST - dt.timedelta(days=1), 23, 59, 59), credits=50)  # one day too early
    ledger_row(database, me, gone, on(FIRST - dt.timedelta(days=3)), credits=9)
    ledger_row(database, me, None, on(TODAY - dt.timedelta(days=2)), credits=5, prompt=3, completion=4)  # playground
    ledger_row(database, me, laptop, on(TODAY, 11), credits=6, model="other-model")  # models are summed
    ledger_row(database, other, theirs, on(TODAY), credits=1000)

    with database.session() as s:
        found = usage_data.key_history(s, me, TODAY, 30)

    assert [(h.key_id, h.name, h.revoked) for h in found] == [
        (laptop, "laptop", False),
        (idle, "idle", False),
        (old, "old", True),
        (None, "Playground", False),
    ]
    for h in found:
        assert [d for d, _ in h.days] == [FIRST + dt.timedelta(days=i) for i in range(30)]
    by = {h.name: dict(h.days) for h in found}
    assert by["laptop"][TODAY] == Totals(credits=11, requests=4, tokens=17)
    assert by["laptop"][TODAY - dt.timedelta(days=1)] == Totals(credits=4, requests=1, tokens=0)
    assert by["old"][FIRST] == Totals(credits=7, requests=1, tokens=120)
    assert by["Playground"][TODAY - dt.timedelta(days=2)] == Totals(credits=5, requests=1, tokens=7)
    assert all(t == Totals() for t in by["idle"].values())
    assert [h.total for h in found] == [Totals(15, 5, 17), Totals(), Totals(7, 1, 120), Totals(5, 1, 7)]
    assert [h.choice for h in found] == [str(laptop), str(idle), str(old), "playground"]

    summed = usage_data.all_keys(found, TODAY, 30)
    assert sum((t for _, t in summed), Totals()) == Totals(27, 7, 144), "another account's 1000 are not in it"
    assert dict(summed)[TODAY] == Totals(11, 4, 17) and dict(summed)[FIRST] == Totals(7, 1, 120)
    assert usage_data.all_keys([], TODAY, 30) == [(d, Totals()) for d in by["idle"]]


def test_a_new_account_has_no_history_and_an_empty_page(database):
    me = make_account(database, "me@example.com")
    with database.session() as s:
        assert usage_data.key_history(s, me, TODAY, 30) == []
        assert history.request_page(s, me, FIRST) == history.RequestPage([], None, None)


def test_request_pages_walk_every_row_once_newest_first(database):
    me = make_account(database, "me@example.com")
    other = make_account(database, "other@example.com")
    laptop = add_key(database, "me@example.com", "laptop")
    theirs = add_key(database, "other@example.com", "theirs")
    mine = []
    for i in range(120):
        # Three rows share each second (ties are broken by id), and the other account writes in between.
        at = on(TODAY, 8) + dt.timedelta(seconds=i // 3)
        mine.append(ledger_row(database, me, laptop if i % 4 else None, at))
        if i % 10 == 0:
            ledger_row(database, other, theirs, at)
    ledger_row(database, me, laptop, on(FIRST - dt.timedelta(days=1)))  # outside the window: never listed
    newest_first = list(reversed(mine))
    their_row = ledger_row(database, other, theirs, on(TODAY, 9))

    with database.session() as s:
        pages, before = [], None
        while True:
            page = history.request_page(s, me, FIRST, before=before)
            pages.append(page)
            if page.older is None:
                break
            before = page.older
        assert [len(p.rows) for p in pages] == [50, 50, 20]
        assert [r.id for p in pages for r in p.rows] == newest_first
        assert pages[0].newer is None and pages[1].newer == pages[1].rows[0].id and pages[2].older is None
        times = [(r.created_at, r.id) for p in pages for r in p.rows]
        assert times == sorted(times, reverse=True)

        # "Newer" from the last page is the middle page again; from the middle page, the first page.
        assert history.request_page(s, me, FIRST, after=pages[2].newer) == pages[1]
        assert history.request_page(s, me, FIRST, after=pages[1].newer) == pages[0]

        # One key's rows, and the playground's (rows without a key).
        by_key = history.request_page(s, me, FIRST, key=laptop, size=200)
        assert [r.id for r in by_key.rows] == [i for n, i in enumerate(mine) if n % 4][::-1]
        assert {r.key_name for r in by_key.rows} == {"laptop"}
        playground = history.request_page(s, me, FIRST, key="playground", size=200)
        assert [r.id for r in playground.rows] == [i for n, i in enumerate(mine) if n % 4 == 0][::-1]
        assert {(r.key_id, r.key_name) for r in playground.rows} == {(None, None)}

        # A page anchored on another account's row (or on no row) does not exist.
        for cursor in (their_row, 10**9):
            with pytest.raises(history.UnknownCursor):
                history.request_page(s, me, FIRST, before=cursor)
            with pytest.raises(history.UnknownCursor):
                history.request_page(s, me, FIRST, after=cursor)


def test_a_request_row_says_what_the_table_shows(database):
    me = make_account(database, "me@example.com")
    old = add_key(database, "me@example.com", "old", revoked=True)
    ledger_row(database, me, old, on(TODAY, 9), credits=3, prompt=12, completion=30, model=None)
    with database.session() as s:
        (row,) = history.request_page(s, me, FIRST).rows
    assert (row.key_name, row.key_revoked, row.model, row.status) == ("old", True, "aimichat-1", "charged")
    assert (row.tokens, row.credits, row.created_at) == (42, 3, on(TODAY, 9))
    assert row.key_prefix and row.key_prefix.startswith("aimichat_")


def test_parse_query():
    q = usage_data.parse_query
    assert q(None, None, None, None) == usage_data.UsageQuery("credits", None, None, None)
    assert q("", "", "", "") == usage_data.UsageQuery()
    assert q("tokens", "12", "345", None) == usage_data.UsageQuery("tokens", "12", 345, None)
    assert q("requests", "playground", None, "7") == usage_data.UsageQuery("requests", "playground", None, 7)
    assert q(None, None, str(2**31 - 1), None).before == 2**31 - 1


@pytest.mark.parametrize(
    "metric, key, before, after, word",
    [
        ("Credits", None, None, None, "metric"),
        ("cost", None, None, None, "metric"),
        (None, "abc", None, None, "key"),
        (None, "-1", None, None, "key"),
        (None, "0", None, None, "key"),
        (None, "1e3", None, None, "key"),
        (None, str(2**31), None, None, "key"),
        (None, None, "x", None, "before"),
        (None, None, "0", None, "before"),
        (None, None, "-5", None, "before"),
        (None, None, "99999999999999999999", None, "before"),
        (None, None, None, " 5", "after"),
        (None, None, "5", "6", "not both"),
    ],
)
def test_parse_query_refuses_what_it_cannot_serve(metric, key, before, after, word):
    with pytest.raises(usage_data.BadQuery, match=word):
        usage_data.parse_query(metric, key, before, after)


def test_query_urls_keep_the_view_and_leave_defaults_out():
    assert usage_data.UsageQuery().url() == "/usage"
    q = usage_data.UsageQuery("tokens", "3", before=40)
    assert q.url() == "/usage?metric=tokens&key=3&before=40"
    assert q.url(before=None, after=9, anchor="requests") == "/usage?metric=tokens&key=3&after=9#requests"
    assert q.url(metric="credits", key=None, before=None) == "/usage"


@pytest.mark.parametrize(
    "ago, words",
    [
        (dt.timedelta(seconds=-30), "just now"),
        (dt.timedelta(seconds=59), "just now"),
        (dt.timedelta(minutes=5, seconds=10), "5 min ago"),
        (dt.timedelta(hours=3, minutes=12), "3 h 12 min ago"),
        (dt.timedelta(days=2, hours=5, minutes=1), "2 d 5 h ago"),
    ],
)
def test_time_ago(ago, words):
    assert time_ago(NOW - ago, NOW) == words


def test_amount_says_the_unit():
    assert usage_data.amount(1, "credits") == "1 credit"
    assert usage_data.amount(1204, "tokens") == "1,204 tokens"
    assert usage_data.amount(0, "requests") == "0 requests"


# -- the page over HTTP --------------------------------------------------------------------------


@pytest.fixture
def clocked(database, tmp_path) -> Iterator[AppClient]:
    """The app in-process over ``database`` at ``NOW`` (``.clock`` moves it)."""
    clock = MutableClock(NOW)
    with app_client(ScriptedEngine(), database, tmp_path, clock=clock) as client:
        client.clock = clock  # type: ignore[attr-defined]
        yield client


def logged_in(server: AppClient, email: str) -> tuple[Browser, int]:
    account_id = make_account(server.db, email, daily=100_000, password=PASSWORD)
    b = Browser(server)
    assert b.log_in(email).status_code == 303
    return b, account_id


def section(page: str, ident: str) -> str:
    match = re.search(rf'<section [^>]*id="{ident}">(.*?)</section>', page, re.S)
    assert match, f"no section {ident}"
    return match.group(1)


def chart_title(page: str) -> str:
    return html.unescape(re.search(r'<title id="chart-title">(.*?)</title>', page).group(1))


def chart_desc(page: str) -> str:
    return html.unescape(re.search(r'<desc id="chart-desc">(.*?)</desc>', page).group(1))


def request_ids(page: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-request-id="(\d+)"', page)]


def link(page: str, text: str) -> str | None:
    match = re.search(rf'<a [^>]*href="([^"]+)"[^>]*>{text}</a>', page)
    return html.unescape(match.group(1)) if match else None


def test_the_chart_switches_between_credits_requests_and_tokens(clocked):
    b, me = logged_in(clocked, "me@example.com")
    laptop_id, laptop = b.generate_key("laptop")
    _, server_key = b.generate_key("server")
    for key in (laptop, laptop, server_key):
        assert chat(clocked, key).status_code == 200
    with clocked.db.session() as s:
        rows = s.query(UsageEvent).filter_by(account_id=me).all()
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    credits = sum(r.credits for r in rows)
    assert tokens > 0 and len(rows) == 3

    page = b.get("/usage").text
    assert chart_title(page) == "Credits per day over the last 30 days, all keys"
    assert chart_desc(page).startswith(f"{credits} credits in total")
    # Plain links (no script needed), the current one marked, each landing on the chart.
    assert link(page, "Requests") == "/usage?metric=requests#history"
    assert link(page, "Tokens") == "/usage?metric=tokens#history"
    assert re.search(r'<a href="/usage#history" aria-current="true">Credits</a>', page)

    page = b.get("/usage?metric=requests").text
    assert chart_title(page) == "Requests per day over the last 30 days, all keys"
    assert chart_desc(page).startswith("3 requests in total")
    assert re.search(r'aria-current="true">Requests</a>', page)
    assert len(re.findall(r'<rect class="bar', page)) == 30
    today_bar = re.findall(r'<rect class="bar[^"]*today"[^>]*><title>(.*?)</title>', page)
    assert today_bar == [f"{TODAY.strftime('%a %d %b')}: 3 requests"]

    page = b.get("/usage?metric=tokens").text
    assert chart_desc(page).startswith(f"{tokens:,} tokens in total")
    # The table equivalent has every metric for every day, newest day first.
    table = re.search(r'<table class="compact history-days">.*?</table>', page, re.S).group(0)
    first_row = re.search(r"<tbody><tr>(.*?)</tr>", table, re.S).group(1)
    assert TODAY.strftime("%a %d %b %Y") in first_row
    cells = re.findall(r'<td class="num( other-metric)?">([\d,]+)</td>', first_row)
    assert [value for _, value in cells] == [str(credits), "3", f"{tokens:,}"]
    # On phones only the chart's metric stays (the stylesheet hides the cells marked other-metric).
    assert [bool(other) for other, _ in cells] == [True, True, False]
    assert table.count("<tr>") == 31  # the head and 30 days

    # One key's history: the chart, the heading and the requests are that key's; the metric stays.
    key_link = re.search(rf'<tr data-key="{laptop_id}".*?<a href="([^"]+)"', page, re.S).group(1)
    assert html.unescape(key_link) == f"/usage?metric=tokens&key={laptop_id}#history"
    page = b.get(f"/usage?metric=requests&key={laptop_id}").text
    assert chart_title(page) == "Requests per day over the last 30 days, laptop"
    assert chart_desc(page).startswith("2 requests in total")
    assert len(request_ids(page)) == 2
    assert link(page, "Show all keys") == "/usage?metric=requests#history"


def test_recent_requests_page_by_50_with_older_and_newer_links(clocked):
    b, me = logged_in(clocked, "me@example.com")
    key_id, _ = b.generate_key("laptop")
    ids = [ledger_row(clocked.db, me, key_id, NOW - dt.timedelta(minutes=5 * i)) for i in range(60)]  # newest first
    ledger_row(clocked.db, me, key_id, on(FIRST - dt.timedelta(days=1)))  # before the window

    first = b.get("/usage").text
    assert request_ids(first) == ids[:50]
    assert link(section(first, "requests"), "Newer") is None
    older = link(first, "Older")
    assert older == f"/usage?before={ids[49]}#requests"

    second = b.get(older).text
    assert request_ids(second) == ids[50:]
    assert link(second, "Older") is None
    newer = link(second, "Newer")
    assert newer == f"/usage?after={ids[50]}#requests"
    assert request_ids(b.get(newer).text) == ids[:50]

    # The paging keeps the view (metric and key) it was on.
    page = b.get(f"/usage?metric=tokens&key={key_id}").text
    assert link(page, "Older") == f"/usage?metric=tokens&key={key_id}&before={ids[49]}#requests"


def test_times_are_relative_with_the_utc_time_in_the_title(clocked):
    b, me = logged_in(clocked, "me@example.com")
    key_id, _ = b.generate_key("laptop")
    ledger_row(clocked.db, me, key_id, NOW - dt.timedelta(hours=3, minutes=12), prompt=7, completion=5, credits=2)
    ledger_row(clocked.db, me, None, NOW - dt.timedelta(seconds=20), status="released", credits=0)
    table = section(b.get("/usage").text, "requests")
    times = re.findall(r"<time ([^>]*)>(.*?)</time>", table)
    assert [text for _, text in times] == ["just now", "3 h 12 min ago"]
    assert times[1][0] == 'datetime="2026-03-15T08:48:00Z" title="2026-03-15 08:48:00 UTC" data-local-title'
    text = re.sub(r"<[^>]+>", " ", table)  # what is read: no raw ISO time anywhere
    assert not re.search(r"\d{4}-\d\d-\d\dT\d", text)
    cells = [re.sub(r"<[^>]+>|\s+", " ", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", table, re.S)]
    assert cells[1:6] == ["Playground", "aimichat-1", "Refunded", "0", "0"]
    assert cells[7:12] == ["laptop", "aimichat-1", "Charged", "12", "2"]


def test_a_revoked_keys_history_stays_listed(clocked):
    b, _ = logged_in(clocked, "me@example.com")
    key_id, key = b.generate_key("retired")
    assert chat(clocked, key).status_code == 200
    assert b.post(f"/keys/{key_id}/revoke", {"confirm": "yes"}).status_code == 303
    page = b.get("/usage").text
    row = re.search(rf'<tr data-key="{key_id}">.*?</tr>', page, re.S).group(0)
    assert "retired" in row and '<span class="badge revoked">Revoked</span>' in row
    assert re.search(r'data-label="Requests" class="num">1</td>', row)
    chosen = b.get(f"/usage?key={key_id}&metric=requests")
    assert chosen.status_code == 200 and chart_desc(chosen.text).startswith("1 request in total")


def test_another_accounts_requests_and_keys_never_show(clocked):
    b, me = logged_in(clocked, "me@example.com")
    mine_id, mine = b.generate_key("mine")
    other, them = logged_in(clocked, "them@example.com")
    theirs_id, theirs = other.generate_key("their-secret-project")
    for key in (mine, theirs, theirs):
        assert chat(clocked, key).status_code == 200
    with clocked.db.session() as s:
        their_rows = [r.id for r in s.query(UsageEvent).filter_by(account_id=them)]
        my_rows = [r.id for r in s.query(UsageEvent).filter_by(account_id=me)]

    page = b.get("/usage").text
    assert request_ids(page) == my_rows and "their-secret-project" not in page
    assert chart_desc(page).startswith("1 credit in total")
    assert not set(request_ids(page)) & set(their_rows)
    # Their key, or a page anchored on their request, is refused like one that does not exist.
    for path in (f"/usage?key={theirs_id}", f"/usage?before={their_rows[0]}", f"/usage?after={their_rows[0]}"):
        refused = b.get(path)
        assert refused.status_code == 400, path
        assert "their-secret-project" not in refused.text
    alert = re.compile(r'<p role="alert">(.*?)</p>')
    assert alert.findall(b.get(f"/usage?key={theirs_id}").text) == alert.findall(b.get("/usage?key=999999").text)
    theirs_page = other.get("/usage").text
    assert request_ids(theirs_page) == sorted(their_rows, reverse=True) and f'data-key="{mine_id}"' not in theirs_page


@pytest.mark.parametrize(
    "query",
    [
        "metric=bogus",
        "metric=CREDITS",
        "key=abc",
        "key=-1",
        "key=999999",
        "key=99999999999999999999999",
        "before=x",
        "before=0",
        "before=1.5",
        "before=99999999999999999999999",
        "before=2147483647",  # the largest id there can be: no such request
        "after=%00",
        "before=1&after=2",
    ],
)
def test_bad_parameters_are_a_400_page_that_leads_back_to_usage(clocked, query):
    b, _ = logged_in(clocked, "me@example.com")
    b.generate_key("laptop")
    r = b.get(f"/usage?{query}")
    assert r.status_code == 400 and "text/html" in r.headers["content-type"]
    assert "<h1>Invalid usage view</h1>" in r.text
    assert '<a href="/usage">Back to Usage</a>' in r.text


def test_the_csv_error_page_links_back_to_usage(clocked):
    b, _ = logged_in(clocked, "me@example.com")
    r = b.get("/usage.csv?start=yesterday")
    assert r.status_code == 400 and "<h1>Invalid date range</h1>" in r.text
    assert "Dates must look like 2025-01-31." in r.text
    assert '<a href="/usage#csv-title">Back to Usage</a>' in r.text
    assert 'id="csv-title"' in b.get("/usage").text, "the link's target exists"


def test_day_boundaries_are_utc_days(clocked):
    """A request at 23:59:30 UTC and one a minute later fall on two days of the chart."""
    b, _ = logged_in(clocked, "me@example.com")
    _, key = b.generate_key("laptop")
    clocked.clock.now = dt.datetime(2026, 3, 14, 23, 59, 30)
    assert chat(clocked, key).status_code == 200
    clocked.clock.now = dt.datetime(2026, 3, 15, 0, 0, 30)
    assert chat(clocked, key).status_code == 200
    assert chat(clocked, key).status_code == 200
    page = b.get("/usage?metric=requests").text
    days = dict(re.findall(r'<rect class="bar[^"]*"[^>]*><title>(.*?): (\d+) requests?</title>', page))
    assert days["Sat 14 Mar"] == "1" and days["Sun 15 Mar"] == "2" and len(days) == 30
