"""The account pages' business rules as plain functions: sessions, throttling, the usage chart and CSV.
(Their tables' migration: tests/store/test_migrations.py; the docs page: tests/web/test_server.py.)"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from aimichat.accounts import service as accounts
from aimichat.store.models import UsageEvent, WebSession
from aimichat.web import auth, sessions, throttle, usage_data
from conftest import make_account

NOW = dt.datetime(2026, 3, 14, 15, 9, 26)


def account(db, email="rules@example.com"):
    make_account(db, email, password="correct horse")
    with db.session() as s:
        return accounts.get_account(s, email)


# -- sessions ------------------------------------------------------------------------------------


def test_sessions_store_only_a_hash_and_expire(database):
    acc = account(database)
    with database.session() as s:
        token = sessions.start(s, acc, NOW)
        s.commit()
        row = s.query(WebSession).one()
        assert row.token_hash == sessions.hash_token(token) and token not in row.token_hash
        user = sessions.lookup(s, token, NOW + dt.timedelta(minutes=1))
        assert user.account.id == acc.id and user.csrf_token == sessions.csrf_for(token) != token
        assert sessions.lookup(s, token + "x", NOW) is None
        assert sessions.lookup(s, token, NOW + sessions.IDLE_TIMEOUT + dt.timedelta(seconds=1)) is None, "idle too long"
        # Seen every few days, it lives until its absolute lifetime and no longer.
        moment = NOW
        while moment + dt.timedelta(days=6) < NOW + sessions.LIFETIME:
            moment += dt.timedelta(days=6)
            assert sessions.lookup(s, token, moment) is not None
            s.commit()
        assert sessions.lookup(s, token, NOW + sessions.LIFETIME) is None


def test_a_new_session_ends_the_one_it_replaces(database):
    acc = account(database)
    with database.session() as s:
        old = sessions.start(s, acc, NOW)
        new = sessions.start(s, acc, NOW, replacing=old)
        s.commit()
        assert new != old and sessions.lookup(s, old, NOW) is None and sessions.lookup(s, new, NOW)
        assert sessions.end_all(s, acc.id) == 1 and sessions.lookup(s, new, NOW) is None


def test_disabled_accounts_have_no_sessions(database):
    acc = account(database)
    with database.session() as s:
        token = sessions.start(s, acc, NOW)
        accounts.set_disabled(s, acc.email)
        s.commit()
        assert sessions.lookup(s, token, NOW) is None


# -- throttling ----------------------------------------------------------------------------------


def test_throttle_window(database):
    with database.session() as s:
        for i in range(throttle.MAX_FAILURES - 1):
            throttle.record_failure(s, "T@Example.com ", "10.0.0.1", NOW + dt.timedelta(minutes=i))
        assert throttle.retry_after(s, "t@example.com", "10.0.0.1", NOW + dt.timedelta(minutes=9)) is None
        throttle.record_failure(s, "t@example.com", "10.0.0.1", NOW + dt.timedelta(minutes=9))
        later = NOW + dt.timedelta(minutes=10)
        # That address waits until its first failure is 15 minutes old: 5 minutes from "later", for any email.
        assert throttle.retry_after(s, "t@example.com", "10.0.0.1", later) == 300
        assert throttle.retry_after(s, "other@example.com", "10.0.0.1", later) == 300, "same address"
        # One address cannot lock the email: that takes MAX_EMAIL_FAILURES, which it never gets to.
        assert throttle.retry_after(s, "t@example.com", "10.0.0.9", later) is None
        for i in range(throttle.MAX_EMAIL_FAILURES - throttle.MAX_FAILURES):
            throttle.record_failure(s, "t@example.com", f"10.0.1.{i}", later)
        assert throttle.retry_after(s, "t@example.com", "10.0.0.9", later) == 300, "many addresses"
        assert throttle.retry_after(s, "t@example.com", "10.0.0.9", later, device="d" * 64) is None, "known device"
        assert throttle.retry_after(s, "other@example.com", "10.0.0.9", later) is None
        assert throttle.retry_after(s, "t@example.com", "10.0.0.9", NOW + throttle.WINDOW) is None
        # A success forgives that email's failures from that browser's address only.
        throttle.clear(s, "t@example.com", "10.0.0.9")
        assert throttle.retry_after(s, "t@example.com", "10.0.0.9", later) == 300
        throttle.clear(s, "t@example.com", "10.0.0.1")
        assert throttle.retry_after(s, "other@example.com", "10.0.0.1", later) is None
        assert throttle.retry_after(s, "t@example.com", "10.0.0.9", later) is None, "20 failures left"


def test_log_in_counts_failures_and_refuses_when_throttled(database):
    acc = account(database)
    with database.session() as s:
        for i in range(throttle.MAX_EMAIL_FAILURES):
            with pytest.raises(auth.Refused) as refused:
                auth.log_in(s, acc.email, "wrong password", address=f"10.1.1.{i % 3}", now=NOW)
            assert refused.value.status == 400
        with pytest.raises(auth.Refused) as refused:
            auth.log_in(s, acc.email, "correct horse", address="10.1.1.9", now=NOW)
        assert refused.value.status == 429 and refused.value.retry_after == 900
        assert "Too many failed log-in attempts" in refused.value.message
        _, token = auth.log_in(s, acc.email, "correct horse", address="10.1.1.9", now=NOW + throttle.WINDOW)
        assert sessions.lookup(s, token, NOW + throttle.WINDOW)


def test_unknown_emails_count_too(database):
    with database.session() as s:
        for i in range(throttle.MAX_EMAIL_FAILURES):
            with pytest.raises(auth.Refused):
                auth.log_in(s, "nobody@example.com", "x", address=f"10.2.2.{i % 3}", now=NOW)
        with pytest.raises(auth.Refused) as refused:
            auth.log_in(s, "nobody@example.com", "x", address="10.2.2.9", now=NOW)
        assert refused.value.status == 429


def test_sign_ups_from_one_address_are_limited_without_locking_log_ins(database):
    now = dt.datetime(2024, 1, 18, 12, 0)
    with database.session() as db:
        for i in range(throttle.MAX_SIGNUPS):
            auth.sign_up(db, f"user{i}@example.com", "long enough", tier="free", now=now, address="10.0.0.9")
        with pytest.raises(auth.Refused) as refused:
            auth.sign_up(db, "one-more@example.com", "long enough", tier="free", now=now, address="10.0.0.9")
        assert refused.value.status == 429 and refused.value.retry_after == 3600
        auth.sign_up(db, "elsewhere@example.com", "long enough", tier="free", now=now, address="10.0.0.10")
        auth.log_in(db, "user0@example.com", "long enough", address="10.0.0.9", now=now)  # not throttled
        with pytest.raises(auth.Refused):  # a failed log-in prunes old rows, but not the sign-ups of the hour
            auth.log_in(db, "user0@example.com", "wrong", address="10.0.0.9", now=now + throttle.WINDOW)
        with pytest.raises(auth.Refused):
            auth.sign_up(
                db, "later@example.com", "long enough", tier="free", now=now + throttle.WINDOW, address="10.0.0.9"
            )
        auth.sign_up(
            db, "later@example.com", "long enough", tier="free", now=now + throttle.SIGNUP_WINDOW, address="10.0.0.9"
        )


# -- usage ---------------------------------------------------------------------------------------


def test_daily_series_and_chart(database):
    acc = account(database)
    today = NOW.date()
    with database.session() as s:
        for i, (days_ago, credits) in enumerate([(0, 3), (0, 2), (1, 7), (29, 1), (30, 50)]):
            day = today - dt.timedelta(days=days_ago)
            s.add(
                UsageEvent(
                    request_id=f"r{i}",
                    account_id=acc.id,
                    created_at=dt.datetime.combine(day, dt.time(12)),
                    day=day,
                    reserved_credits=credits,
                    credits=credits,
                    status="charged",
                )
            )
        s.commit()
        series = usage_data.daily_credits(s, acc.id, today, 30)
    assert len(series) == 30 and series[0] == (today - dt.timedelta(days=29), 1) and series[-1] == (today, 5)
    assert series[-2][1] == 7 and sum(c for _, c in series) == 13, "day 30 is outside the window"
    chart = usage_data.bar_chart(series)
    assert len(chart.bars) == 30 and chart.top_value == 10 and chart.total == 13
    tallest = max(chart.bars, key=lambda b: b.height)
    assert tallest.value == 7 and tallest.y + tallest.height == chart.height and tallest.height == 70
    assert all(b.height >= 1 for b in chart.bars) and all(a.x < b.x for a, b in itertools.pairwise(chart.bars))


@pytest.mark.parametrize(
    "value, ceiling", [(0, 1), (1, 1), (3, 5), (7, 10), (11, 20), (100, 100), (101, 200), (4999, 5000)]
)
def test_nice_ceiling(value, ceiling):
    assert usage_data.nice_ceiling(value) == ceiling


def test_csv_range_rules():
    today = dt.date(2026, 3, 14)
    assert usage_data.parse_range(None, None, today) == (dt.date(2026, 3, 1), today)
    assert usage_data.parse_range("2026-01-01", "2026-01-31", today) == (dt.date(2026, 1, 1), dt.date(2026, 1, 31))
    for start, end in (("2026-02-01", "2026-01-01"), ("2024-01-01", "2026-01-01"), ("01/02/2026", None)):
        with pytest.raises(usage_data.BadRange):
            usage_data.parse_range(start, end, today)
    assert usage_data.spreadsheet_safe("=cmd()") == "'=cmd()" and usage_data.spreadsheet_safe("laptop") == "laptop"


@pytest.mark.parametrize(
    "name",
    ["=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "|calc", ";=1", "\uff1d1+1", "\u200b=1+1", "\ufeff@x", " =1"],
)
def test_cells_a_spreadsheet_would_run_are_made_text(name):
    from aimichat.web.usage_data import spreadsheet_safe

    assert spreadsheet_safe(name) == "'" + name


@pytest.mark.parametrize("name", ["laptop", "ci key", "1+1", "a=b"])
def test_ordinary_cells_are_left_alone(name):
    from aimichat.web.usage_data import spreadsheet_safe

    assert spreadsheet_safe(name) == name
