"""A key's limits and a rotation's grace period as people type them (forms) and scripts send them (JSON).

The rules themselves are the key service's (``check_limits``: its messages are the ones shown); this
module only turns text into :class:`KeyLimits` and back, and refuses what the service cannot see is
wrong here: a number that is not one, a model this account's plan does not offer, an expiry already past.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from starlette.datastructures import FormData

from aimichat.keys.service import KeyLimits
from aimichat.store.models import ApiKey

MAX_COUNT = 2**31 - 1  # the columns are 32-bit integers
MAX_EXPIRY_DAYS = 100 * 366
MAX_GRACE = dt.timedelta(days=30)
COUNTS = {
    "daily_cap": "daily cap",
    "monthly_cap": "monthly cap",
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
}
LIMIT_FIELDS = tuple(f.name for f in fields(KeyLimits))
MOMENT_FORMAT = "%Y-%m-%dT%H:%M:%S"  # what <input type="datetime-local" step="1"> sends and shows


@dataclass(frozen=True)
class Grace:
    """One choice of the regenerate forms: how long the secret a rotation replaces keeps working."""

    value: str  # what the form sends
    label: str  # what the select shows, under "Old key stops working"
    phrase: str  # for the confirm dialog: "keeps working for <phrase>"
    span: dt.timedelta | None


GRACE_CHOICES = (
    Grace("", "At once", "", None),
    Grace("1h", "In 1 hour", "1 hour", dt.timedelta(hours=1)),
    Grace("24h", "In 24 hours", "24 hours", dt.timedelta(hours=24)),
    Grace("7d", "In 7 days", "7 days", dt.timedelta(days=7)),
)
_DURATION = re.compile(r"(\d{1,9})([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _count(text: str, label: str) -> int | None:
    """A whole number typed into a form ("" for none); the sign is left for the service to judge."""
    text = text.strip().replace(",", "").replace("_", "")
    if not text:
        return None
    if not re.fullmatch(r"[+-]?\d{1,12}", text):
        raise ValueError(f"the {label} must be a whole number")
    return _in_range(int(text), label)


def _in_range(value: int, label: str) -> int:
    if value > MAX_COUNT:
        raise ValueError(f"the {label} is too large")
    return value


def _moment(text: str, label: str = "expiry") -> dt.datetime:
    """An ISO-8601 time, read as UTC when it names no zone (as a datetime-local input sends it)."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"the {label} is not a date and time (2027-01-31T12:00)") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment


def _ranges(text: str) -> tuple[str, ...] | None:
    """CIDR ranges separated by commas, spaces or lines; none typed: no such limit."""
    ranges = tuple(part for part in re.split(r"[,\s]+", text) if part)
    return ranges or None


def _models(chosen: Iterable[str], offered: Iterable[str]) -> tuple[str, ...] | None:
    """The ticked models; none ticked: every model of the plan. A model not offered is refused."""
    chosen = [m for m in chosen if m]
    unknown = sorted(set(chosen) - set(offered))
    if unknown:
        raise ValueError(f"no model named {unknown[0]} is available to this account")
    return tuple(chosen) or None


