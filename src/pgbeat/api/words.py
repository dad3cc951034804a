"""Schedules, durations and errors in words, for the dashboard: "every 30 s", "at 09:00
on weekdays, Europe/Berlin". Common cron shapes get a sentence; anything else is shown
as its expression."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pgbeat import schedules

_DAYS = ["Sundays", "Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays", "Sundays"]
_NUMBER = re.compile(r"\d+")
_STEP = re.compile(r"\*/(\d+)")


def duration(seconds: float | None) -> str:
    """A short duration: 0.4 ms, 12 ms, 1.5 s, 2 min, 1 h 30 min, 2 d."""
    if seconds is None:
        return "—"
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"
    if seconds < 60:
        return f"{seconds:.3g} s"
    parts = []
    rest = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size} {unit}")
            rest %= size
    return " ".join(parts[:2])


def milliseconds(ms: float | None) -> str:
    return "—" if ms is None else duration(ms / 1000)


def every(seconds: float) -> str:
    return "every " + duration(seconds)


def _clock(minute: str, hour: str) -> str:
    return f"{int(hour):02d}:{int(minute):02d}"


def _days_of_week(field: str) -> str | None:
    if field == "*":
        return ""
    if field in ("1-5", "MON-FRI", "mon-fri"):
        return " on weekdays"
    if field in ("0,6", "6,0", "6-7", "SAT,SUN", "sat,sun"):
        return " on weekends"
    if field.isdigit() and int(field) <= 7:
        return " on " + _DAYS[int(field)]
    return None


def cron(expr: str, timezone: str = "UTC") -> str:
    """A common cron shape in words, else the expression itself."""
    fields = expr.split()
    seconds = fields[5] if len(fields) == 6 else "0"
    if len(fields) not in (5, 6):
        return f"cron {expr}"
    minute, hour, dom, month, dow = fields[:5]
    zone = f", {timezone}"
    if (minute, hour, dom, month, dow) == ("*",) * 5:
        if seconds == "*":
            return "every second"
        step = _STEP.fullmatch(seconds)
        if step:
            return f"every {step.group(1)} s"
        if seconds == "0":
            return "every minute"
    if seconds != "0" or month != "*":
        return f"cron {expr} ({timezone})"
    step = _STEP.fullmatch(minute)
    if step and (hour, dom, dow) == ("*", "*", "*"):
        return f"every {step.group(1)} min"
    days = _days_of_week(dow)
    if days is None or (dom != "*" and dow != "*"):
        return f"cron {expr} ({timezone})"
    if minute.isdigit() and hour == "*" and dom == "*":
        return f"hourly at :{int(minute):02d}{days}{zone}"
    step = _STEP.fullmatch(hour)
    if minute.isdigit() and step and dom == "*":
        return f"every {step.group(1)} h at :{int(minute):02d}{days}{zone}"
    if minute.isdigit() and hour and all(part.isdigit() for part in hour.split(",")):
        times = " and ".join(_clock(minute, h) for h in hour.split(","))
        if dom == "*":
            return f"at {times}{days or ' daily'}{zone}"
        if dom.isdigit():
            return f"at {times} on day {int(dom)} of the month{zone}"
    return f"cron {expr} ({timezone})"


def schedule(doc: dict[str, Any] | Any) -> str:
    """A task's schedule (as the API returns it) in words."""
    doc = doc if isinstance(doc, dict) else {k: getattr(doc, k) for k in ("every", "at", "cron", "timezone")}
    if doc.get("every"):
        return every(schedules.parse_duration(doc["every"]))
    if doc.get("at"):
        at = doc["at"]
        at = datetime.fromisoformat(at) if isinstance(at, str) else at
        return "once at " + at.strftime("%Y-%m-%d %H:%M:%S UTC")
    if doc.get("cron"):
        return cron(doc["cron"], doc.get("timezone") or "UTC")
    return "—"


def error_class(state: str, error: str | None, result: dict[str, Any] | None = None) -> str | None:
    """What kind of failure a run's error is: the class its kind recorded in the result
    (an http run's timeout, dns, connect, tls, http_5xx...), else one read from the
    state and the error (a timeout, a lost worker, an HTTP status, an exception name)."""
    recorded = (result or {}).get("error_class")
    if isinstance(recorded, str) and recorded and state != "succeeded":
        return recorded
    if state == "timed_out":
        return "timeout"
    if state == "abandoned":
        return "worker lost"
    if state == "cancelled":
        return "cancelled"
    if not error:
        return None
    http = re.match(r"HTTP (\d)\d\d\b", error)
    if http:
        return f"http_{http.group(1)}xx"
    name = re.match(r"([A-Za-z_][\w.]*(?:Error|Exception|Timeout|Refused|Reset))\b", error)
    if name:
        return name.group(1)
    return "error"


def error_message(error: str | None, cls: str | None) -> str:
    """The error without the class name it starts with (shown beside it already)."""
    if error and cls and error.startswith(cls + ": "):
        return error[len(cls) + 2 :]
    return error or ""
