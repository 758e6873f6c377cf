"""A key as the JSON APIs show it (the account API, the admin API): one shape, built in one place."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aimichat.store.clock import iso_utc
from aimichat.store.models import ApiKey

from . import service as keys


def grace_until(key: ApiKey, now: dt.datetime) -> dt.datetime | None:
    """Until when the secret a rotation replaced still works (None: it no longer does)."""
    until = key.previous_valid_until
    return until if key.previous_hash and until and until > now and key.revoked_at is None else None


def key_json(key: ApiKey, secret: str | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """A key as the APIs show it; ``secret`` only in the answer that creates the key. With ``now``,
    ``old_secret_valid_until`` says until when a rotation's old secret still works."""
    body: dict[str, Any] = {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "created": iso_utc(key.created_at),
        "last_used": iso_utc(key.last_used_at) if key.last_used_at else None,
        "revoked": iso_utc(key.revoked_at) if key.revoked_at else None,
        "status": keys.key_status(key),
        "limits": keys.key_limits(key).as_json(),
    }
    if now is not None:
        until = grace_until(key, now)
        body["old_secret_valid_until"] = iso_utc(until) if until else None
    if secret:
        body["key"] = secret
    return body
