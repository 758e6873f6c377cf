"""A key's limits and a rotation's grace period as scripts send them (JSON: the account API, the admin API)
and the pieces the web forms read them with (``web/key_input.py``).

The rules themselves are the key service's (``check_limits``: its messages are the ones shown); this
module only turns text and JSON values into :class:`KeyLimits` fields, and refuses what the service cannot
see is wrong here: a number that is not one, a model this account's plan does not offer, an expiry already
past or out of the calendar's range. Every refusal is a ValueError whose second argument, when there is
one, names the field at fault (the APIs' ``param``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from .service import KeyLimits

MAX_COUNT = 2**31 - 1  # the columns are 32-bit integers
MAX_GRACE = dt.timedelta(days=30)
COUNTS = {
    "daily_cap": "daily cap",
    "monthly_cap": "monthly cap",
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
}
LIMIT_FIELDS = tuple(f.name for f in fields(KeyLimits))
GRACE_HINT = 'grace is a number of seconds or a duration such as "1h", "24h" or "7d"'
# At most 7 digits: the largest grace (30 days) is 2,592,000 seconds; more digits are refused before any
# arithmetic, so no text can reach timedelta's range (OverflowError, a 500).
_SECONDS = re.compile(r"\d{1,7}", re.ASCII)
_DURATION = re.compile(r"(\d{1,9})([smhd])", re.ASCII)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def count(text: str, label: str) -> int | None:
    """A whole number typed into a form ("" for none); the sign is left for the service to judge."""
    text = text.strip().replace(",", "").replace("_", "")
    if not text:
        return None
    if not re.fullmatch(r"[+-]?\d{1,12}", text):
        raise ValueError(f"the {label} must be a whole number")
    return in_range(int(text), label)


def in_range(value: int, label: str) -> int:
    if value > MAX_COUNT:
        raise ValueError(f"the {label} is too large")
    return value


def moment(text: str, label: str = "expiry") -> dt.datetime:
    """An ISO-8601 time, read as UTC when it names no zone (as a datetime-local input sends it).

    A time at the calendar's edge whose zone moves it past year 9999 or before year 1 is refused like any
    other unreadable time (Python raises OverflowError converting it to UTC)."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
    except ValueError:
        raise ValueError(f"the {label} is not a date and time (2027-01-31T12:00)") from None
    except OverflowError:
        raise ValueError(f"the {label} is out of range: choose a time between years 1 and 9999 UTC") from None
    return value


def models(chosen: Iterable[str], offered: Iterable[str]) -> tuple[str, ...] | None:
    """The chosen models; none chosen: every model of the plan. A model not offered is refused."""
    chosen = [m for m in chosen if m]
    unknown = sorted(set(chosen) - set(offered))
    if unknown:
        raise ValueError(f"no model named {unknown[0]} is available to this account")
    return tuple(chosen) or None


def limits_from_json(body: dict[str, Any], offered: Iterable[str], now: dt.datetime) -> dict[str, Any]:
    """The limits named in a JSON body (``null`` removes one, a field left out stays as it is), checked
    for type; ValueError's second argument names the field at fault."""
    changes: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        if name in body:
            changes[name] = _json_limit(name, body[name], offered, now)
    return changes


def _json_limit(name: str, value: Any, offered: Iterable[str], now: dt.datetime) -> Any:
    if value is None:
        return None
    try:
        if name in COUNTS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"the {COUNTS[name]} must be a whole number or null")
            return in_range(value, COUNTS[name])
        if name == "expires_at":
            if not isinstance(value, str):
                raise ValueError("expires_at must be an ISO-8601 time such as 2027-01-31T12:00:00Z, or null")
            expiry = moment(value.replace("Z", "+00:00"))
            if expiry <= now:
                raise ValueError("the expiry must be in the future")
            return expiry
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, or null")
        return models(value, offered) if name == "models" else tuple(value) or None
    except ValueError as exc:
        raise ValueError(str(exc), name) from None


def unknown_fields(body: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    return sorted(set(body) - set(allowed))


def parse_grace(value: Any) -> dt.timedelta | None:
    """The APIs' ``grace``: seconds, or ``"90s"``, ``"30m"``, ``"1h"``, ``"24h"``, ``"7d"``; null or 0 for
    none. At most 30 days: a forgotten old secret should not outlive its replacement for long. ValueError
    (naming ``grace``) for anything else, however large."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(GRACE_HINT, "grace")
    if isinstance(value, int):
        seconds = value
    else:
        text = value.strip().lower()
        match = _DURATION.fullmatch(text)
        if match:
            seconds = int(match.group(1)) * _UNIT[match.group(2)]
        elif _SECONDS.fullmatch(text):
            seconds = int(text)
        elif text.isascii() and text.isdigit():
            raise ValueError("grace is at most 30 days", "grace")  # too many digits to be 30 days or less
        else:
            raise ValueError(GRACE_HINT, "grace")
    if seconds < 0:
        raise ValueError("grace cannot be negative", "grace")
    if seconds > MAX_GRACE.total_seconds():  # compared as a number: a huge one never becomes a timedelta
        raise ValueError("grace is at most 30 days", "grace")
    return dt.timedelta(seconds=seconds) or None
