"""Unit tests of the scheduler's own arithmetic: notification payloads, the mapping
of database timestamps onto the monotonic clock, and the daemons' precise sleep."""

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from pgbeat import daemon
from pgbeat.scheduler import DatabaseClock, earliest_in, log_outcomes


def test_earliest_in_takes_the_earliest_announced_slot() -> None:
    payloads = [
        '{"next_run_at": "2026-11-23T10:00:05.5+00:00"}',
        '{"next_run_at": null}',
        '{"next_run_at": "2026-11-23T11:00:01+01:00"}',  # 10:00:01 UTC: the earliest
    ]
    assert earliest_in(payloads) == (datetime(2026, 11, 23, 10, 0, 1, tzinfo=UTC), True)


def test_earliest_in_without_a_slot() -> None:
    assert earliest_in([]) == (None, True)
    assert earliest_in(['{"next_run_at": null}']) == (None, True)


def test_earliest_in_flags_payloads_it_cannot_read() -> None:
    assert earliest_in(["", '{"other": 1}'])[1] is False
    assert earliest_in(['{"next_run_at": "yesterday"}'])[1] is False


def test_database_clock_maps_database_time_onto_the_monotonic_clock() -> None:
    db_now = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
    clock = DatabaseClock(db_now, sent_at=100.0, received_at=100.002)  # read mid-round-trip
    assert clock.monotonic_at(db_now + timedelta(seconds=1.5)) == pytest.approx(101.501)
    assert clock.monotonic_at(db_now - timedelta(seconds=1)) == pytest.approx(99.001)


def test_log_outcomes_one_event_each_even_without_a_slot(caplog) -> None:
    fired_at = datetime(2026, 11, 23, 10, 0, 0, 2500, tzinfo=UTC)
    rows = [
        {
            "task_id": 1,
            "run_id": 7,
            "scheduled_for": datetime(2026, 11, 23, 10, tzinfo=UTC),
            "outcome": "queued",
            "missed": 0,
            "fired_at": fired_at,
        },
        {
            "task_id": 2,
            "run_id": None,
            "scheduled_for": None,
            "outcome": "expired",
            "missed": 0,
            "fired_at": fired_at,
        },
    ]
    with caplog.at_level("INFO", logger="pgbeat.scheduler"):
        log_outcomes(rows)  # type: ignore[arg-type]
    events = [r for r in caplog.records if getattr(r, "event", None) == "slot_fired"]
    assert [(e.task_id, e.outcome, e.lateness_ms) for e in events] == [
        (1, "queued", 2.5),
        (2, "expired", None),
    ]
    assert events[0].slot == "2026-11-23T10:00:00+00:00"


async def test_a_precise_sleep_never_ends_before_its_deadline() -> None:
    stop, event = asyncio.Event(), asyncio.Event()
    for seconds in (0.0005, 0.0015, 0.004, 0.03):  # inside and beyond the thread's share
        deadline = time.monotonic() + seconds
        await daemon.sleep_until_precisely(deadline, stop, event)
        assert time.monotonic() >= deadline


async def test_a_precise_sleep_ends_early_on_an_event_or_stop() -> None:
    stop, event = asyncio.Event(), asyncio.Event()
    for which in (event, stop):
        stop.clear()
        event.clear()
        asyncio.get_running_loop().call_later(0.01, which.set)
        started = time.monotonic()
        await daemon.sleep_until_precisely(started + 30, stop, event)
        assert which.is_set() and time.monotonic() - started < 5
