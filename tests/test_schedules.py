"""Calendar maths of pgbeat.schedules: durations, cron slots with a seconds field,
time zones across DST changes, and catching up after downtime."""

from datetime import UTC, datetime, timedelta

import pytest

from pgbeat import schedules


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("2m", 120),
        ("1h30m", 5400),
        ("1h30m45s", 5445),
        ("every 2 minutes", 120),
        ("1 hour 30 minutes", 5400),
        ("90", 90),
        (1.5, 1.5),
        (10, 10),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert schedules.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "5 fortnights", "-3s", 0, -1, True, "1h garbage"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        schedules.parse_duration(bad)  # type: ignore[arg-type]


def test_cron_seconds_field_is_the_sixth() -> None:
    slots = schedules.cron_slots("* * * * * */2", "UTC", utc(2026, 1, 1, 12, 0, 0), 4)
    assert slots == [utc(2026, 1, 1, 12, 0, s) for s in (2, 4, 6, 8)]
    slots = schedules.cron_slots("*/5 * * * * 30", "UTC", utc(2026, 1, 1, 12, 0, 0), 2)
    assert slots == [utc(2026, 1, 1, 12, 0, 30), utc(2026, 1, 1, 12, 5, 30)]


def test_next_cron_slot_is_strictly_after() -> None:
    assert schedules.next_cron_slot("0 * * * *", "UTC", utc(2026, 1, 1, 12)) == utc(2026, 1, 1, 13)
    assert schedules.next_cron_slot("0 * * * *", "UTC", utc(2026, 1, 1, 12, 0, 1)) == utc(2026, 1, 1, 13)


def test_cron_in_a_time_zone() -> None:
    # 09:00 in New York is 14:00 UTC in winter (EST) and 13:00 UTC in summer (EDT).
    assert schedules.next_cron_slot("0 9 * * *", "America/New_York", utc(2026, 1, 10)) == utc(2026, 1, 10, 14)
    assert schedules.next_cron_slot("0 9 * * *", "America/New_York", utc(2026, 7, 10)) == utc(2026, 7, 10, 13)


# Europe/Berlin: spring forward on 2026-03-29 at 02:00 CET (01:00 UTC) to 03:00 CEST;
# fall back on 2026-10-25 at 03:00 CEST (01:00 UTC) to 02:00 CET.


def test_dst_spring_forward_daily_job_in_the_skipped_hour_runs_once_after_it() -> None:
    slots = schedules.cron_slots("30 2 * * *", "Europe/Berlin", utc(2026, 3, 27, 12), 3)
    assert slots == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 02:30 does not exist: 03:00 CEST, right after the jump
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]


def test_dst_spring_forward_hourly_job_skips_the_missing_hour() -> None:
    slots = schedules.cron_slots("0 * * * *", "Europe/Berlin", utc(2026, 3, 28, 23, 30), 4)
    # 01:00 CET, 03:00 CEST, 04:00 CEST, 05:00 CEST: one slot per real hour.
    assert slots == [utc(2026, 3, 29, 0), utc(2026, 3, 29, 1), utc(2026, 3, 29, 2), utc(2026, 3, 29, 3)]


def test_dst_fall_back_daily_job_runs_once_in_the_repeated_hour() -> None:
    slots = schedules.cron_slots("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), 3)
    assert slots == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first 02:30; not again at 02:30 CET
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
        utc(2026, 10, 27, 1, 30),
    ]


def test_dst_fall_back_hourly_job_keeps_its_real_time_rhythm() -> None:
    slots = schedules.cron_slots("0 * * * *", "Europe/Berlin", utc(2026, 10, 24, 23, 30), 4)
    # 02:00 CEST, 02:00 CET, 03:00 CET, 04:00 CET: every real hour, the repeated one too.
    assert slots == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 2), utc(2026, 10, 25, 3)]
    every_20 = schedules.cron_slots("*/20 * * * *", "Europe/Berlin", utc(2026, 10, 25, 0, 50), 4)
    assert every_20 == [
        utc(2026, 10, 25, 1),
        utc(2026, 10, 25, 1, 20),
        utc(2026, 10, 25, 1, 40),
        utc(2026, 10, 25, 2),
    ]


def test_dst_fall_back_fixed_hours_from_inside_the_repeated_hour() -> None:
    # Starting inside the second 02:xx (CET), a fixed-hour job waits for its next real slot.
    assert schedules.next_cron_slot("*/30 2-4 * * *", "Europe/Berlin", utc(2026, 10, 25, 1, 10)) == utc(
        2026, 10, 25, 2
    )


