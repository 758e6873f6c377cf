"""Sending mail: ``await mailer.send(to, subject, text, html)``, over SMTP or written to the log.

``create_app`` builds one mailer (``app.state.mailer``) from ``AIMICHAT_SMTP_URL`` and ``AIMICHAT_MAIL_FROM``.
Without an SMTP URL it is a :class:`LogMailer`: a mail is dropped, and the log says so with its recipient and
subject, never its text (a mail may hold a live link: the log is no place for it); the pages say that email
is off, and no link is made then (docs/email.md). Whatever goes wrong on the way to the SMTP server is one
:class:`MailError`, so callers catch one thing and may retry.
"""

from __future__ import annotations

import abc
import email.utils
import logging
from dataclasses import dataclass, field
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from aimichat.config import Settings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds for the whole SMTP conversation
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class MailError(Exception):
    """A mail was not accepted by the SMTP server (unreachable, refused, timed out, bad credentials)."""


class Mailer(abc.ABC):
    """Sends one mail. ``enabled`` is False where mail only reaches the log (the pages then say email is off)."""

    enabled: bool = True

    @abc.abstractmethod
    async def send(self, to: str, subject: str, text: str, html: str | None = None) -> None:
        """Hand the mail to the server; :class:`MailError` if it was not accepted."""


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to deliver, read from ``AIMICHAT_SMTP_URL``."""

    hostname: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, so never in a log line
    use_tls: bool = False  # smtps://: TLS from the first byte
    # True: required; False: never; None: if the server offers it (only without credentials: a man in the
    # middle can strip the offer, and the password would then travel in clear).
    start_tls: bool | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        """``smtp://user:pass@host:587?starttls=true`` or ``smtps://user:pass@host:465``; ValueError says what
        is wrong without repeating the URL (it may hold a password)."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ValueError("AIMICHAT_SMTP_URL is not a valid URL (is the port a number?)") from None
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError("AIMICHAT_SMTP_URL must start with smtp:// or smtps://")
        if not parts.hostname:
            raise ValueError("AIMICHAT_SMTP_URL names no host: smtp://user:pass@host:587")
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ValueError("AIMICHAT_SMTP_URL has a malformed query: use ?starttls=true&timeout=10") from None
        unknown = sorted(set(query) - {"starttls", "timeout"})
        if unknown:
            raise ValueError(f"AIMICHAT_SMTP_URL: unknown option {unknown[0]!r} (known: starttls, timeout)")
        start_tls = _flag(query["starttls"][-1]) if "starttls" in query else None
        use_tls = parts.scheme == "smtps"
        if use_tls and start_tls:
            raise ValueError("AIMICHAT_SMTP_URL: smtps:// is TLS already; starttls=true is for smtp://")
        default_port = 465 if use_tls else 587 if start_tls else 25
        if parts.username and start_tls is None:
            start_tls = not use_tls  # credentials over smtp:// go only over TLS, unless starttls=false says so
        timeout = _seconds(query["timeout"][-1]) if "timeout" in query else DEFAULT_TIMEOUT
        return cls(
            hostname=parts.hostname,
            port=port or default_port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            use_tls=use_tls,
            start_tls=False if use_tls else start_tls,
            timeout=timeout,
        )


def _flag(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"AIMICHAT_SMTP_URL: starttls must be true or false, not {value!r}")


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if not 0 < seconds <= 300:
        raise ValueError(f"AIMICHAT_SMTP_URL: timeout must be seconds between 0 and 300, not {value!r}")
    return seconds


def build_message(sender: str, to: str, subject: str, text: str, html: str | None = None) -> EmailMessage:
    """A MIME message: plain text, with an HTML alternative when given. ValueError for a header that would
    break the message (a line break in the subject or the address)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(usegmt=True)
    domain = email.utils.parseaddr(sender)[1].rpartition("@")[2] or None
    message["Message-ID"] = email.utils.make_msgid(domain=domain)
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


class SmtpMailer(Mailer):
    """Delivers over SMTP with aiosmtplib: one connection per mail (mail is rare here; no pool to go stale)."""

    def __init__(self, config: SmtpConfig, sender: str) -> None:
        self.config = config
        self.sender = sender

    async def send(self, to: str, subject: str, text: str, html: str | None = None) -> None:
        try:
            message = build_message(self.sender, to, subject, text, html)
        except ValueError as exc:
            raise MailError(f"could not build the mail to {to!r}: {exc}") from exc
        cfg = self.config
        try:
            await aiosmtplib.send(
                message,
                hostname=cfg.hostname,
                port=cfg.port,
                username=cfg.username,
                password=cfg.password,
                use_tls=cfg.use_tls,
                start_tls=cfg.start_tls,
                timeout=cfg.timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:  # OSError: refused, unreachable, TLS failures
            raise MailError(f"the SMTP server {cfg.hostname}:{cfg.port} did not take the mail to {to}: {exc}") from exc


class LogMailer(Mailer):
    """No SMTP settings: a mail is dropped; the log says to whom and about what, never its text, which may
    hold a live link (a reset link in a log would let whoever reads it set the password)."""

    enabled = False

    async def send(self, to: str, subject: str, text: str, html: str | None = None) -> None:
        log.info("email is off (no AIMICHAT_SMTP_URL): a mail to %s (%r) was not sent", to, subject)


def build_mailer(settings: Settings) -> Mailer:
    """The mailer the settings ask for; ValueError (naming the setting, never its password) for a bad URL."""
    if settings.smtp_url is None or not settings.smtp_url.get_secret_value().strip():
        return LogMailer()
    config = SmtpConfig.from_url(settings.smtp_url.get_secret_value())
    if config.username and not config.use_tls and config.start_tls is False:
        log.warning(
            "AIMICHAT_SMTP_URL has starttls=false: the SMTP password to %s:%d travels in clear",
            config.hostname,
            config.port,
        )
    return SmtpMailer(config, settings.mail_from)
