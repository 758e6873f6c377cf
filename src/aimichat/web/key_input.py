"""A key's limits and a rotation's grace period as people type them into the key pages' forms.

The JSON side (the account API's and the admin API's bodies) and the pieces both read text with are
``keys.limits_input``; the rules themselves are the key service's (``check_limits``: its messages are the
ones shown). This module turns form fields into :class:`KeyLimits` and back, says which field a refusal
concerns (the pages show it next to that field), and keeps a form's fields through a log-in (a draft).
"""

from __future__ import annotations

import base64
import calendar
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import ImmutableMultiDict

from aimichat.keys import service as keys
from aimichat.keys.limits_input import COUNTS, count, models, moment
from aimichat.keys.limits_input import LIMIT_FIELDS as LIMIT_FIELDS  # the key pages read it here
from aimichat.keys.service import KeyLimits
from aimichat.store.models import ApiKey

MAX_EXPIRY_DAYS = 100 * 366
MOMENT_FORMAT = "%Y-%m-%dT%H:%M:%S"  # what <input type="datetime-local" step="1"> sends and shows
# A posted form (FormData) or a page's query (QueryParams): the limits are read alike from both.
Fields = ImmutableMultiDict[str, Any]
T = TypeVar("T")
P = ParamSpec("P")


def at(field: str, read: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``read(...)``, its ValueError naming ``field`` as its second argument (``keys.limits_input``'s
    convention), so the page can show the message next to that field."""
    try:
        return read(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(str(exc.args[0] if exc.args else exc), field) from None


def field_of(exc: ValueError) -> str | None:
    """The form field a refusal concerns (``at``), or None when it concerns the form as a whole."""
    return exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else None


def key_name(text: str) -> str:
    """A key's name as the create and rename forms take it (the key service's rule), refusals naming "name"."""
    return at("name", keys.clean_name, text)


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
    def from_form(cls, form: Fields) -> LimitsForm:
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
        """The limits typed, or ValueError with a message for people naming the field at fault (``at``).
        ``current``: the key's limits before an edit (an expiry left as it was is kept even when past, and so
        are models no longer offered)."""
        counts = {name: at(name, self._count, name, label) for name, label in COUNTS.items()}
        expires_at = at("expires_in" if self.expires_in.strip() else "expires_at", self._expiry, now, current)
        kept = (current.models or ()) if current else ()
        ranges = _ranges(self.ips)
        at("ips", keys.check_limits, KeyLimits(ips=ranges))
        return KeyLimits(
            **counts,
            expires_at=expires_at,
            models=at("models", models, self.models, [*offered, *kept]),
            ips=ranges,
        )

    def _count(self, name: str, label: str) -> int | None:
        # The service judges the sign (a negative cap, a rate under 1); asked here for this field alone.
        value = count(getattr(self, name), label)
        alone: dict[str, Any] = {name: value}
        keys.check_limits(replace(KeyLimits(), **alone))
        return value

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


# -- drafts: a form kept through a log-in -------------------------------------------------------------
#
# A draft is the typed fields of a key form in the address the log-in page sends the person back to
# (``/keys?draft=1&name=...&at=<unix time>&sig=...``). Its page fills the form in, so a draft must come from
# this person's own form: ``auth.return_target`` makes one only for a POST the browser says came from this
# site, and signs it with an HMAC keyed with the browser's pre-log-in CSRF secret (the double-submit cookie,
# random, HttpOnly, never in a URL). The page shows a draft only when this browser's cookie checks the
# signature and the draft is recent: a link crafted by somebody else, or minted with their own cookie and
# sent to the victim, shows the plain page. A server-wide key would not do: anybody can POST a form with a
# forged Origin from outside a browser and be handed a draft signed for everybody.

DRAFT_FIELDS = ("name", "daily_cap", "monthly_cap", "rpm", "tpm", "expires_in", "expires_at", "ips")
MAX_DRAFT_VALUE = 500  # a key name is at most 100 characters; a few IP ranges fit
MAX_DRAFT_MODELS = 20
MAX_DRAFT_QUERY = 1500  # it travels in the log-in page's URL and back: kept well under any URL limit
DRAFT_LIFETIME = dt.timedelta(minutes=30)  # long enough to find a password, too short for a link to linger
DRAFT_SKEW = dt.timedelta(minutes=1)  # another replica's clock may be a little ahead of the one that signed
MIN_DRAFT_KEY = 32  # the pre-log-in CSRF token is 43 characters; "" (no visitor yet) must sign nothing
_DRAFT_PATHS = (
    (re.compile(r"/keys"), True),  # generate: the form comes back filled in
    (re.compile(r"/keys/(\d{1,10})/(?:limits|rename)"), True),  # a key's forms: its page, filled in
    (re.compile(r"/keys/(\d{1,10})/(?:revoke|regenerate)"), False),  # asked again on the key's page
)
_DRAFT_PAGE = re.compile(r"/keys(?:/\d{1,10})?")


def draft_query(form: Fields) -> str:
    """The typed fields of a key form as a query string starting with ``draft=1`` (unsigned: see
    :func:`draft_target`): never the CSRF token or a confirmation, only :data:`DRAFT_FIELDS` and the models.
    "" when nothing was typed, or when it is more than a form of this site holds (then nothing is kept rather
    than a part of it)."""
    pairs = [(name, value) for name in DRAFT_FIELDS if isinstance(value := form.get(name), str) and value.strip()]
    chosen = [m for m in form.getlist("models") if isinstance(m, str) and m]
    pairs += [("models", m) for m in chosen]
    if not pairs or len(chosen) > MAX_DRAFT_MODELS or any(len(value) > MAX_DRAFT_VALUE for _, value in pairs):
        return ""
    query = urlencode([("draft", "1"), *pairs])
    return query if len(query) <= MAX_DRAFT_QUERY else ""


def _unix(moment: dt.datetime) -> int:
    return calendar.timegm(moment.utctimetuple())  # the app's clock is naive UTC


def _draft_mac(key: str, page: str, pairs: Iterable[tuple[str, str]]) -> str:
    # Over the page and every parameter but the signature, sorted: nothing can be added, dropped or moved to
    # another key's page, and the order a browser or proxy keeps them in does not matter.
    message = "\0".join(("aimichat-key-draft", page, urlencode(sorted(pairs))))
    digest = hmac.new(key.encode(), message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign_draft(page: str, query: str, key: str, now: dt.datetime) -> str:
    """``query`` (a :func:`draft_query`) for ``page``, stamped with ``now`` and signed with ``key`` (the
    browser's pre-log-in CSRF secret): ``...&at=<unix time>&sig=<HMAC-SHA256>``."""
    signed = [*parse_qsl(query, keep_blank_values=True), ("at", str(_unix(now)))]
    return urlencode([*signed, ("sig", _draft_mac(key, page, signed))])


def draft_target(path: str, form: Fields, *, key: str | None, now: dt.datetime) -> str:
    """Where a key form POSTed to ``path`` continues after a log-in: the page the form was on, filled in with
    what was typed (``draft_query``, signed with ``key``: :func:`sign_draft`); the page alone without a key
    (a POST not known to come from this site); "" for any other path. Built from the path's own parts, so it
    is always a local address of the key pages, whatever was posted."""
    for pattern, keeps_fields in _DRAFT_PATHS:
        match = pattern.fullmatch(path)
        if match:
            page = f"/keys/{int(match.group(1))}" if match.groups() else "/keys"
            if not keeps_fields or key is None or len(key) < MIN_DRAFT_KEY:
                return page
            query = draft_query(form)
            return f"{page}?{sign_draft(page, query, key, now)}" if query else page
    return ""


def genuine_draft(page: str, query: Iterable[tuple[str, str]], key: str | None, now: dt.datetime) -> Fields | None:
    """The fields of the draft in ``query`` (a page's parameters) when ``key``, this browser's pre-log-in CSRF
    secret, checks its signature for ``page`` and it was signed at most :data:`DRAFT_LIFETIME` ago; else None
    (no draft, a link crafted or signed in another browser, an edited one, an old one)."""
    pairs = list(query)
    sigs = [value for name, value in pairs if name == "sig"]
    signed = [(name, value) for name, value in pairs if name != "sig"]
    if not key or len(key) < MIN_DRAFT_KEY or len(sigs) != 1 or ("draft", "1") not in signed:
        return None
    if not hmac.compare_digest(sigs[0].encode(), _draft_mac(key, page, signed).encode()):
        return None
    stamps = [value for name, value in signed if name == "at"]
    if len(stamps) != 1 or not (stamps[0].isascii() and stamps[0].isdigit()):
        return None
    age = _unix(now) - int(stamps[0])
    if not -DRAFT_SKEW.total_seconds() <= age <= DRAFT_LIFETIME.total_seconds():
        return None
    return ImmutableMultiDict(signed)


def is_draft(target: str) -> bool:
    """Does a log-in's ``next`` bring a key form back filled in (the log-in page then says so)? Only signed
    drafts do; the signature itself is checked by the page they lead to (:func:`genuine_draft`)."""
    path, _, query = target.partition("?")
    names = dict(parse_qsl(query, keep_blank_values=True))
    return _DRAFT_PAGE.fullmatch(path) is not None and names.get("draft") == "1" and bool(names.get("sig"))
