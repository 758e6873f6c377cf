"""Usage alerts: sent once per threshold per period across replicas, within seconds of the request that
crossed it, by email and webhook; thresholds set on the usage page and by the CLI; key caps alerted too."""

from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from click.testing import CliRunner
from sqlalchemy import select
from webhook_receiver import Receiver

from aimichat.alerts import service as alerts
from aimichat.alerts.watch import Hint
from aimichat.cli import cli
from aimichat.keys import service as keys
from aimichat.keys.service import KeyLimits
from aimichat.quota import periods
from aimichat.quota.ledger import KeyFigures, Refusal, Reservation
from aimichat.registry import service as registry
from aimichat.store.clock import utcnow
from aimichat.store.db import Database
from aimichat.store.models import Account, AlertDelivery, UsageAlert
from conftest import (
    LiveServer,
    app_client,
    make_account,
    make_key,
    migrated,
    new_postgres_database,
    serve_app,
    settled,
)
from scripted_engine import ScriptedEngine
from web.web_helpers import Browser

HI = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def chat(url: str, key: str) -> int:
    return httpx.post(url + "/v1/chat/completions", json=HI, headers={"Authorization": f"Bearer {key}"}).status_code


def test_two_replicas_crossing_80_percent_at_once_send_one_email_and_one_webhook(tmp_path, smtp_server):
    url, drop = new_postgres_database()
    db = migrated(url)
    receiver = Receiver()
    try:
        account = make_account(db, "fleet@example.com", daily=10)
        key = make_key(db, "fleet@example.com")
        settings = {"webhook_allow_private": True, "smtp_url": smtp_server.url}
        replicas = [serve_app(ScriptedEngine(), Database(url), tmp_path / name, **settings) for name in "ab"]
        with LiveServer(receiver.app) as hook, replicas[0] as a, replicas[1] as b:
            with db.session() as s:
                receiver.secret = alerts.add_endpoint(
                    s, account, hook.url + "/hook", utcnow(), allow_private=True
                ).secret
                s.commit()
            assert [chat(a.url, key) for _ in range(7)] == [200] * 7  # 70%: below every threshold
            settled(a)  # the settlements, which queue the checks, written: then time for a wrong alert
            time.sleep(0.3)
            assert receiver.received == [] and smtp_server.messages == []

            crossed_at = time.monotonic()
            with ThreadPoolExecutor(2) as pool:  # one request on each replica, at the same moment: 90%
                assert list(pool.map(chat, [a.url, b.url], [key, key])) == [200, 200]
            mail = smtp_server.wait(1, timeout=5)[0]
            hooked = receiver.wait(1, timeout=5)[0]
            assert time.monotonic() - crossed_at < 5
            time.sleep(1.5)  # more than a poll of each replica: nothing more comes
            assert len(smtp_server.messages) == 1 and len(receiver.received) == 1

            assert mail["To"] == "fleet@example.com" and "80%" in mail["Subject"]
            event = json.loads(hooked.body)
            used = event["data"]["used"]  # what the winning check read: one request in, or both
            assert used in (8, 9) and f"{used} of 10 daily credits" in mail.get_content()
            assert hooked.valid and event["type"] == "usage.threshold_crossed"
            assert event["data"] | {"period_start": None, "resets_at": None, "used": None} == {
                "account_id": account,
                "scope": "account",
                "key_id": None,
                "key_name": None,
                "period": "day",
                "period_start": None,
                "threshold_percent": 80,
                "used": None,
                "limit": 10,
                "resets_at": None,
            }
            # Both replicas checked after the crossing (each now waits for 100%), and one INSERT won.
            for replica in (a, b):
                assert replica.app.state.alerts.hints[account].next_at[(0, "day")] == 10
            with db.session() as s:
                assert [(r.period, r.percent, r.used) for r in s.scalars(select(UsageAlert))] == [("day", 80, used)]

            assert chat(b.url, key) == 200  # 100%: the next threshold, once too
            assert "100%" in smtp_server.wait(2, timeout=5)[1]["Subject"]
            assert json.loads(receiver.wait(2, timeout=5)[1].body)["data"]["threshold_percent"] == 100
            time.sleep(1.2)
            assert len(smtp_server.messages) == 2 and len(receiver.received) == 2
            with db.session() as s:
                statuses = [(d.channel, d.status) for d in s.scalars(select(AlertDelivery).order_by(AlertDelivery.id))]
            assert sorted(statuses) == [("email", "sent")] * 2 + [("webhook", "sent")] * 2
    finally:
        db.dispose()
        drop()


