"""Sign-up, log-in and password change as plain functions over a database session.

Log-in and password change return the new session token (the caller sets it as the cookie); sign-up
logs nobody in (see :func:`sign_up`). Each raises :class:`Refused` with a message fit for the person at
the keyboard.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from types import MappingProxyType
from urllib.parse import urlencode, urlsplit

from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from aimichat.accounts import service as accounts
from aimichat.store.models import Account

from . import devices, key_input, sessions, throttle


class Refused(Exception):
    """Sign-up, log-in or password change refused: ``message`` for the person, the HTTP ``status``, and
    ``retry_after`` seconds when throttled."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


def sign_up(
    session: Session, email: str, password: str, *, tier: str, now: dt.datetime, address: str = "unknown"
) -> Account | None:
    """Sign up, counted against ``address``'s sign-up limit: the new account, or None when the email already
    has one (left as it was). Nobody is logged in either way, and callers answer both alike: the answer must
    not tell which emails have accounts (see ``accounts.register``)."""
    wait = throttle.signup_retry_after(session, address, now)
    if wait:
        minutes = max(1, round(wait / 60))
        raise Refused(
            f"Too many sign-ups from your network (at most {throttle.MAX_SIGNUPS} an hour). "
            f"Try again in {_minutes(minutes)}.",
            429,
            wait,
        )
    try:
        account = accounts.register(session, email, password, tier=tier)
    except accounts.AccountError as exc:
        raise Refused(_sentence(str(exc))) from None
    throttle.record_signup(session, address, now)
    return account


def log_in(
    session: Session,
    email: str,
    password: str,
    *,
    address: str,
    now: dt.datetime,
    old_token: str | None = None,
    known: str | None = None,
) -> tuple[Account, str]:
    """Check the throttle, then the password; failures are committed even though we raise.

    ``known`` is the browser's known-device cookie (``devices.py``): a genuine entry for this account makes
    the log-in count against that browser's own failures alone. An unknown email takes as long as a wrong
    password (``accounts.verify_login``)."""
    account = _find(session, email)
    device = devices.device_id(account, known) if account is not None else None
    _check_throttle(session, email, address, now, device)
    verified = accounts.verify_login(account, password)  # as long without an account as with one
    if account is None or not verified:
        _fail(session, email, address, now, device)
        raise Refused("Wrong email or password.")
    if account.disabled:
        raise Refused("This account is disabled. Contact the operator of this server.", 403)
    accounts.upgrade_hash(account, password)
    throttle.clear(session, email, address, device=device)
    return account, sessions.start(session, account, now, replacing=old_token)


def change_password(
    session: Session,
    account: Account,
    current: str,
    new: str,
    *,
    address: str,
    now: dt.datetime,
    known: str | None = None,
    session_token: str | None = None,
) -> str:
    """Change the password and log out every other session (a thief's included); the new token is ours.

    ``account`` must be loaded in ``session`` (the web's visitor is: one session per request). Wrong current
    passwords count as failed log-ins of this browser (its known-device entry, else its session), so a
    stolen session is no password oracle, and nobody else's failures hold the owner back."""
    device = devices.device_id(account, known) or (devices.session_device(session_token) if session_token else None)
    _check_throttle(session, account.email, address, now, device)
    if not accounts.verify_password(account, current):
        _fail(session, account.email, address, now, device)
        raise Refused("The current password is wrong.")
    try:
        accounts.change_password(session, account, current, new)
    except accounts.AccountError as exc:
        raise Refused(_sentence(str(exc))) from None
    sessions.end_all(session, account.id)
    return sessions.start(session, account, now)


# -- why the log-in page is shown -------------------------------------------------------------------

# What each page needs a log-in for, by its first path segment. The log-in URL carries only a reason code
# and the page's path, never the words: a crafted link cannot put its own message on the log-in page.
PAGE_WORDS = MappingProxyType(
    {
        "keys": "Log in to see your API keys",
        "usage": "Log in to see your usage",
        "playground": "Log in to use the playground",
        "account": "Log in to see your account",
        "plan": "Log in to see your plan",
        "webhooks": "Log in to see your webhooks",
        "verify": "Log in to confirm your email",
        "admin": "Log in to open the admin pages",
    }
)
REASONS = ("login", "expired")


