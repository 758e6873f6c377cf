"""Emailed links, as plain functions over a database session: sign-up verification and password reset.

Each function returns what to mail (a :class:`Letter`, sent by the caller after its commit, see
:func:`deliver`) or the account a link was spent for, and raises :class:`Throttled` or
``mail.links.LinkRefused`` with a message for the person at the keyboard. Rules (docs/email.md):

- A link is a single-use token (``mail.links``): 24 hours to confirm an email, 1 hour to reset a password.
- The forgot-password form answers the same whatever was typed, so it tells nobody which emails have
  accounts: a mail leaves only for an enabled account, at most ``links.MAX_SENDS`` an hour per account (more
  are dropped silently), and each client address may ask ``MAX_RESET_REQUESTS`` times per ``RESET_WINDOW``
  (counted whatever the email, so that limit tells nothing either).
- A reset sets the new password (the sign-up's rules), ends every web session of the account, voids its
  other reset links and, since the mail reached its owner, marks the email verified.
- Links point at ``AIMICHAT_PUBLIC_URL``, else at the host and port the server listens on: never at the
  request's Host header, which whoever asks for a reset chooses (a link to their own server would hand them
  the victim's token).
- While email is off (no ``AIMICHAT_SMTP_URL``) no link is made at all: a link that cannot be mailed would
  only end up in the log, where anyone who asked for a reset of an admin's address could wait for it. The
  operator makes a reset link by hand instead (:func:`operator_reset_link`, ``aimichat accounts reset-link``).
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import Session

from aimichat.accounts import service as accounts
from aimichat.audit import service as audit
from aimichat.config import Settings
from aimichat.mail import Mailer, MailError, links
from aimichat.store.models import Account, LoginAttempt

from . import sessions, throttle

log = logging.getLogger(__name__)

RESET_WINDOW = throttle.WINDOW  # 15 minutes (the log-in throttle prunes marker rows older than that)
MAX_RESET_REQUESTS = 5  # per client address
RESET_MARKER = "#reset"  # its rows in login_attempts (no email key starts with "#": see throttle.email_key)


@dataclass(frozen=True)
class Letter:
    """A mail to send: what ``Mailer.send`` takes."""

    to: str
    subject: str
    text: str
    html: str


class Throttled(Exception):
    """Too many mails or requests: ``message`` for the person, ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def link_base(settings: Settings) -> str:
    """Where emailed links point: the public URL, else the address this server listens on."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"


def needs_verification(settings: Settings, account: Account | None) -> bool:
    """Must this account confirm its email before making keys or spending credits?"""
    return settings.email_verification and account is not None and account.email_verified_at is None


MAIL_OFF = (
    "email is off (no AIMICHAT_SMTP_URL): no %s link was made; an operator can make a reset link with "
    "`aimichat accounts reset-link EMAIL` (it also confirms the address)"
)


# -- verification --------------------------------------------------------------------------------


def verification_letter(
    session: Session, account: Account, *, base: str, now: dt.datetime, mail_on: bool
) -> Letter | None:
    """A new confirmation link for ``account``; Throttled after ``links.MAX_SENDS`` an hour. None while
    email is off (``mail_on`` False): no link is made, since it could not be mailed."""
    if not mail_on:
        log.info(MAIL_OFF, "confirmation")
        return None
    wait = links.send_retry_after(session, account.id, links.VERIFY, now)
    if wait:
        raise Throttled(
            f"We have sent {links.MAX_SENDS} links in the last hour. Check your spam folder, or ask again "
            f"in {_minutes(wait)}.",
            wait,
        )
    token = links.issue(session, account.id, links.VERIFY, now)
    url = f"{base}/verify/email?{urlencode({'token': token})}"
    text = (
        "Hello,\n\n"
        "someone (we hope you) signed up for AimiChat with this address. Open this link to confirm it:\n\n"
        f"{url}\n\n"
        "The link works once, for 24 hours. If you did not sign up, ignore this mail: nothing happens.\n"
    )
    return Letter(account.email, "Confirm your email for AimiChat", text, _html(text, url, "Confirm my email"))


def verify(session: Session, token: str, now: dt.datetime) -> Account:
    """Spend a confirmation link: the account, now verified. LinkRefused for a bad, spent or expired link."""
    account = session.get(Account, links.spend(session, token, links.VERIFY, now))
    assert account is not None  # email_tokens rows go with their account (ON DELETE CASCADE)
    if account.email_verified_at is None:
        account.email_verified_at = now
    links.void(session, account.id, links.VERIFY, now)
    session.flush()
    return account


# -- password reset ------------------------------------------------------------------------------


def reset_letter(
    session: Session, email: str, *, address: str, base: str, now: dt.datetime, mail_on: bool
) -> Letter | None:
    """What the forgot-password form mails: a reset link, or None (no such enabled account, its hourly mails
    are spent, or email is off: then no link is made at all). Throttled per client address only, whatever the
    email, so no answer tells accounts apart.
    """
    wait = _reset_requests_wait(session, address, now)
    if wait:
        raise Throttled(
            f"Too many reset requests from your network (at most {MAX_RESET_REQUESTS} in "
            f"{_minutes(int(RESET_WINDOW.total_seconds()))}). Try again in {_minutes(wait)}.",
            wait,
        )
    session.execute(delete(LoginAttempt).where(_reset_rows(address), LoginAttempt.created_at <= now - RESET_WINDOW))
    session.add(LoginAttempt(email=RESET_MARKER, address=address[:64], created_at=now))
    if not mail_on:
        log.info(MAIL_OFF, "password reset")
        return None
    try:
        account = accounts.get_account(session, email)
    except accounts.AccountError:
        return None
    if account.disabled or links.send_retry_after(session, account.id, links.RESET, now):
        return None
    url = _reset_url(session, account, base, now)
    text = (
        "Hello,\n\n"
        "someone asked to reset the password of the AimiChat account of this address. To choose a new one, "
        "open this link:\n\n"
        f"{url}\n\n"
        "The link works once, for 1 hour. Setting a new password logs out every browser signed in to the "
        "account. If you did not ask for this, ignore this mail: your password stays as it is.\n"
    )
    return Letter(account.email, "Reset your AimiChat password", text, _html(text, url, "Choose a new password"))


def operator_reset_link(session: Session, email: str, *, base: str, now: dt.datetime) -> str:
    """A reset link for the account of ``email``, for its operator to hand over (``aimichat accounts
    reset-link``): single-use, for 1 hour, like a mailed one; the send throttle does not apply to operators.
    AccountError for an unknown or disabled account. Audited as ``account.reset_link_made``."""
    account = accounts.get_account(session, email)
    if account.disabled:
        raise accounts.AccountError(f"{account.email} is disabled: enable it first (aimichat accounts enable)")
    url = _reset_url(session, account, base, now)
    audit.note(session, "account.reset_link_made", f"account:{account.id}", {"email": account.email})
    return url


def _reset_url(session: Session, account: Account, base: str, now: dt.datetime) -> str:
    token = links.issue(session, account.id, links.RESET, now)
    return f"{base}/password/reset?{urlencode({'token': token})}"


def reset_account(session: Session, token: str, now: dt.datetime) -> Account:
    """The account a reset link is for, without spending it (the page the link opens)."""
    account = session.get(Account, links.check(session, token, links.RESET, now))
    assert account is not None
    return account


def reset_password(session: Session, token: str, password: str, now: dt.datetime) -> Account:
    """Spend a reset link and set ``password``: AccountError for a weak password (the link still works),
    LinkRefused for a bad, spent or expired link. Every web session of the account ends."""
    accounts.check_password_strength(password)  # before the link is spent, so a typo costs no new mail
    account = session.get(Account, links.spend(session, token, links.RESET, now))
    assert account is not None
    accounts.reset_password(session, account, password)
    if account.email_verified_at is None:
        account.email_verified_at = now  # the link reached the address's owner
    links.void(session, account.id, links.RESET, now)
    sessions.end_all(session, account.id)
    session.flush()
    return account


def _reset_rows(address: str) -> ColumnElement[bool]:
    return (LoginAttempt.email == RESET_MARKER) & (LoginAttempt.address == address[:64])


def _reset_requests_wait(session: Session, address: str, now: dt.datetime) -> int | None:
    recent = session.scalars(
        select(LoginAttempt.created_at)
        .where(_reset_rows(address), LoginAttempt.created_at > now - RESET_WINDOW)
        .order_by(LoginAttempt.created_at.desc())
        .limit(MAX_RESET_REQUESTS)
    ).all()
    if len(recent) < MAX_RESET_REQUESTS:
        return None
    return max(1, int((recent[-1] + RESET_WINDOW - now).total_seconds() + 0.999))


# -- sending -------------------------------------------------------------------------------------


async def deliver(mailer: Mailer, letter: Letter) -> None:
    """Send ``letter`` after the response (a background task): a failure is logged, never shown, since the
    page has already answered alike whether a mail left or not. The log line names no link."""
    try:
        await mailer.send(letter.to, letter.subject, letter.text, letter.html)
    except MailError as exc:
        log.warning("the mail %r to %s was not sent: %s", letter.subject, letter.to, exc)


def _html(text: str, url: str, action: str) -> str:
    paragraphs = [p for p in text.split("\n\n") if p.strip() and p.strip() != url]
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs[:-1])
    button = f'<p><a href="{html.escape(url)}">{html.escape(action)}</a></p>'
    return f"<!doctype html><html><body>{body}{button}<p>{html.escape(paragraphs[-1])}</p></body></html>"


def _minutes(seconds: int) -> str:
    n = max(1, round(seconds / 60))
    return f"{n} minute{'s' if n != 1 else ''}"
