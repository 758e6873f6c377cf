"""The mailer: AIMICHAT_SMTP_URL read right, mail delivered to a real SMTP server (aiosmtpd), every failure one
MailError, credentials only over TLS, nothing of a mail's text in the log without SMTP settings, and
`aimichat mail test`."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from click.testing import CliRunner
from mail_helpers import text_of

from aimichat.app import create_app
from aimichat.cli import cli
from aimichat.config import Settings
from aimichat.mail import LogMailer, MailError, SmtpConfig, SmtpMailer, build_mailer
from conftest import free_port
from scripted_engine import ScriptedEngine

SENDER = "AimiChat <noreply@chat.example>"


def send(mailer, *args, **kwargs) -> None:
    asyncio.run(mailer.send(*args, **kwargs))


# -- the URL -------------------------------------------------------------------------------------


def test_smtp_url_forms():
    starttls = SmtpConfig.from_url("smtp://user%40corp:p%2Fss%3Aword@mail.example:2525?starttls=true&timeout=3")
    assert (starttls.hostname, starttls.port, starttls.start_tls, starttls.use_tls) == (
        "mail.example",
        2525,
        True,
        False,
    )
    assert (starttls.username, starttls.password, starttls.timeout) == ("user@corp", "p/ss:word", 3.0)
    assert "p/ss:word" not in repr(starttls)  # a logged config shows no password

    implicit = SmtpConfig.from_url("smtps://u:p@mail.example")
    assert (implicit.port, implicit.use_tls, implicit.start_tls) == (465, True, False)
    assert SmtpConfig.from_url("smtp://mail.example?starttls=true").port == 587
    plain = SmtpConfig.from_url("smtp://relay.internal")
    # No credentials; STARTTLS when the server offers it (aiosmtplib's default), port 25.
    assert (plain.port, plain.username, plain.password, plain.start_tls) == (25, None, None, None)
    assert SmtpConfig.from_url("smtp://relay.internal?starttls=false").start_tls is False


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://u:hunter22@mail.example", "must start with smtp:// or smtps://"),
        ("smtp://u:hunter22@:25", "names no host"),
        ("smtp://u:hunter22@mail.example:port", "is the port a number"),
        ("smtp://u:hunter22@mail.example?starttls=maybe", "starttls must be true or false"),
        ("smtp://u:hunter22@mail.example?tls=1", "unknown option 'tls'"),
        ("smtps://u:hunter22@mail.example?starttls=true", "smtps:// is TLS already"),
        ("smtp://u:hunter22@mail.example?timeout=-1", "timeout must be seconds"),
    ],
)
def test_bad_smtp_urls_say_what_is_wrong_without_the_password(url, says):
    with pytest.raises(ValueError) as refused:
        SmtpConfig.from_url(url)
    assert says in str(refused.value)
    assert "hunter22" not in str(refused.value)


def test_app_refuses_to_start_with_a_bad_smtp_url(tmp_path):
    settings = Settings(data_dir=tmp_path, smtp_url="smtp://u:hunter22@mail.example?starttls=sometimes")
    with pytest.raises(ValueError, match="AIMICHAT_SMTP_URL: starttls") as refused:
        create_app(settings, engine=ScriptedEngine())
    assert "hunter22" not in str(refused.value)


# -- delivery ------------------------------------------------------------------------------------


def test_delivers_text_and_html_to_a_real_smtp_server(smtp_server):
    mailer = build_mailer(Settings(smtp_url=smtp_server.url, mail_from=SENDER))
    assert isinstance(mailer, SmtpMailer) and mailer.enabled
    send(mailer, "someone@example.com", "Hello there", "Plain words.\n", "<p>Rich words.</p>")
    [message] = smtp_server.messages
    assert message["From"] == SENDER and message["To"] == "someone@example.com"
    assert message["Subject"] == "Hello there"
    assert message["Message-ID"].endswith("@chat.example>") and message["Date"]
    assert text_of(message) == "Plain words.\n"
    assert message.get_body(("html",)).get_content().strip() == "<p>Rich words.</p>"


def test_text_only_mail_has_no_html_part(smtp_server):
    send(build_mailer(Settings(smtp_url=smtp_server.url)), "a@example.com", "Hi", "Just text.\n")
    [message] = smtp_server.messages
    assert not message.is_multipart() and message.get_content() == "Just text.\n"


def test_wrong_credentials_are_a_mail_error(smtp_server):
    url = smtp_server.url.replace(smtp_server.PASSWORD, "wrong")
    with pytest.raises(MailError, match="did not take the mail"):
        send(build_mailer(Settings(smtp_url=url)), "a@example.com", "Hi", "text")
    no_credentials = smtp_server.url.replace(f"{smtp_server.USER}:{smtp_server.PASSWORD}@", "")
    with pytest.raises(MailError):
        send(build_mailer(Settings(smtp_url=no_credentials)), "a@example.com", "Hi", "text")
    assert smtp_server.messages == []


def test_unreachable_server_is_a_mail_error():
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(MailError, match=f"127.0.0.1:{port}"):
        send(build_mailer(Settings(smtp_url=f"smtp://127.0.0.1:{port}?timeout=2")), "a@example.com", "Hi", "text")


def test_a_line_break_in_a_header_is_a_mail_error_not_a_second_header(smtp_server):
    mailer = build_mailer(Settings(smtp_url=smtp_server.url))
    with pytest.raises(MailError, match="could not build"):
        send(mailer, "a@example.com", "Hi\r\nBcc: victim@example.com", "text")
    assert smtp_server.messages == []


def test_without_smtp_a_mail_is_dropped_and_its_text_never_logged(caplog, tmp_path):
    app = create_app(Settings(data_dir=tmp_path), engine=ScriptedEngine())
    mailer = app.state.mailer
    assert isinstance(mailer, LogMailer) and not mailer.enabled
    with caplog.at_level(logging.DEBUG, logger="aimichat"):
        send(mailer, "a@example.com", "Reset", "Open http://x/password/reset?token=abc\n")
    [record] = [r for r in caplog.records if r.name == "aimichat.mail.mailer"]
    assert record.levelno == logging.INFO
    assert "email is off" in record.getMessage() and "a@example.com" in record.getMessage()
    assert "token=abc" not in caplog.text  # a live link in a log could be used by whoever reads it


# -- STARTTLS with credentials ---------------------------------------------------------------------


def test_credentials_over_smtp_require_starttls_unless_turned_off_outright():
    assert SmtpConfig.from_url("smtp://u:p@mail.example").start_tls is True
    assert SmtpConfig.from_url("smtp://u:p@mail.example").port == 25  # the port is the URL's, or as before
    assert SmtpConfig.from_url("smtp://u:p@mail.example:587").start_tls is True
    assert SmtpConfig.from_url("smtp://u:p@mail.example?starttls=false").start_tls is False
    assert SmtpConfig.from_url("smtps://u:p@mail.example").start_tls is False  # TLS from the first byte
    assert SmtpConfig.from_url("smtp://relay.internal").start_tls is None  # no password to protect


def test_a_server_that_offers_no_starttls_gets_no_password_and_no_mail(smtp_server):
    # The test server offers no STARTTLS, as a server behind a man in the middle who strips the offer.
    url = smtp_server.url.removesuffix("?starttls=false")
    assert "starttls" not in url
    with pytest.raises(MailError, match="did not take the mail"):
        send(build_mailer(Settings(smtp_url=url)), "a@example.com", "Hi", "text")
    assert smtp_server.messages == []


def test_starttls_false_with_credentials_works_and_warns(smtp_server, caplog):
    with caplog.at_level(logging.WARNING, logger="aimichat.mail"):
        mailer = build_mailer(Settings(smtp_url=smtp_server.url))
    [warning] = [r for r in caplog.records if r.name == "aimichat.mail.mailer"]
    assert warning.levelno == logging.WARNING and "travels in clear" in warning.getMessage()
    assert smtp_server.PASSWORD not in caplog.text
    send(mailer, "a@example.com", "Hi", "text")
    assert len(smtp_server.messages) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aimichat.mail"):
        build_mailer(Settings(smtp_url="smtp://relay.internal?starttls=false"))  # no credentials: nothing to warn of
    assert caplog.records == []


# -- aimichat mail test --------------------------------------------------------------------------


def test_cli_mail_test_sends_through_the_settings(smtp_server):
    env = {"AIMICHAT_SMTP_URL": smtp_server.url, "AIMICHAT_MAIL_FROM": SENDER}
    result = CliRunner().invoke(cli, ["mail", "test", "--to", "ops@example.com"], env=env)
    assert result.exit_code == 0, result.output
    assert "sent a test mail to ops@example.com" in result.output
    [message] = smtp_server.messages
    assert message["To"] == "ops@example.com" and message["From"] == SENDER


def test_cli_mail_test_fails_clearly(smtp_server):
    bad_password = {"AIMICHAT_SMTP_URL": smtp_server.url.replace(smtp_server.PASSWORD, "nope")}
    result = CliRunner().invoke(cli, ["mail", "test", "--to", "ops@example.com"], env=bad_password)
    assert result.exit_code == 1 and "did not take the mail" in result.output
    assert "Traceback" not in result.output

    bad_url = {"AIMICHAT_SMTP_URL": f"smtp://127.0.0.1:{free_port()}?starttls=perhaps"}
    result = CliRunner().invoke(cli, ["mail", "test", "--to", "ops@example.com"], env=bad_url)
    assert result.exit_code == 1 and "starttls must be true or false" in result.output

    result = CliRunner().invoke(cli, ["mail", "test", "--to", "ops@example.com"], env={"AIMICHAT_SMTP_URL": ""})
    assert result.exit_code == 1 and "email is off" in result.output
