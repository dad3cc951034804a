"""Calendar maths the database leaves to Python: durations as users write them,
and cron slots (croniter, IANA time zones, DST-correct). The rules that use these
slots live in the database (sql/schema/30_scheduling.sql; Rule 7)."""

from __future__ import annotations

import functools
import heapq
import math
import re
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
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

    Raises ValueError with a message suitable for the user. This only reads the
    text the API and the CLI accept; which durations are valid (positive, at most 10
    years) is the database's rule, parse_duration in sql/schema/10_input.sql, which
    every entrance goes through (psql users write numbers or interval text).
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
    if not math.isfinite(seconds):
        raise ValueError("is not a finite number of seconds")
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


CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
SECONDS_FIELD_NOTE = (
    "a 6th field is seconds, written last: '0 9 * * 1-5 30' fires at 09:00:30 on weekdays, "
    "and '*/15 * * * * *' fires every second of minutes 0, 15, 30 and 45"
)
_LONGEST_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February 29 fires in leap years
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


# In cron's order; the optional seconds field comes last (croniter's convention).
_FIELDS = (
    _Field("minute", 0, 59, {}),
    _Field("hour", 0, 23, {}),
    _Field("day-of-month", 1, 31, {}),
    _Field("month", 1, 12, {name: i + 1 for i, name in enumerate(_MONTHS)}),
    _Field("day-of-week", 0, 7, {name: i for i, name in enumerate(_WEEKDAYS)}),
    _Field("second", 0, 59, {}),
)
# Extensions of other crons, refused by name rather than read differently.
_UNSUPPORTED = (
    (re.compile(r".*#.*"), "'#' (nth weekday of the month)"),
    (re.compile(r".*\?.*"), "'?' (Quartz's 'no value'; write *)"),
    (re.compile(r"\d*LW?|L-\d+", re.IGNORECASE), "'L' (last day)"),
    (re.compile(r"\d+W|W\d+", re.IGNORECASE), "'W' (nearest weekday)"),
    (re.compile(r"H(\(.*\))?(/\d+)?", re.IGNORECASE), "'H' (hashed values)"),
    (re.compile(r"R", re.IGNORECASE), "'R' (random values)"),
)
_ITEM = re.compile(r"(?:(\*)|(\w+)(?:-(\w+))?)(?:/(\d+))?")


@dataclass(frozen=True)
class CronSpec:
    """A cron expression as pgbeat reads it: the five standard fields (lists, ranges,
    steps, month and weekday names), an alias, or a 6th seconds field written last."""

    fields: tuple[str, ...]  # croniter's form: each field a sorted list of numbers, or '*'
    day_or: bool  # both day fields restricted: a day matches if either does
    wildcard_hour: bool  # the hour field starts with '*' (DST: keeps its real-time rhythm)


def _field_value(text: str, field: _Field, expr: str) -> int:
    value = int(text) if text.isdigit() else field.names.get(text.lower())
    if value is None:
        raise ValueError(f"{expr!r}: cannot read {text!r} in the {field.name} field")
    if not field.low <= value <= field.high:
        raise ValueError(
            f"{expr!r}: {text} is out of range in the {field.name} field ({field.low}-{field.high})"
        )
    return value


def _field_values(text: str, field: _Field, expr: str) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        for pattern, what in _UNSUPPORTED:
            if pattern.fullmatch(item):
                raise ValueError(
                    f"{expr!r}: {what} in the {field.name} field ({item!r}) is not supported;"
                    " pgbeat reads standard cron: numbers, names, *, lists, ranges a-b, steps */n and a-b/n"
                )
        match = _ITEM.fullmatch(item)
        if match is None:
            raise ValueError(
                f"{expr!r}: cannot read {item!r} in the {field.name} field"
                " (write *, a number or name, a-b, */n or a-b/n, or a list of them)"
            )
        star, first, last, step = match.groups()
        if star:
            low, high = field.low, field.high
        else:
            low = _field_value(first, field, expr)
            if last is None and step is not None:
                raise ValueError(
                    f"{expr!r}: {item!r} in the {field.name} field: a step needs '*' or a range"
                    f" (write {first}-{field.high}/{step})"
                )
            high = low if last is None else _field_value(last, field, expr)
            if high < low:
                raise ValueError(f"{expr!r}: the range {item!r} in the {field.name} field goes backwards")
        stride = int(step) if step else 1
        if not 1 <= stride <= field.high - field.low + 1:
            raise ValueError(f"{expr!r}: the step in {item!r} is out of range in the {field.name} field")
        values.update(range(low, high + 1, stride))
    if field.name == "day-of-week" and 7 in values:
        values = (values - {7}) | {0}  # 7 is Sunday too
    return values


