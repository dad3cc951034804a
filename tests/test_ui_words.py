"""The dashboard's words for schedules, durations and errors (pgbeat.api.words)."""

from __future__ import annotations

import pytest

from pgbeat.api import words


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"every": "30s"}, "every 30 s"),
        ({"every": "1m30s"}, "every 1 min 30 s"),
        ({"every": "1d"}, "every 1 d"),
        ({"at": "2027-08-08T17:35:00Z"}, "once at 2027-08-08 17:35:00 UTC"),
        ({"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin"}, "at 09:00 on weekdays, Europe/Berlin"),
        ({"cron": "*/5 * * * *", "timezone": "UTC"}, "every 5 min"),
        ({"cron": "* * * * *", "timezone": "UTC"}, "every minute"),
        ({"cron": "* * * * * */2", "timezone": "UTC"}, "every 2 s"),
        ({"cron": "15 * * * *", "timezone": "UTC"}, "hourly at :15, UTC"),
        ({"cron": "0 */6 * * *", "timezone": "UTC"}, "every 6 h at :00, UTC"),
        ({"cron": "30 6 * * *", "timezone": "Asia/Tokyo"}, "at 06:30 daily, Asia/Tokyo"),
        ({"cron": "0 9,17 * * 0,6", "timezone": "UTC"}, "at 09:00 and 17:00 on weekends, UTC"),
        ({"cron": "0 8 * * 1", "timezone": "UTC"}, "at 08:00 on Mondays, UTC"),
        ({"cron": "0 0 1 * *", "timezone": "UTC"}, "at 00:00 on day 1 of the month, UTC"),
        # Shapes without a sentence fall back to the expression.
        ({"cron": "0 9 * 1 *", "timezone": "UTC"}, "cron 0 9 * 1 * (UTC)"),
        ({"cron": "5-10 9 * * *", "timezone": "UTC"}, "cron 5-10 9 * * * (UTC)"),
        ({"cron": "0 9 * * 1-5 30", "timezone": "UTC"}, "cron 0 9 * * 1-5 30 (UTC)"),
    ],
)
def test_schedules_in_words(doc, expected):
    assert words.schedule(doc) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, "—"),
        (0.0004, "0.4 ms"),
        (0.012, "12 ms"),
        (1.5, "1.5 s"),
        (90, "1 min 30 s"),
        (7260, "2 h 1 min"),
    ],
)
def test_durations(seconds, expected):
    assert words.duration(seconds) == expected


@pytest.mark.parametrize(
    ("state", "error", "expected"),
    [
        ("timed_out", "exceeded the task's timeout of 10s", "timeout"),
        ("abandoned", "worker lost its database session", "worker lost"),
        ("failed", "HTTP 503 (wanted 2xx)", "http_5xx"),
        ("failed", "ClientConnectorError: Cannot connect to host", "ClientConnectorError"),
        ("failed", "something odd", "error"),
        ("succeeded", None, None),
    ],
)
def test_error_classes(state, error, expected):
    assert words.error_class(state, error) == expected


def test_the_class_a_kind_recorded_comes_first():
    error = "connect: ClientConnectorError: Cannot connect to host 127.0.0.1:9"
    assert words.error_class("failed", error, {"error_class": "connect", "retry": True}) == "connect"
    assert words.error_message(error, "connect") == "ClientConnectorError: Cannot connect to host 127.0.0.1:9"
    assert words.error_class("succeeded", None, {"error_class": "x"}) is None
