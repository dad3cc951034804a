"""Cron fire times equal standard cron's: a differential test of GET /tasks/{id}/upcoming
(the real API against a real database) against a reference written here from the
crontab(5) man page, not from croniter or pgbeat.schedules.

The man page's rules the reference follows:
* fields: minute 0-59, hour 0-23, day of month 1-31, month 1-12 (or jan-dec), day of
  week 0-7 (0 and 7 are Sunday, or sun-sat); each a list of items, an item `*`, a
  number or name, a range `a-b`, with an optional step `/n` after `*` or a range;
* a command runs when the minute, hour and month match and the day matches, where
  the day matches if either day field matches when both are restricted, and only if
  both match when either field starts with `*`.

The reference walks local wall-clock days in the task's time zone, tests each day with
that rule, and turns every (hour, minute) of a matching day into an instant. Days on
which the zone's offset changes are left out on both sides: pgbeat's rules for them
(README, "Cron across DST changes") are tested in test_schedules.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlsupport as sql
from litestar.testing import AsyncTestClient

from pgbeat.api.app import create_app
from pgbeat.config import Config

SEED = 20261203
EXPRESSIONS = 300
MAX_COUNT = 500  # the API's largest `count`: expressions are drawn to fire at most this often a year
ZONES = (
    "UTC",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Australia/Sydney",
)
YEAR = timedelta(days=366)

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


# ---------------------------------------------------------------- the reference


def reference_field(text: str, low: int, high: int, names: list[str], first_name: int) -> set[int]:
    def number(word: str) -> int:
        if word.isdigit():
            return int(word)
        return names.index(word.lower()) + first_name

    values: set[int] = set()
    for item in text.split(","):
        span, _, step = item.partition("/")
        if span == "*":
            start, end = low, high
        elif "-" in span:
            start, end = (number(w) for w in span.split("-"))
        else:
            start = end = number(span)
        values.update(range(start, end + 1, int(step) if step else 1))
    return values


class Reference:
    def __init__(self, expr: str) -> None:
        minute, hour, dom, month, dow = expr.split()
        self.minutes = sorted(reference_field(minute, 0, 59, [], 0))
        self.hours = sorted(reference_field(hour, 0, 23, [], 0))
        self.doms = reference_field(dom, 1, 31, [], 1)
        self.months = reference_field(month, 1, 12, MONTHS, 1)
        self.dows = {d % 7 for d in reference_field(dow, 0, 7, DAYS, 0)}
        self.both_must_match = dom.startswith("*") or dow.startswith("*")

    def day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom_ok = day.day in self.doms
        dow_ok = day.isoweekday() % 7 in self.dows
        return (dom_ok and dow_ok) if self.both_must_match else (dom_ok or dow_ok)

    def fires(self, zone: ZoneInfo, after: datetime, until: datetime, skip: set[date]) -> list[datetime]:
        out = []
        day = after.astimezone(zone).date() - timedelta(days=1)
        while day <= until.astimezone(zone).date():
            if day not in skip and self.day_matches(day):
                for h in self.hours:
                    for m in self.minutes:
                        moment = datetime.combine(day, time(h, m), zone).astimezone(UTC)
                        if after < moment <= until:
                            out.append(moment)
            day += timedelta(days=1)
        return out

    def per_day(self) -> int:
        return len(self.hours) * len(self.minutes)


def offset_change_days(zone: ZoneInfo, start: datetime, end: datetime) -> set[date]:
    """Local dates around each change of the zone's UTC offset (scanned every 15 minutes,
    finer than any zone's shift)."""
    days: set[date] = set()
    moment, offset = start, start.astimezone(zone).utcoffset()
    while moment < end:
        moment += timedelta(minutes=15)
        now_offset = moment.astimezone(zone).utcoffset()
        if now_offset != offset:
            for edge in (moment - timedelta(hours=3), moment + timedelta(hours=3)):
                days.add(edge.astimezone(zone).date())
            offset = now_offset
    return days


# ---------------------------------------------------------------- random expressions


def _item(rng: random.Random, low: int, high: int, names: list[str] | None, first_name: int) -> str:
    def word(value: int) -> str:
        if names and rng.random() < 0.5 and 0 <= value - first_name < len(names):
            return names[value - first_name].upper() if rng.random() < 0.3 else names[value - first_name]
        return str(value)

    a = rng.randint(low, high)
    form = rng.random()
    if form < 0.55:
        return word(a)
    b = min(high, a + rng.randint(1, 6))
    if form < 0.85:
        return f"{word(a)}-{word(b)}"
    return f"{word(a)}-{word(b)}/{rng.randint(1, 4)}"


def _field(
    rng: random.Random, low: int, high: int, weights: tuple[float, float, float], names=None, first=0
) -> str:
    """`*` / `*/n` / a list of items, with the given probabilities."""
    star, step, _ = weights
    roll = rng.random()
    if roll < star:
        return "*"
    if roll < star + step:
        return f"*/{rng.randint(2, max(2, (high - low) // 2))}"
    return ",".join(_item(rng, low, high, names, first) for _ in range(rng.choice((1, 1, 1, 2, 3))))


def random_expression(rng: random.Random) -> str:
    minute = _field(rng, 0, 59, (0.02, 0.05, 0.93))
    hour = _field(rng, 0, 23, (0.03, 0.07, 0.90))
    dom = _field(rng, 1, 31, (0.35, 0.3, 0.35))
    month = _field(rng, 1, 12, (0.5, 0.1, 0.4), MONTHS, 1)
    dow = _field(rng, 0, 7, (0.3, 0.1, 0.6), DAYS, 0)
    return f"{minute} {hour} {dom} {month} {dow}"