def test_dst_half_hour_shift_in_lord_howe() -> None:
    # Australia/Lord_Howe falls back 30 minutes on 2026-04-05 at 02:00 (+11:00, 15:00 UTC)
    # to 01:30 (+10:30), and springs forward on 2026-10-04 at 02:00 (+10:30) to 02:30 (+11:00).
    every_20 = schedules.cron_slots("*/20 * * * *", "Australia/Lord_Howe", utc(2026, 4, 4, 14), 4)
    # 01:20, 01:40 (+11), then 01:40 again (+10:30): a wildcard hour runs in both, then 02:00.
    assert every_20 == [
        utc(2026, 4, 4, 14, 20),
        utc(2026, 4, 4, 14, 40),
        utc(2026, 4, 4, 15, 10),
        utc(2026, 4, 4, 15, 30),
    ]
    fixed = schedules.cron_slots("40 1 * * *", "Australia/Lord_Howe", utc(2026, 4, 4, 12), 2)
    assert fixed == [utc(2026, 4, 4, 14, 40), utc(2026, 4, 5, 15, 10)]  # once on the day it repeats
    spring = schedules.cron_slots("15 2 * * *", "Australia/Lord_Howe", utc(2026, 10, 2), 3)
    # 02:15 does not exist on the 4th: it runs at 02:30 (+11:00), right after the jump.
    assert spring == [utc(2026, 10, 2, 15, 45), utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15, 15)]


def test_cron_catch_up_counts_missed_slots() -> None:
    # Every minute, due at 12:00, the scheduler comes back at 12:07:30: 12:07 is the
    # latest slot, the 7 before it (12:00 to 12:06) were missed, 12:08 is next.
    latest, following, missed = schedules.cron_catch_up(
        "* * * * *", "UTC", utc(2026, 1, 1, 12), utc(2026, 1, 1, 12, 7, 30)
    )
    assert (latest, following, missed) == (utc(2026, 1, 1, 12, 7), utc(2026, 1, 1, 12, 8), 7)


def test_cron_catch_up_on_time() -> None:
    slot = utc(2026, 1, 1, 12, 0, 4)
    latest, following, missed = schedules.cron_catch_up(
        "* * * * * */2", "UTC", slot, slot + timedelta(milliseconds=1)
    )
    assert (latest, following, missed) == (slot, utc(2026, 1, 1, 12, 0, 6), 0)


def test_cron_catch_up_after_a_long_outage_is_bounded() -> None:
    slot = utc(2026, 1, 1)
    latest, following, missed = schedules.cron_catch_up(
        "* * * * * *", "UTC", slot, utc(2026, 1, 2), limit=100
    )
    assert missed == 100
    assert latest == utc(2026, 1, 2) and following == utc(2026, 1, 2, 0, 0, 1)


def test_cron_catch_up_across_fall_back_counts_the_repeated_hour_once() -> None:
    latest, following, missed = schedules.cron_catch_up(
        "0 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 0), utc(2026, 10, 26, 12)
    )
    assert latest == utc(2026, 10, 26, 1)  # 02:00 CET on the 26th
    assert following == utc(2026, 10, 27, 1)
    assert missed == 2  # the 24th, and 02:00 CEST on the 25th (not 02:00 CET as well)


@pytest.mark.parametrize(
    ("expr", "tz"),
    [("* * * *", "UTC"), ("61 * * * *", "UTC"), ("* * * * *", "Mars/Olympus"), ("a b c d e", "UTC")],
)
def test_a_bad_cron_expression_or_zone_is_a_value_error(expr: str, tz: str) -> None:
    with pytest.raises(ValueError):
        schedules.next_cron_slot(expr, tz, utc(2026, 1, 1))


# ---------------------------------------------------------------- standard cron (issue 17)


def local_days(expr: str, tz: str, after: datetime, count: int) -> list[str]:
    from zoneinfo import ZoneInfo

    return [
        s.astimezone(ZoneInfo(tz)).strftime("%a %d %b") for s in schedules.cron_slots(expr, tz, after, count)
    ]