def _croniter_field(values: set[int], field: _Field) -> str:
    everything = set(
        range(field.low, min(field.high, 6) + 1 if field.name == "day-of-week" else field.high + 1)
    )
    return "*" if values >= everything else ",".join(map(str, sorted(values)))


@functools.lru_cache(maxsize=4096)
def parse_cron(expr: str) -> CronSpec:
    """Read a cron expression as standard cron (Vixie cron, cronie, POSIX) does, or raise
    ValueError naming the part it cannot read.

    Day rule: when both day-of-month and day-of-week are restricted, a day matches if
    either matches; when either starts with '*' (a step such as '*/10' included), a
    day matches only if both match.
    """
    words = expr.split()
    if len(words) == 1 and words[0].startswith("@"):
        alias = words[0].lower()
        if alias not in CRON_ALIASES:
            raise ValueError(
                f"{expr!r}: unknown alias {words[0]!r} (pgbeat knows {', '.join(CRON_ALIASES)};"
                " @reboot is not supported: a task has no boot to run at)"
            )
        words = CRON_ALIASES[alias].split()
    if len(words) not in (5, 6):
        raise ValueError(
            f"{expr!r} has {len(words)} field{'s' if len(words) != 1 else ''}: cron needs 5"
            " (minute hour day-of-month month day-of-week) or an alias such as @daily; " + SECONDS_FIELD_NOTE
        )
    try:
        values = [_field_values(word, field, expr) for word, field in zip(words, _FIELDS, strict=False)]
    except ValueError as exc:
        if len(words) == 6:
            raise ValueError(f"{exc}; {SECONDS_FIELD_NOTE}") from None
        raise
    fields = [_croniter_field(v, f) for v, f in zip(values, _FIELDS, strict=False)]
    day_or = not words[2].startswith("*") and not words[4].startswith("*")
    if not (day_or and fields[4] != "*") and not any(
        day <= _LONGEST_MONTH[month] for month in values[3] for day in values[2]
    ):
        raise ValueError(f"{expr!r} never fires: no month it names has the days it names")
    if day_or and "*" in (fields[2], fields[4]):
        fields[2] = fields[4] = "*"  # either side matches every day
    return CronSpec(tuple(fields), day_or, words[1].startswith("*"))


def _iter(expr: str, tz: str, start: datetime) -> croniter:
    local = start.astimezone(check_timezone(tz))
    spec = parse_cron(expr)
    try:
        return croniter(" ".join(spec.fields), local, day_or=spec.day_or)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{expr!r} is not a valid cron expression: {exc}") from exc


def _occurrences(slot: datetime, zone: ZoneInfo) -> list[datetime]:
    """The instants of slot's local wall time: two when the clocks went back over it
    (the first, then the repeat), else slot itself (a wall time skipped when they went
    forward is croniter's instant right after the jump)."""
    wall = slot.astimezone(zone).replace(tzinfo=None)
    both = [wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1)]
    if both[0] != both[1] and all(t.astimezone(zone).replace(tzinfo=None) == wall for t in both):
        return both
    return [slot]


def _slots(expr: str, tz: str, after: datetime) -> Iterator[datetime]:
    """Cron slots strictly after `after`, in UTC, DST-correct (as Vixie cron does it):

    * spring forward: slots in the skipped time run once, at the first instant after it;
    * fall back: a job with fixed hours (hour field not starting with '*') runs once in
      the repeated time (its first occurrence); a job with a wildcard hour ('*', '*/2')
      keeps its real-time rhythm and runs in both occurrences.

    croniter walks the wall clock; each wall time it names is turned into its
    occurrences here, whatever the size of the zone's shift (Lord Howe's is 30 min).
    """
    zone = check_timezone(tz)
    it = _iter(expr, tz, after)
    fixed_hours = not parse_cron(expr).wildcard_hour
    ahead: list[datetime] = []  # occurrences not yet yielded, soonest first
    last = after
    while True:
        slot = it.get_next(datetime).astimezone(UTC)
        for moment in _occurrences(slot, zone)[: 1 if fixed_hours else 2]:
            heapq.heappush(ahead, moment)
        # Later wall times never give an instant before this slot: what is not later is final.
        while ahead and ahead[0] <= slot:
            moment = heapq.heappop(ahead)
            if moment > last:  # strictly increasing: a repeat croniter named too is dropped
                last = moment
                yield moment


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
