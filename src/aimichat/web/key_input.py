"""A key's limits and a rotation's grace period as people type them into the key pages' forms.

The JSON side (the account API's and the admin API's bodies) and the pieces both read text with are
``keys.limits_input``; the rules themselves are the key service's (``check_limits``: its messages are the
ones shown). This module turns form fields into :class:`KeyLimits` and back.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields

from starlette.datastructures import FormData

from aimichat.keys.limits_input import COUNTS, count, models, moment
from aimichat.keys.limits_input import LIMIT_FIELDS as LIMIT_FIELDS  # the key pages read it here
from aimichat.keys.service import KeyLimits
from aimichat.store.models import ApiKey

MAX_EXPIRY_DAYS = 100 * 366
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


def _ranges(text: str) -> tuple[str, ...] | None:
    """CIDR ranges separated by commas, spaces or lines; none typed: no such limit."""
    ranges = tuple(part for part in re.split(r"[,\s]+", text) if part)
    return ranges or None


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
        counts = {name: count(getattr(self, name), label) for name, label in COUNTS.items()}
        expires_at = self._expiry(now, current)
        kept = (current.models or ()) if current else ()
        return KeyLimits(
            **counts,
            expires_at=expires_at,
            models=models(self.models, [*offered, *kept]),
            ips=_ranges(self.ips),
        )

    def _expiry(self, now: dt.datetime, current: KeyLimits | None) -> dt.datetime | None:
        if self.expires_in.strip():
            days = count(self.expires_in, "number of days until it expires")
            if days is None or not 1 <= days <= MAX_EXPIRY_DAYS:
                raise ValueError(f"a key expires in 1 to {MAX_EXPIRY_DAYS} days")
            return (now + dt.timedelta(days=days)).replace(microsecond=0)
        if not self.expires_at.strip():
            return None
        if current and current.expires_at and self.expires_at.strip() == current.expires_at.strftime(MOMENT_FORMAT):
            return current.expires_at  # unchanged: shown to the second, kept to the microsecond
        expiry = moment(self.expires_at)
        if expiry <= now:
            raise ValueError("the expiry must be in the future")
        return expiry


def grace_choice(value: str) -> dt.timedelta | None:
    """A regenerate form's grace period (one of :data:`GRACE_CHOICES`); ValueError for anything else."""
    for choice in GRACE_CHOICES:
        if value == choice.value:
            return choice.span
    raise ValueError("choose how long the old key keeps working from the list")


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