def test_both_day_fields_restricted_a_day_matches_if_either_does() -> None:
    # The 1st and 15th of each month, and every Monday.
    days = local_days("0 12 1,15 * MON", "UTC", utc(2026, 1, 1), 6)
    assert days == ["Thu 01 Jan", "Mon 05 Jan", "Mon 12 Jan", "Thu 15 Jan", "Mon 19 Jan", "Mon 26 Jan"]
    # A day-of-week list covering every day (not written as '*') makes every day match.
    assert local_days("0 0 1,15 * 0-7", "UTC", utc(2026, 1, 1), 3) == [
        "Fri 02 Jan",
        "Sat 03 Jan",
        "Sun 04 Jan",
    ]


def test_a_day_field_starting_with_a_star_means_both_must_match() -> None:
    # '*/10' is the 1st, 11th, 21st and 31st: only the Saturdays among them.
    days = local_days("0 12 */10 * 6", "UTC", utc(2026, 1, 1), 4)
    assert days == ["Sat 31 Jan", "Sat 21 Feb", "Sat 21 Mar", "Sat 11 Apr"]
    assert local_days("0 9 */2 * MON-FRI", "UTC", utc(2026, 1, 1), 3) == [
        "Thu 01 Jan",
        "Mon 05 Jan",
        "Wed 07 Jan",
    ]
    assert local_days("0 9 13 * */7", "UTC", utc(2026, 1, 1), 2) == ["Sun 13 Sep", "Sun 13 Dec"]
    assert local_days("0 0 * * SUN", "UTC", utc(2026, 1, 1), 2) == ["Sun 04 Jan", "Sun 11 Jan"]


@pytest.mark.parametrize(
    ("alias", "same_as"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@Daily", "0 0 * * *"),
    ],
)
def test_aliases(alias: str, same_as: str) -> None:
    after = utc(2026, 3, 1, 5, 30)
    assert schedules.cron_slots(alias, "Europe/Berlin", after, 5) == schedules.cron_slots(
        same_as, "Europe/Berlin", after, 5
    )


def test_names_lists_ranges_and_steps() -> None:
    assert schedules.cron_slots("0 17-17/4 * * *", "UTC", utc(2026, 1, 1), 2) == [
        utc(2026, 1, 1, 17),  # a one-value range is that value, not the whole cycle
        utc(2026, 1, 2, 17),
    ]
    assert local_days("0 0 * FEB,mar SAT", "UTC", utc(2026, 1, 1), 5)[3:] == ["Sat 28 Feb", "Sat 07 Mar"]
    assert local_days("0 0 1 jan-dec/6 *", "UTC", utc(2026, 1, 2), 2) == ["Wed 01 Jul", "Fri 01 Jan"]
    assert local_days("0 0 * * 5-7", "UTC", utc(2026, 1, 1), 3) == ["Fri 02 Jan", "Sat 03 Jan", "Sun 04 Jan"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("0 0 L * *", ["'L' (last day)", "day-of-month"]),
        ("0 0 15W * *", ["'W' (nearest weekday)", "'15W'"]),
        ("0 0 * * 5#2", ["'#' (nth weekday", "day-of-week"]),
        ("0 0 ? * *", ["'?'", "day-of-month"]),
        ("@reboot", ["@reboot is not supported"]),
        ("@fortnightly", ["unknown alias '@fortnightly'"]),
        ("H * * * *", ["'H' (hashed values)", "minute"]),
        ("61 * * * *", ["61 is out of range in the minute field (0-59)"]),
        ("0 24 * * *", ["24 is out of range in the hour field"]),
        ("0 0 * 13 *", ["13 is out of range in the month field"]),
        ("5/10 * * * *", ["'5/10'", "a step needs '*' or a range", "5-59/10"]),
        ("0 0 * * fri-sun", ["'fri-sun'", "goes backwards"]),
        ("0 0 * * jul", ["cannot read 'jul' in the day-of-week field"]),
        ("*/0 * * * *", ["step", "out of range"]),
        ("0 0 30 2 *", ["never fires"]),
        ("* * * *", ["4 fields", "6th field is seconds, written last"]),
        ("* * * * * * *", ["7 fields"]),
        ("*/15 * * * * 61", ["61 is out of range in the second field", "6th field is seconds, written last"]),
        ("0 0 1-2-3 * *", ["cannot read '1-2-3'"]),
    ],
)
def test_what_pgbeat_refuses_is_named(expr: str, names: list[str]) -> None:
    with pytest.raises(ValueError) as refused:
        schedules.parse_cron(expr)
    for name in names:
        assert name in str(refused.value)
