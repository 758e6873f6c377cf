"""Known devices: browsers that have logged in to an account before, which failed log-ins from elsewhere
cannot lock out (see ``throttle.py``).

Every successful log-in leaves (or keeps) a long-lived cookie in the browser with an entry for the account:
its id, a random nonce, and an HMAC-SHA256 of both keyed with the account's password hash. So an entry

- cannot be forged, or edited to name another account, without that hash, which never leaves the database;
- is good for its own account only: a known device of one's own account does nothing for anybody else's;
- needs no table: checking it takes the account row the log-in loads anyway;
- stops being good when the password changes (the hash does): a password change forgets every browser but
  the one that made it, which gets a new entry.

The entry is no credential: it only decides which throttle counts a log-in's failures. One cookie holds the
entries of up to ``MAX_ACCOUNTS`` accounts (a browser shared by a household), the latest first.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets

from aimichat.store.models import Account

COOKIE = "aimichat_device"
LIFETIME = dt.timedelta(days=365)
MAX_ACCOUNTS = 5
_MAX_LENGTH = 1024  # five entries take about 400 characters

Entry = tuple[str, str, str]  # account id, nonce, MAC


def _mac(account: Account, nonce: str) -> str:
    message = f"aimichat-known-device\0{account.id}\0{nonce}".encode()
    digest = hmac.new(account.password_hash.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _entries(cookie: str | None) -> list[Entry]:
    if not cookie or len(cookie) > _MAX_LENGTH or not cookie.isascii():  # (compare_digest takes ASCII only)
        return []
    entries = []
    for part in cookie.split("~")[:MAX_ACCOUNTS]:
        fields = part.split(".")
        if len(fields) == 3 and fields[0].isascii() and fields[0].isdigit() and all(fields):
            entries.append((fields[0], fields[1], fields[2]))
    return entries


def _genuine(account: Account, entry: Entry) -> bool:
    account_id, nonce, mac = entry
    return account_id == str(account.id) and hmac.compare_digest(mac, _mac(account, nonce))


def device_id(account: Account, cookie: str | None) -> str | None:
    """The browser's device id for ``account`` when its cookie holds a genuine entry for it, else None."""
    for entry in _entries(cookie):
        if _genuine(account, entry):
            return hashlib.sha256(f"{entry[0]}.{entry[1]}".encode()).hexdigest()
    return None


def session_device(session_token: str) -> str:
    """A logged-in browser's device id for its own account when it has no genuine cookie entry (a session
    from before known devices): its session, whose failures count apart from everybody else's."""
    return hashlib.sha256(b"aimichat-session-device\0" + session_token.encode()).hexdigest()


def remember(account: Account, cookie: str | None) -> str:
    """The cookie's value once ``account`` has logged in in this browser: its entry first (the same one if
    it was genuine, else a new one), then the other accounts' entries."""
    own = [entry for entry in _entries(cookie) if _genuine(account, entry)]
    if own:
        entry = own[0]
    else:
        nonce = secrets.token_urlsafe(16)
        entry = (str(account.id), nonce, _mac(account, nonce))
    others = [e for e in _entries(cookie) if e[0] != str(account.id)]
    return "~".join(".".join(e) for e in [entry, *others][:MAX_ACCOUNTS])
