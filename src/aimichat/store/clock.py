"""The one clock and the one timestamp format of the service.

Times are naive UTC datetimes throughout (SQLite has no time zones). Code that needs "now" takes a
:data:`Clock` (``create_app`` injects one, tests move it by hand); :func:`utcnow` is the real one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

Clock = Callable[[], dt.datetime]  # returns naive UTC


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def iso_utc(moment: dt.datetime) -> str:
    """``2024-01-19T00:00:00Z``: the API document's format, used for every timestamp we show."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
