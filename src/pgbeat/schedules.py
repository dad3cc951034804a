"""Calendar maths the database leaves to Python: durations as users write them,
and cron slots (croniter, IANA time zones, DST-correct). The rules that use these
slots live in the database (sql/schema/30_scheduling.sql; Rule 7)."""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")


def parse_duration(value: str | int | float) -> float:
    """Seconds in '30s', '2m', '1h30m45s', 'every 2 minutes', '1 hour 30 minutes' or a number.

    Raises ValueError with a message suitable for the user.
    """
    if isinstance(value, bool):
        raise ValueError("must be a number of seconds or a duration such as '30s' or '1h30m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        text = text.removeprefix("every ").strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if text[pos : match.start()].strip(" ,and") != "":
                    break
                unit = _UNITS.get(match.group(2))
                if unit is None:
                    raise ValueError(f"unknown unit {match.group(2)!r} in {value!r}")
                seconds += float(match.group(1)) * unit
                pos = match.end()
            if pos == 0 or text[pos:].strip() != "":
                raise ValueError(f"{value!r} is not a duration (use e.g. '30s', '2m', '1h30m')")
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


# Files of the zone database that are not zones a user means: the host's own zone,
# a placeholder, a rules template, and the duplicate trees.
NOT_ZONES = frozenset({"localtime", "Factory", "posixrules"})


@functools.cache
def time_zones() -> frozenset[str]:
    """The IANA zone names croniter may be given (zoneinfo's list, less NOT_ZONES)."""
    return frozenset(
        name
        for name in zoneinfo.available_timezones()
        if name not in NOT_ZONES and not name.startswith(("posix/", "right/"))
    )


def check_timezone(name: str) -> ZoneInfo:
    """The zone called name; ValueError for anything else (a folder of the zone
    database such as 'Europe', a file that is not a zone, a path)."""
    if not isinstance(name, str) or name not in time_zones():
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as 'Europe/Paris')")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def _iter(expr: str, tz: str, start: datetime) -> croniter:
    # An optional 6th field is seconds, written last (croniter's convention):
    # '*/5 * * * * 30' fires at second 30 of every fifth minute.
    local = start.astimezone(check_timezone(tz))
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"{expr!r} must have 5 fields (or 6 with seconds)")
    try:
        return croniter(expr, local)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{expr!r} is not a valid cron expression: {exc}") from exc


def _is_repeated_wall_time(slot: datetime, zone: ZoneInfo) -> bool:
    """True when slot is the second occurrence of its local wall time (the hour that
    repeats when the clocks go back)."""
    local = slot.astimezone(zone)
    return local.fold == 1 and local.replace(fold=0).astimezone(UTC) != slot


def _slots(expr: str, tz: str, after: datetime) -> Iterator[datetime]:
    """Cron slots strictly after `after`, in UTC, DST-correct (as Vixie cron does it):

    * spring forward: slots in the skipped hour run once, at the first instant after it;
    * fall back: a job with fixed hours (hour field not starting with '*') runs once in
      the repeated hour (its first occurrence); a job with a wildcard hour ('*', '*/2')
      keeps its real-time rhythm and runs in both occurrences.
    """
    zone = check_timezone(tz)
    it = _iter(expr, tz, after)
    fixed_hours = not expr.split()[1].startswith("*")
    while True:
        slot = it.get_next(datetime).astimezone(UTC)
        if slot <= after or (fixed_hours and _is_repeated_wall_time(slot, zone)):
            continue
        yield slot


def next_cron_slot(expr: str, tz: str, after: datetime) -> datetime:
    """The first slot strictly after `after`, as an aware UTC datetime."""
    return next(_slots(expr, tz, after))


def cron_slots(expr: str, tz: str, after: datetime, count: int) -> list[datetime]:
    return list(islice(_slots(expr, tz, after), count))


def cron_catch_up(
    expr: str, tz: str, slot: datetime, now: datetime, limit: int = 10_000
) -> tuple[datetime, datetime, int]:
    """For a due cron slot: (latest slot <= now, first slot > now, slots missed before latest).

    The count stops at `limit` so a long outage costs bounded work.
    """
    slots = _slots(expr, tz, slot)
    latest, missed = slot, 0
    while missed < limit:
        candidate = next(slots)
        if candidate > now:
            return latest, candidate, missed
        latest, missed = candidate, missed + 1
    just_after_now = now + timedelta(microseconds=1)  # get_prev is strict: latest may equal now
    latest = max(slot, _iter(expr, tz, just_after_now).get_prev(datetime).astimezone(UTC))
    return latest, next_cron_slot(expr, tz, now), missed
