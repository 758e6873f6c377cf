"""Credit periods: UTC calendar days and calendar months."""

from __future__ import annotations

import datetime as dt


def day_start(now: dt.datetime) -> dt.date:
    return now.date()


def month_start(now: dt.datetime) -> dt.date:
    return now.date().replace(day=1)


def next_day_reset(now: dt.datetime) -> dt.datetime:
    return dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time())


def next_month_reset(now: dt.datetime) -> dt.datetime:
    first = now.date().replace(day=1)
    if first.month == 12:
        return dt.datetime(first.year + 1, 1, 1)
    return dt.datetime(first.year, first.month + 1, 1)


def seconds_until(moment: dt.datetime, now: dt.datetime) -> int:
    return max(1, int((moment - now).total_seconds() + 0.999))


def minute_start(now: dt.datetime) -> dt.datetime:
    """The fixed one-minute window of the rate limits."""
    return now.replace(second=0, microsecond=0)


def next_minute(now: dt.datetime) -> dt.datetime:
    return minute_start(now) + dt.timedelta(minutes=1)


def as_datetime(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time())
