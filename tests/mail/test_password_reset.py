"""Password reset by emailed link, end to end through the real app and a real SMTP server: the link read from
the mail received, single use, 1 hour, no enumeration, throttled, and every session of the account signed out."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from mail_helpers import NEW_PASSWORD, PASSWORD, Visit, link_in, local, text_of, token_of
from sqlalchemy import select

from aimichat.accounts import service as accounts
from aimichat.mail import links
from aimichat.store.models import Account, EmailToken, WebSession
from aimichat.web import email_flows
from conftest import MutableClock, app_client, make_account, migrated
from scripted_engine import ScriptedEngine

EMAIL = "owner@example.com"
SENT = "/password/forgot?sent=1"


@pytest.fixture
def clock():
    return MutableClock(dt.datetime(2026, 11, 30, 12, 0))


@pytest.fixture
def sqlite_db(sqlite_url):
    db = migrated(sqlite_url)
    yield db
    db.dispose()


def http_app(db, tmp_path, smtp_server, clock, **settings):
    return app_client(ScriptedEngine(), db, tmp_path, clock=clock, smtp_url=smtp_server.url, **settings)


def test_reset_by_emailed_link_signs_out_every_session(database, tmp_path, smtp_server, clock):
    with http_app(database, tmp_path, smtp_server, clock, public_url="http://127.0.0.1:8000") as server:
        make_account(database, EMAIL)
        with Visit(server) as elsewhere, Visit(server) as here:
            assert elsewhere.log_in(EMAIL).status_code == 303
            assert 'href="/password/forgot"' in here.get("/login").text  # "Forgot password?"

            asked = here.forgot(EMAIL)
            assert asked.status_code == 303 and asked.headers["location"] == SENT
            assert "If an account exists for that address" in here.get(SENT).text
            [mail] = smtp_server.messages
            assert mail["To"] == EMAIL and mail["Subject"] == "Reset your AimiChat password"
            url = link_in(mail, "/password/reset")
            assert url.startswith("http://127.0.0.1:8000/password/reset?token=")
            assert url in mail.get_body(("html",)).get_content()
            with database.session() as s:  # stored hashed: the table holds no usable link
                [row] = s.scalars(select(EmailToken)).all()
                assert row.token_hash == hashlib.sha256(token_of(url).encode()).hexdigest()
                assert row.expires_at == clock.now + dt.timedelta(hours=1) and row.purpose == "reset"

            form = here.get(local(url))
            assert form.status_code == 200 and EMAIL in form.text and 'name="password"' in form.text
            done = here.post("/password/reset", {"token": token_of(url), "password": NEW_PASSWORD})
            assert done.status_code == 303 and done.headers["location"] == "/password/reset?done=1"
            assert (
                "every browser that was signed in to your account is logged out"
                in here.get(done.headers["location"]).text
            )

            # The browser that was logged in elsewhere is out; nothing of the account's sessions is left.
            assert elsewhere.get("/keys").headers["location"].startswith("/login")
            with database.session() as s:
                assert s.scalars(select(WebSession)).all() == []

            assert here.log_in(EMAIL, PASSWORD).status_code == 400  # the old password is gone
            assert here.log_in(EMAIL, NEW_PASSWORD).status_code == 303

            again = here.get(local(url))  # single use
            assert again.status_code == 410 and "used already" in again.text
            replay = here.post("/password/reset", {"token": token_of(url), "password": "yet another one"})
            assert replay.status_code == 410
    with database.session() as s:
        assert accounts.verify_password(accounts.get_account(s, EMAIL), NEW_PASSWORD)


def test_forgot_form_answers_alike_and_is_throttled(sqlite_db, tmp_path, smtp_server, clock):
    with http_app(sqlite_db, tmp_path, smtp_server, clock) as server:
        make_account(sqlite_db, EMAIL)
        make_account(sqlite_db, "disabled@example.com")
        with sqlite_db.session() as s:
            accounts.set_disabled(s, "disabled@example.com")
            s.commit()
        with Visit(server) as visit:
            answers = [visit.forgot(email) for email in ("nobody@example.com", "disabled@example.com", EMAIL)]
            assert {(a.status_code, a.headers["location"]) for a in answers} == {(303, SENT)}
            assert [m["To"] for m in smtp_server.messages] == [EMAIL]  # only the enabled account gets one

            # Per account: 3 mails an hour; the answer stays the same, the 4th mail is not sent.
            assert [visit.forgot(EMAIL).headers["location"] for _ in range(2)] == [SENT, SENT]
            assert len(smtp_server.messages) == 3
            # Per address: the 6th request in 15 minutes waits, whatever the email (so it tells nothing).
            refused = visit.forgot("nobody@example.com")
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) == 15 * 60
            assert "Too many reset requests from your network" in refused.text

            clock.advance(minutes=15, seconds=1)
            assert visit.forgot(EMAIL).headers["location"] == SENT
            assert len(smtp_server.messages) == 3  # still the account's 3 in this hour
            clock.advance(minutes=45)
            visit.forgot(EMAIL)
            assert len(smtp_server.messages) == 4


def test_forgot_form_checks_its_input(sqlite_db, tmp_path, smtp_server, clock):
    with http_app(sqlite_db, tmp_path, smtp_server, clock) as server, Visit(server) as visit:
        make_account(sqlite_db, EMAIL)
        malformed = visit.forgot("not an address")
        assert malformed.status_code == 400 and "That is not an email address." in malformed.text
        forged = visit.forgot(EMAIL, csrf=False)
        assert forged.status_code == 403 and smtp_server.messages == []


def test_links_point_at_the_configured_address_never_the_host_header(sqlite_db, tmp_path, smtp_server, clock):
    with http_app(sqlite_db, tmp_path, smtp_server, clock, host="0.0.0.0", port=8123) as server:
        make_account(sqlite_db, EMAIL)
        with Visit(server, headers={"Host": "evil.example"}) as visit:
            assert visit.forgot(EMAIL).status_code == 303
    url = link_in(smtp_server.messages[0], "/password/reset")
    assert url.startswith("http://127.0.0.1:8123/password/reset?token="), url
    assert "evil.example" not in text_of(smtp_server.messages[0])


def test_expired_wrong_and_weak(sqlite_db, tmp_path, smtp_server, clock):
    with http_app(sqlite_db, tmp_path, smtp_server, clock) as server, Visit(server) as visit:
        make_account(sqlite_db, EMAIL)
        visit.forgot(EMAIL)
        url = link_in(smtp_server.messages[0], "/password/reset")

        weak = visit.post("/password/reset", {"token": token_of(url), "password": "short"})
        assert weak.status_code == 400 and "Password must be at least 8 characters." in weak.text
        assert visit.get(local(url)).status_code == 200  # a weak password does not spend the link

        for bad in ("nonsense", "", "x" * 500):
            wrong = visit.get(f"/password/reset?token={bad}")
            assert wrong.status_code == 400 and "This link is not valid" in wrong.text
            posted = visit.post("/password/reset", {"token": bad, "password": NEW_PASSWORD})
            assert posted.status_code == 400 and "This link is not valid" in posted.text
        # A weak password on a bad link: the link is what to fix first (and never a 500).
        assert visit.post("/password/reset", {"token": "nonsense", "password": "x"}).status_code == 400
        unforged = visit.post("/password/reset", {"token": token_of(url), "password": NEW_PASSWORD}, csrf=False)
        assert unforged.status_code == 403

        clock.advance(hours=1)
        expired = visit.get(local(url))
        assert expired.status_code == 410 and "This link has expired." in expired.text
        assert 'href="/password/forgot"' in expired.text  # where to ask for a new one
        late = visit.post("/password/reset", {"token": token_of(url), "password": NEW_PASSWORD})
        assert late.status_code == 410
    with sqlite_db.session() as s:
        assert accounts.verify_password(accounts.get_account(s, EMAIL), PASSWORD)  # unchanged


def test_a_reset_voids_the_other_links_and_proves_the_email(sqlite_db, tmp_path, smtp_server, clock):
    with http_app(sqlite_db, tmp_path, smtp_server, clock) as server, Visit(server) as visit:
        visit.sign_up(EMAIL)  # a sign-up's email is unproven
        visit.forgot(EMAIL)
        visit.forgot(EMAIL)
        first, second = (link_in(m, "/password/reset") for m in smtp_server.messages)
        assert visit.post("/password/reset", {"token": token_of(second), "password": NEW_PASSWORD}).status_code == 303
        assert visit.get(local(first)).status_code == 410  # the older link died with the reset
    with sqlite_db.session() as s:
        assert accounts.get_account(s, EMAIL).email_verified_at == clock.now


def test_a_link_is_spent_once_across_sessions(database, clock):
    """Two requests (two replicas) spending one link: one conditional UPDATE each, so exactly one wins."""
    account_id = make_account(database, EMAIL)
    with database.session() as s:
        token = links.issue(s, account_id, links.RESET, clock.now)
        verify_token = links.issue(s, account_id, links.VERIFY, clock.now)
        s.commit()
    with database.session() as first, database.session() as second:
        assert email_flows.reset_password(first, token, NEW_PASSWORD, clock.now).id == account_id
        first.commit()
        with pytest.raises(links.LinkRefused) as refused:
            email_flows.reset_password(second, token, "another password", clock.now)
        assert refused.value.reason == "used"
        with pytest.raises(links.LinkRefused) as wrong_purpose:  # a confirmation link resets nothing
            email_flows.reset_password(second, verify_token, "another password", clock.now)
        assert wrong_purpose.value.reason == "unknown"
    with database.session() as s:
        assert accounts.verify_password(s.get(Account, account_id), NEW_PASSWORD)