def test_a_keys_cap_is_alerted_at_the_thresholds_set_on_the_usage_page(database, tmp_path, smtp_server):
    receiver = Receiver()
    with (
        LiveServer(receiver.app) as hook,
        app_client(
            ScriptedEngine(), database, tmp_path, webhook_allow_private=True, smtp_url=smtp_server.url
        ) as server,
        Browser(server) as browser,
    ):
        browser.sign_up("capped@example.com")
        usage = browser.get("/usage")
        assert 'value="80, 100"' in usage.text and "checked" in usage.text.split('id="alerts-form"')[1]
        assert browser.post("/usage/alerts", {"percents": "50", "csrf_token": "forged"}).status_code == 403
        assert browser.post("/usage/alerts", {"percents": "0, 120"}).status_code == 400
        browser.get("/usage")
        saved = browser.post("/usage/alerts", {"percents": "50%"})  # the box unticked: no email
        assert saved.status_code == 303
        assert 'value="50"' in browser.get("/usage").text
        with database.session() as s:
            assert alerts.alert_config(s, 1) == alerts.AlertConfig((50,), email=False)
            receiver.secret = alerts.add_endpoint(s, 1, hook.url + "/hook", utcnow(), allow_private=True).secret
            secret = keys.create_key(s, _account(s), "capped", KeyLimits(daily_cap=4)).secret
            s.commit()
        assert [server.chat(HI, secret).status_code for _ in range(2)] == [200, 200]  # the key at 50%
        event = json.loads(receiver.wait(1, timeout=5)[0].body)["data"]
        assert (event["scope"], event["key_name"], event["used"], event["limit"]) == ("key", "capped", 2, 4)
        assert server.chat(HI, secret).status_code == 200  # 75%: nothing more
        time.sleep(1.2)
        assert len(receiver.received) == 1 and smtp_server.messages == []
        page = browser.get("/webhooks")
        assert "usage.threshold_crossed" in page.text and 'data-status="sent"' in page.text


def _account(session):
    return session.scalars(select(Account)).one()


def test_the_cli_sets_and_shows_an_accounts_thresholds(sqlite_url):
    db = migrated(sqlite_url)
    make_account(db, "cli@example.com")
    env = {"AIMICHAT_DATABASE_URL": sqlite_url}
    runner = CliRunner()
    done = runner.invoke(cli, ["alerts", "set", "cli@example.com", "--at", "90,50", "--no-email"], env=env)
    assert done.exit_code == 0 and "alerts at 50%, 90%; email off" in done.output
    shown = runner.invoke(cli, ["alerts", "show", "cli@example.com"], env=env)
    assert "alerts at 50%, 90%; email off" in shown.output
    off = runner.invoke(cli, ["alerts", "set", "cli@example.com", "--at", ""], env=env)
    assert "alerts off; email off" in off.output
    bad = runner.invoke(cli, ["alerts", "set", "cli@example.com", "--at", "150"], env=env)
    assert bad.exit_code == 1 and "percentages from 1 to 100" in bad.output
    db.dispose()


def test_a_settle_queues_a_check_only_when_it_may_have_crossed_a_threshold():
    """The request path's filter: what the settled reservation says against the last check's findings."""
    day = dt.date(2026, 3, 10)
    hint = Hint(day, time.monotonic() + 30, {(0, "day"): 80, (0, "month"): 800, (7, "day"): 4}, month_before_today=700)

    def settled(day_used: int, key_day: int | None = None, month: bool = True) -> Reservation:
        figures = KeyFigures(day_used=key_day, daily_cap=5) if key_day is not None else KeyFigures()
        return Reservation(
            ledger_id=1,
            request_id="r",
            account_id=1,
            credits=1,
            day=day,
            month=day.replace(day=1) if month else None,
            day_used=day_used,
            daily_limit=100,
            reset_at=dt.datetime(2026, 3, 11),
            key_id=7 if key_day is not None else None,
            key=figures,
        )

    assert not hint.could_cross(settled(79))  # the day at 79 of 80, the month at 779 of 800
    assert hint.could_cross(settled(80))  # the day's next threshold
    later = Hint(day, hint.expires, hint.next_at, month_before_today=750)
    assert later.could_cross(settled(60))  # 750 + 60: the month's
    assert not later.could_cross(settled(60, month=False))  # a tier without a monthly allotment
    assert not hint.could_cross(settled(70, key_day=3))
    assert hint.could_cross(settled(70, key_day=4))  # the key's cap
    stale = Hint(day, time.monotonic() - 1, hint.next_at, 700)
    assert stale.could_cross(settled(1))
    done = Hint(day, time.monotonic() + 30, {(0, "day"): None, (0, "month"): None}, 0)
    assert not done.could_cross(settled(100))  # every threshold already crossed