def day_case(expr: str) -> str:
    dom, dow = expr.split()[2], expr.split()[4]
    if dom == "*" or dow == "*":
        return "star"
    if dom.startswith("*") or dow.startswith("*"):
        return "step-and"  # `*/n` beside a restricted field: both must match
    return "either"


# ---------------------------------------------------------------- the test


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(db_url, Config()), timeout=120) as c:
        yield c


@pytest.mark.slow  # 300 expressions over a year in six zones
async def test_upcoming_fire_times_equal_standard_crons(client):
    rng = random.Random(SEED)
    start = datetime.now(UTC)
    end = start + YEAR
    zones = {name: ZoneInfo(name) for name in ZONES}
    skip = {name: offset_change_days(zone, start - timedelta(days=1), end) for name, zone in zones.items()}

    cases = []  # (expr, zone name, reference fires over the year, count to ask for)
    while len(cases) < EXPRESSIONS:
        expr = random_expression(rng)
        zone = ZONES[len(cases) % len(ZONES)]
        ref = Reference(expr)
        fires = ref.fires(zones[zone], start, end, skip[zone])
        extra = ref.per_day() * len(skip[zone])  # what pgbeat may fire on the left-out days
        if fires and len(fires) + extra + 1 <= MAX_COUNT:
            cases.append((expr, zone, fires, len(fires) + extra + 1))
    seen = {day_case(expr) for expr, *_ in cases}
    assert seen == {"star", "step-and", "either"}, seen

    async def create(expr: str, zone: str) -> dict:
        body = {"kind": "sleep", "name": expr, "schedule": {"cron": expr, "timezone": zone}}
        resp = await client.post("/tasks", json=body)
        assert resp.status_code == 201, (expr, zone, resp.text)
        return resp.json()

    async def upcoming(task: dict, count: int) -> list[datetime]:
        resp = await client.get(f"/tasks/{task['id']}/upcoming", params={"count": count})
        assert resp.status_code == 200, resp.text
        return [datetime.fromisoformat(u["scheduled_for"]) for u in resp.json()["items"]]

    tasks = []
    for i in range(0, len(cases), 50):  # concurrent creations share transactions
        tasks += await asyncio.gather(*(create(expr, zone) for expr, zone, *_ in cases[i : i + 50]))
    created = datetime.now(UTC)
    asks = [(task, count) for task, (*_, count) in zip(tasks, cases, strict=True)]
    answers = []
    for i in range(0, len(asks), 50):
        answers += await asyncio.gather(*(upcoming(task, count) for task, count in asks[i : i + 50]))

    mismatches = []
    for (expr, zone, fires, count), answer in zip(cases, answers, strict=True):
        assert len(answer) == count
        got = [t for t in answer if t <= end and t.astimezone(zones[zone]).date() not in skip[zone]]
        if fires[0] <= created and got[:1] != fires[:1]:
            fires = fires[1:]  # that slot passed while the task was being created
        if got != fires:
            extra = sorted(set(got) - set(fires))[:3]
            missing = sorted(set(fires) - set(got))[:3]
            mismatches.append(f"{expr!r} in {zone}: pgbeat also fires {extra}, misses {missing}")
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ:\n" + "\n".join(mismatches[:20])


# ---------------------------------------------------------------- what the API accepts


@pytest.mark.parametrize(
    ("cron", "part"),
    [
        ("0 0 L * *", "'L' (last day) in the day-of-month field"),
        ("0 0 15W * *", "'W' (nearest weekday) in the day-of-month field"),
        ("0 0 * * MON#2", "'#' (nth weekday of the month) in the day-of-week field"),
        ("0 0 ? * MON", "'?'"),
        ("@reboot", "@reboot is not supported"),
        ("*/15 * * * * 60", "6th field is seconds, written last"),
        ("0 0 * * * * 2027", "7 fields"),
    ],
)
async def test_what_is_refused_is_a_422_naming_the_part(shared_client, shared_db_url, cron, part):
    with sql.connect(shared_db_url) as conn:
        before = sql.row_counts(conn)
    resp = await shared_client.post("/tasks", json={"kind": "sleep", "schedule": {"cron": cron}})
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == "schedule.cron" and part in resp.json()["detail"]
    with sql.connect(shared_db_url) as conn:
        assert sql.row_counts(conn) == before


@pytest.mark.parametrize(
    "alias", ["@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"]
)
async def test_aliases_are_accepted_and_kept_as_written(shared_client, alias):
    resp = await shared_client.post(
        "/tasks", json={"kind": "sleep", "schedule": {"cron": alias, "timezone": "Asia/Kolkata"}}
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["schedule"] == {"cron": alias, "timezone": "Asia/Kolkata"}
    slots = (await shared_client.get(f"/tasks/{resp.json()['id']}/upcoming", params={"count": 3})).json()[
        "items"
    ]
    local = [datetime.fromisoformat(u["scheduled_for"]).astimezone(ZoneInfo("Asia/Kolkata")) for u in slots]
    assert all(t.minute == 0 and t.second == 0 for t in local)
    if alias != "@hourly":
        assert all(t.hour == 0 for t in local)


async def test_the_seconds_field_is_explained_in_the_openapi_schema(client):
    schema = (await client.get("/schema/openapi.json")).json()
    texts = [
        prop.get("description", "")
        for component in schema["components"]["schemas"].values()
        for name, prop in component.get("properties", {}).items()
        if name == "cron"
    ]
    assert any("6th field is seconds, written last" in t and "either" in t for t in texts), texts
