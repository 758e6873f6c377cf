"""Email off (no AIMICHAT_SMTP_URL, the default): no reset or confirmation link is made, so none can reach
the log, and the operator hands out a reset link made by `aimichat accounts reset-link` instead."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner
from mail_helpers import NEW_PASSWORD, PASSWORD, Visit, local, token_of
from sqlalchemy import func, select

from aimichat.accounts import service as accounts
from aimichat.audit import service as audit
from aimichat.cli import cli
from aimichat.store.models import EmailToken
from aimichat.web import email_flows
from conftest import app_client, make_account, migrated
from scripted_engine import ScriptedEngine

ADMIN = "admin@example.com"


@pytest.fixture
def sqlite_db(sqlite_url):
    db = migrated(sqlite_url)
    yield db
    db.dispose()


def tokens(db) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(EmailToken)) or 0


def test_a_reset_asked_for_while_mail_is_off_makes_no_link_and_logs_none(sqlite_db, tmp_path, caplog):
    make_account(sqlite_db, ADMIN)
    with app_client(ScriptedEngine(), sqlite_db, tmp_path) as server, Visit(server) as visit:
        assert not server.app.state.mailer.enabled  # the default: no SMTP settings
        with caplog.at_level(logging.DEBUG, logger="aimichat"):
            asked = visit.forgot(ADMIN)  # anyone may ask for a reset of an admin's address
        assert asked.status_code == 303
        assert tokens(sqlite_db) == 0  # no live link exists, in the log or anywhere else
        assert "token=" not in caplog.text and "/password/reset" not in caplog.text
        assert "email is off" in caplog.text and "aimichat accounts reset-link" in caplog.text
        page = visit.get(asked.headers["location"]).text
        assert "cannot send reset links" in page and "we have sent it a link" not in page


def test_the_letter_functions_make_no_token_while_mail_is_off(sqlite_db):
    make_account(sqlite_db, ADMIN)
    with sqlite_db.session() as s:
        now = accounts.get_account(s, ADMIN).created_at
        account = accounts.get_account(s, ADMIN)
        base = "https://chat.example"
        assert email_flows.reset_letter(s, ADMIN, address="10.0.0.1", base=base, now=now, mail_on=False) is None
        assert email_flows.verification_letter(s, account, base=base, now=now, mail_on=False) is None
        letter = email_flows.reset_letter(s, ADMIN, address="10.0.0.1", base=base, now=now, mail_on=True)
        assert letter is not None and "https://chat.example/password/reset?token=" in letter.text
        s.commit()
    assert tokens(sqlite_db) == 1  # the one made while mail was on


def test_cli_reset_link_works_once_and_confirms_the_address(sqlite_url, tmp_path, monkeypatch):
    db = migrated(sqlite_url)
    with db.session() as s:
        accounts.register(s, "newcomer@example.com", PASSWORD)  # signed up: its address is not confirmed yet
        s.commit()
    monkeypatch.setenv("AIMICHAT_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("AIMICHAT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AIMICHAT_PUBLIC_URL", "https://chat.example/")
    made = CliRunner().invoke(cli, ["accounts", "reset-link", "NewComer@example.com"])
    assert made.exit_code == 0, made.output
    link = made.stdout.strip().splitlines()[-1]
    assert link.startswith("https://chat.example/password/reset?token=")
    monkeypatch.delenv("AIMICHAT_PUBLIC_URL")  # the app below is reached over http://: no Secure cookies

    with app_client(ScriptedEngine(), db, tmp_path) as server, Visit(server) as visit:
        form = visit.get(local(link))
        assert form.status_code == 200 and "newcomer@example.com" in form.text
        done = visit.post("/password/reset", {"token": token_of(link), "password": NEW_PASSWORD})
        assert done.status_code == 303, done.text
        assert visit.get(local(link)).status_code == 410  # once
        assert visit.log_in("newcomer@example.com", NEW_PASSWORD).status_code == 303
    with db.session() as s:
        assert accounts.get_account(s, "newcomer@example.com").email_verified_at is not None
        [event] = audit.list_events(s, action="account.reset_link_made").events
        assert (event.actor, event.detail) == ("cli", {"email": "newcomer@example.com"})

    unknown = CliRunner().invoke(cli, ["accounts", "reset-link", "nobody@example.com"])
    assert unknown.exit_code == 1 and "no account for nobody@example.com" in unknown.output
    assert "Traceback" not in unknown.output
    db.dispose()