@dataclass(frozen=True)
class LimitsForm:
    """The limits fields of the generate and edit forms, as typed (so a refused form comes back as it was)."""

    daily_cap: str = ""
    monthly_cap: str = ""
    rpm: str = ""
    tpm: str = ""
    expires_at: str = ""  # a datetime-local value, UTC
    expires_in: str = ""  # days from now: when given, it wins over expires_at
    models: tuple[str, ...] = ()
    ips: str = ""

    @classmethod
    def from_form(cls, form: FormData) -> LimitsForm:
        def text(name: str) -> str:
            value = form.get(name)
            return value if isinstance(value, str) else ""

        models = tuple(m for m in form.getlist("models") if isinstance(m, str))
        names = ("daily_cap", "monthly_cap", "rpm", "tpm", "expires_at", "expires_in", "ips")
        return cls(**{name: text(name) for name in names}, models=models)

    @classmethod
    def of(cls, limits: KeyLimits) -> LimitsForm:
        """The form filled in with a key's limits (empty where it has none)."""

        def number(value: int | None) -> str:
            return "" if value is None else str(value)

        return cls(
            daily_cap=number(limits.daily_cap),
            monthly_cap=number(limits.monthly_cap),
            rpm=number(limits.rpm),
            tpm=number(limits.tpm),
            expires_at=limits.expires_at.strftime(MOMENT_FORMAT) if limits.expires_at else "",
            models=limits.models or (),
            ips=", ".join(limits.ips or ()),
        )

    @property
    def any(self) -> bool:
        """Is any limit filled in (the generate form then opens its Limits section)?"""
        return any(getattr(self, f.name) for f in fields(self))

    def limits(self, now: dt.datetime, offered: Iterable[str], current: KeyLimits | None = None) -> KeyLimits:
        """The limits typed, or ValueError with a message for people. ``current``: the key's limits before
        an edit (an expiry left as it was is kept even when past, and so are models no longer offered)."""
        counts = {name: _count(getattr(self, name), label) for name, label in COUNTS.items()}
        expires_at = self._expiry(now, current)
        kept = (current.models or ()) if current else ()
        return KeyLimits(
            **counts,
            expires_at=expires_at,
            models=_models(self.models, [*offered, *kept]),
            ips=_ranges(self.ips),
        )

    def _expiry(self, now: dt.datetime, current: KeyLimits | None) -> dt.datetime | None:
        if self.expires_in.strip():
            days = _count(self.expires_in, "number of days until it expires")
            if days is None or not 1 <= days <= MAX_EXPIRY_DAYS:
                raise ValueError(f"a key expires in 1 to {MAX_EXPIRY_DAYS} days")
            return (now + dt.timedelta(days=days)).replace(microsecond=0)
        if not self.expires_at.strip():
            return None
        if current and current.expires_at and self.expires_at.strip() == current.expires_at.strftime(MOMENT_FORMAT):
            return current.expires_at  # unchanged: shown to the second, kept to the microsecond
        moment = _moment(self.expires_at)
        if moment <= now:
            raise ValueError("the expiry must be in the future")
        return moment


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
            return _in_range(value, COUNTS[name])
        if name == "expires_at":
            if not isinstance(value, str):
                raise ValueError("expires_at must be an ISO-8601 time such as 2027-01-31T12:00:00Z, or null")
            moment = _moment(value.replace("Z", "+00:00"))
            if moment <= now:
                raise ValueError("the expiry must be in the future")
            return moment
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, or null")
        return _models(value, offered) if name == "models" else tuple(value) or None
    except ValueError as exc:
        raise ValueError(str(exc), name) from None


def unknown_fields(body: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    return sorted(set(body) - set(allowed))


def grace_choice(value: str) -> dt.timedelta | None:
    """A regenerate form's grace period (one of :data:`GRACE_CHOICES`); ValueError for anything else."""
    for choice in GRACE_CHOICES:
        if value == choice.value:
            return choice.span
    raise ValueError("choose how long the old key keeps working from the list")


def parse_grace(value: Any) -> dt.timedelta | None:
    """The account API's ``grace``: seconds, or ``"90s"``, ``"30m"``, ``"1h"``, ``"24h"``, ``"7d"``; null
    or 0 for none. At most 30 days: a forgotten old secret should not outlive its replacement for long."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError('grace is a number of seconds or a duration such as "1h", "24h" or "7d"')
    if isinstance(value, int):
        seconds = value
    else:
        text = value.strip().lower()
        match = _DURATION.fullmatch(text)
        if not (match or text.isdigit()):
            raise ValueError('grace is a number of seconds or a duration such as "1h", "24h" or "7d"')
        seconds = int(match.group(1)) * _UNIT[match.group(2)] if match else int(text)
    if seconds < 0:
        raise ValueError("grace cannot be negative")
    span = dt.timedelta(seconds=seconds)
    if span > MAX_GRACE:
        raise ValueError("grace is at most 30 days")
    return span or None


def summary(key: ApiKey) -> list[str]:
    """A key's own limits in a few words each, for the keys list ("50 credits/day", ...)."""
    parts = []
    for value, unit in ((key.daily_cap, "credits/day"), (key.monthly_cap, "credits/month")):
        if value is not None:
            parts.append(f"{value:,} {unit}")
    for value, unit in ((key.rpm, "requests/min"), (key.tpm, "tokens/min")):
        if value is not None:
            parts.append(f"{value:,} {unit}")
    if key.expires_at is not None:
        parts.append(f"expires {key.expires_at:%Y-%m-%d %H:%M} UTC")
    if key.models is not None:
        parts.append(", ".join(key.models) if len(key.models) <= 2 else f"{len(key.models)} models")
    if key.ips is not None:
        parts.append(f"{len(key.ips)} IP range{'s' if len(key.ips) != 1 else ''}")
    return parts
