"""Keys reported leaked (``POST /v1/keys/report``): revoke, tell the owner, keep the report.

Anybody may report a key, without authentication, as GitHub's secret scanning and token-revocation API
do. A well-formed key (format and checksum, checked offline) that is live is revoked at once; a secret a
rotation replaced, still inside its grace period, stops at once instead (the key's new secret stays).
The owner is told by email and webhook, with where the key was found when the report says. Every
report is kept (``key_reports``): the outcome, the client address and the source, never the text
reported. The caller learns nothing of the outcome (the route answers 202 whatever it was), and the
rows of one address over the last minute are its rate limit, shared by every replica.

An admin key (``aimichat_admin_...``, ``keys.admin_keys``) reported live is revoked too: it belongs to no
account, so nobody is mailed; the report, the audit log (``admin_key.reported_leaked``) and the server's
log keep it for the operators.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from aimichat.audit import service as audit
from aimichat.keys import admin_keys, tokens
from aimichat.keys import service as keys
from aimichat.store.clock import iso_utc
from aimichat.store.models import AdminKey, ApiKey, KeyReport

from . import service

MAX_ITEMS = 100  # keys in one report (GitHub sends batches)
MAX_SOURCE = 2000
RATE_WINDOW = dt.timedelta(minutes=1)

log = logging.getLogger(__name__)

Outcome = Literal["revoked", "inactive", "unknown", "malformed", "admin_revoked", "admin_inactive"]


class BadReport(ValueError):
    """The body is not a report (not a key or a list of them): the message says what is expected."""


@dataclass(frozen=True)
class Reported:
    key: str
    source: str | None  # where it was found (a URL), if the report says


@dataclass(frozen=True)
class Handled:
    outcome: Outcome
    key_id: int | None  # the key it matched, if any


SHAPE = 'send {"key": "aimichat_..."} or a list such as [{"token": "aimichat_...", "url": "https://..."}]'


def parse_report(body: object) -> list[Reported]:
    """The keys a report names: ``{"key": ...}`` (and ``"url"``) or a list of ``{"token": ..., "url": ...}``
    (GitHub's token-revocation format; ``"key"`` works there too). BadReport for anything else."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise BadReport("The report names no key: " + SHAPE + ".")
    if len(items) > MAX_ITEMS:
        raise BadReport(f"At most {MAX_ITEMS} keys per report; send the rest in another.")
    found = []
    for item in items:
        if not isinstance(item, dict):
            raise BadReport("Each report is an object with the key: " + SHAPE + ".")
        key = item.get("key", item.get("token"))
        if not isinstance(key, str):
            raise BadReport("Each report needs the key as a string: " + SHAPE + ".")
        found.append(Reported(key.strip(), _source(item.get("url"))))
    return found


def _source(url: object) -> str | None:
    """Where the key was found, as kept: the text given, or None; BadReport for what no column can hold."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise BadReport("The url, where the key was found, must be a string.")
    url = url.strip()[:MAX_SOURCE]
    try:
        url.encode("utf-8")  # JSON's "\ud800" (half a surrogate pair) is no UTF-8 text
    except UnicodeEncodeError:
        raise BadReport("The url is not valid Unicode text.") from None
    if "\x00" in url:  # PostgreSQL's text refuses NUL
        raise BadReport("The url must not contain NUL characters.")
    return url or None


def retry_after(session: Session, address: str, now: dt.datetime, per_minute: int) -> int | None:
    """Seconds until ``address`` may report again, or None when it may now."""
    recent = session.scalars(
        select(KeyReport.created_at)
        .where(KeyReport.address == address[:64], KeyReport.created_at > now - RATE_WINDOW)
        .order_by(KeyReport.created_at.desc())
        .limit(per_minute)
    ).all()
    if len(recent) < per_minute:
        return None
    return max(1, math.ceil((recent[-1] + RATE_WINDOW - now).total_seconds()))


def report_keys(
    session: Session, reports: list[Reported], address: str, now: dt.datetime, *, email: bool
) -> list[Handled]:
    """Handle each reported key and keep the report; ``email``: whether mail can be sent. The caller commits
    (the revocation, its audit rows, the owner's notices and the report land together)."""
    audit.act_as(session, audit.REPORT)
    handled = []
    for report in reports:
        result = _handle(session, report, now, email)
        session.add(
            KeyReport(
                created_at=now, address=address[:64], source=report.source, outcome=result.outcome, key_id=result.key_id
            )
        )
        handled.append(result)
    session.flush()
    return handled


def _handle(session: Session, report: Reported, now: dt.datetime, email: bool) -> Handled:
    if not report.key.isascii():  # no key is; and the checksum's constant-time compare takes ASCII only
        return Handled("malformed", None)
    if report.key.startswith(admin_keys.PREFIX):
        return _handle_admin(session, report)
    if not tokens.is_well_formed(report.key):
        return Handled("malformed", None)
    digest = tokens.hash_key(report.key)
    key = session.scalar(select(ApiKey).where(or_(ApiKey.key_hash == digest, ApiKey.previous_hash == digest)))
    if key is None:
        return Handled("unknown", None)
    if key.revoked_at is not None:
        return Handled("inactive", key.id)
    if secrets.compare_digest(key.key_hash, digest):
        keys.revoke_key(session, key.id)
        old_secret = False
    else:  # the secret a rotation replaced
        until = key.previous_valid_until
        if until is None or now >= until:
            return Handled("inactive", key.id)
        key.previous_hash, key.previous_valid_until = None, None
        old_secret = True
    audit.key_reported_leaked(session, key.id, report.source)
    service.queue_event(session, key.account_id, leaked_event(key, report.source, old_secret, now), now, email=email)
    return Handled("revoked", key.id)


def _handle_admin(session: Session, report: Reported) -> Handled:
    if not admin_keys.is_well_formed(report.key):
        return Handled("malformed", None)
    digest = tokens.hash_key(report.key)
    key = session.scalar(select(AdminKey).where(AdminKey.key_hash == digest))
    if key is None or not secrets.compare_digest(key.key_hash, digest):
        return Handled("unknown", None)
    if key.revoked_at is not None:
        return Handled("admin_inactive", None)
    admin_keys.revoke(session, key.id)
    detail = {"reported_from": report.source[:500]} if report.source else {}
    audit.record(session, audit.REPORT, "admin_key.reported_leaked", audit.admin_key_actor(key.id), detail)
    log.warning("admin key %s (%s…) was reported leaked and is revoked", key.id, key.prefix)
    return Handled("admin_revoked", None)


def leaked_event(key: ApiKey, source: str | None, old_secret: bool, now: dt.datetime) -> service.Event:
    what = f"The previous secret of your API key “{key.name}”" if old_secret else f"Your API key “{key.name}”"
    done = (
        "That old secret no longer works; the key's current secret still does."
        if old_secret
        else "The key is revoked: requests made with it are refused. Create a new key on the API keys page."
    )
    where = f" It was found at {source}." if source else ""
    text = f"{what} ({key.prefix}…) was reported as leaked at {iso_utc(now)}.{where}\n{done}\n"
    data = {
        "key_id": key.id,
        "key_name": key.name,
        "key_prefix": key.prefix,
        "previous_secret": old_secret,
        "reported_at": iso_utc(now),
        "source": source,
    }
    subject = "AimiChat: an API key of yours was reported leaked"
    return service.Event("key.reported_leaked", data, subject=subject, text=text, timestamp=now)