def login_url(target: str, *, expired: bool) -> str:
    """Where a page that needs a log-in sends the visitor: /login with why, and ``target`` to come back to
    (none for "/" or "", a POST with no page to come back to: see :func:`return_target`)."""
    query = {"next": target} if target and target != "/" else {}
    query["reason"] = "expired" if expired else "login"
    return "/login?" + urlencode(query, safe="/")


DRAFT_WORDS = "Log in and your form comes back as you typed it, to send again"


def login_notice(target: str, reason: str) -> str:
    """What the log-in page says about why it is shown: "" unless ``reason`` is one of :data:`REASONS`."""
    if reason not in REASONS:
        return ""
    if key_input.is_draft(target):  # a key form met a lapsed session: nothing was done, nothing is lost
        kept = f"Nothing was changed. {DRAFT_WORDS}."
        return f"Your session expired before your form was sent. {kept}" if reason == "expired" else kept
    words = PAGE_WORDS.get(target.lstrip("/").split("/", 1)[0].split("?", 1)[0], "Log in to continue")
    return f"Your session expired. {words}." if reason == "expired" else f"{words}."


def from_this_site(fetch_site: str | None, origin: str | None, own: Collection[str]) -> bool:
    """Did the browser say a POST came from a page of this very site? ``Sec-Fetch-Site`` when it sent one
    (current browsers do, on https and on localhost), else ``Origin`` against ``own`` (:func:`own_origins`).
    Neither header: no. A cross-site form arrives without the SameSite=Lax session cookie, so it looks like a
    lapsed session; this is what tells it from the person's own form."""
    if fetch_site is not None:
        return fetch_site.strip().lower() == "same-origin"
    return origin is not None and origin.strip().lower() in own


def own_origins(request: Request) -> frozenset[str]:
    """This site's origins, lower case: the one the request was sent to, and ``AIMICHAT_PUBLIC_URL``'s."""
    origins = {f"{request.url.scheme}://{request.url.netloc}"}
    public = request.app.state.settings.public_url
    if public:
        parts = urlsplit(public)
        origins.add(f"{parts.scheme}://{parts.netloc}")
    return frozenset(origin.lower() for origin in origins)


async def return_target(request: Request, draft_key: str | None = None) -> str:
    """Where the log-in page sends back a visitor whom ``request`` found logged out: the page of a GET; for a
    key form POSTed after the session lapsed, that form's page filled in with what was typed
    (``key_input.draft_target``, never the CSRF token, signed with ``draft_key``: the browser's pre-log-in
    CSRF secret), so nothing typed is lost and nothing is done without a fresh token; only the page when the
    browser did not say the form came from this site (:func:`from_this_site`); "" for any other POST, or a
    body that is not a readable form."""
    if request.method == "GET":
        return request.url.path
    kind = request.headers.get("content-type", "")
    if not kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return ""
    try:
        form = await request.form()  # read already, and cached, when the route took Form fields
    except (HTTPException, ClientDisconnect):  # a malformed body: there is nothing to keep
        return ""
    headers = request.headers
    if not from_this_site(headers.get("sec-fetch-site"), headers.get("origin"), own_origins(request)):
        draft_key = None  # another site's form: its fields must never come back filled in
    return key_input.draft_target(request.url.path, form, key=draft_key, now=request.app.state.clock())


def _check_throttle(session: Session, email: str, address: str, now: dt.datetime, device: str | None) -> None:
    wait = throttle.retry_after(session, email, address, now, device=device)
    if wait:
        minutes = max(1, round(wait / 60))
        where = "from this browser" if device else "for this email or from your network"
        raise Refused(
            f"Too many failed log-in attempts {where}. Wait {_minutes(minutes)} and try again.",
            429,
            retry_after=wait,
        )


def _fail(session: Session, email: str, address: str, now: dt.datetime, device: str | None) -> None:
    throttle.record_failure(session, email, address, now, device=device)
    session.commit()  # the caller rolls back on Refused; the failure must count anyway


def _find(session: Session, email: str) -> Account | None:
    try:
        return accounts.get_account(session, email)
    except accounts.AccountError:
        return None


def _minutes(n: int) -> str:
    return f"{n} minute{'s' if n != 1 else ''}"


def _sentence(message: str) -> str:
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