def test_the_100_percent_alert_fires_when_the_rest_cannot_pay_for_a_request(tmp_path, sqlite_url):
    """A request costs 3 of a day's 10 credits: the day stops at 9, the fourth request is refused, and that
    refusal is the 100% crossing (the rest, 1, pays for no request). Once: further refusals send nothing."""
    db = migrated(sqlite_url)
    receiver = Receiver()
    account = make_account(db, "priced@example.com", daily=10)
    key = make_key(db, "priced@example.com")
    with db.session() as s:
        registry.set_price(s, _account(s).tier.name, "aimichat-1", per_request=3)
        s.commit()
    with (
        LiveServer(receiver.app) as hook,
        app_client(ScriptedEngine(), db, tmp_path, webhook_allow_private=True) as server,
    ):
        with db.session() as s:
            receiver.secret = alerts.add_endpoint(s, account, hook.url + "/hook", utcnow(), allow_private=True).secret
            s.commit()
        assert [server.chat(HI, key).status_code for _ in range(3)] == [200] * 3  # 9 of 10
        assert json.loads(receiver.wait(1, timeout=5)[0].body)["data"]["threshold_percent"] == 80
        assert server.chat(HI, key).status_code == 429
        event = json.loads(receiver.wait(2, timeout=5)[1].body)["data"]
        assert (event["threshold_percent"], event["used"], event["limit"], event["scope"]) == (100, 9, 10, "account")
        assert [server.chat(HI, key).status_code for _ in range(3)] == [429] * 3
        time.sleep(1.2)
        assert len(receiver.received) == 2
        with db.session() as s:
            assert sorted(r.percent for r in s.scalars(select(UsageAlert))) == [80, 100]
    db.dispose()


def test_a_refusal_for_a_keys_cap_alerts_that_cap_and_a_rate_limit_alerts_nothing(sqlite_url):
    """What a refusal tells the check: a spent allotment is at 100%; a per-minute rate limit spends none."""
    db = migrated(sqlite_url)
    account = make_account(db, "spent@example.com", daily=100)
    now = utcnow()
    with db.session() as s:
        key = keys.create_key(s, _account(s), "capped", KeyLimits(daily_cap=10)).key
        s.commit()
        day_reset = periods.next_day_reset(now)
        spent = [alerts.Spent(key.id, "day", day_reset)]
        found = alerts.check_usage(s, account, [key.id], now, email=False, spent=spent)
        assert [(a.key_id, a.percent) for a in found.sent] == [(key.id, 80), (key.id, 100)]
        stale = [alerts.Spent(0, "day", day_reset - dt.timedelta(days=1))]  # yesterday's, heard of late
        assert alerts.check_usage(s, account, [], now, email=False, spent=stale).sent == []
        s.commit()
    assert alerts.spent_by(3, _refusal("key_day", day_reset)) == alerts.Spent(3, "day", day_reset)
    assert alerts.spent_by(None, _refusal("month", day_reset)) == alerts.Spent(0, "month", day_reset)
    assert alerts.spent_by(3, _refusal("rpm", day_reset)) is None
    db.dispose()


def _refusal(period: str, reset_at: dt.datetime) -> Refusal:
    return Refusal(period, "refused", 10, 9, reset_at, 60, 10, 9, reset_at)


def test_two_first_saves_of_the_thresholds_at_once_both_land(reused_postgres):
    """The second INSERT of the settings row waits for the first to commit, then updates it (no 500)."""
    db = reused_postgres.fresh()
    account = make_account(db, "race@example.com")
    now = utcnow()

    def second() -> alerts.AlertConfig:
        with db.session() as s:
            config = alerts.set_alert_config(s, account, now, percents=[90])
            s.commit()
            return config

    with db.session() as first, ThreadPoolExecutor(1) as pool:
        alerts.set_alert_config(first, account, now, percents=[50], email=False)
        waiting = pool.submit(second)
        time.sleep(0.3)  # the second save now waits on the first's uncommitted row
        assert not waiting.done()
        first.commit()
        assert waiting.result(timeout=10).percents == (90,)
    with db.session() as s:
        assert alerts.alert_config(s, account) == alerts.AlertConfig((90,), email=False)
    db.dispose()
