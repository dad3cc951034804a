"""The scheduler as real `pgbeat scheduler` processes (with real `pgbeat worker`s) against
a real PostgreSQL: the fixed grid and its lateness, one-shots, cron with seconds,
wake-up by notification, no polling when idle, several schedulers at once.

The tests wait on database state, never on the clock, and assert no speed: the
figures measured are printed (pytest -s) and written to the test's log directory;
the targets live in `pgbeat bench`.
"""

from __future__ import annotations

import itertools
import statistics
from datetime import UTC, datetime, timedelta

import pytest
from fleetsupport import (
    assert_every_slot_accounted_once,
    create_task,
    fired,
    live_daemons,
    logged_events,
    one_more_cycle,
    report,
    runs_of,
    start,
    succeeded_runs,
    task,
)
from sqlsupport import query, wait_for

from pgbeat import schedules
from pgbeat.scheduler import SAFETY_POLL

pytestmark = pytest.mark.slow  # real scheduler and worker processes

# --- helpers ---------------------------------------------------------------------------------


def scheduler_asleep(url: str) -> bool:
    """The scheduling session has ended a pass: it is idle after asking for its next wake-up."""
    return bool(
        query(
            url,
            """SELECT 1 FROM pg_stat_activity a JOIN pgbeat.live_daemons d ON d.backend_pid = a.pid
                WHERE d.role = 'scheduler' AND a.state = 'idle' AND a.query LIKE '%%next_due_at%%'""",
        )
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- tests ---------------------------------------------------------------------------------------


def test_every_second_task_runs_on_its_grid_with_small_lateness(db_url, fleet):
    (scheduler,) = start(fleet, "scheduler")
    start(fleet, "worker")
    t = create_task(db_url, {"kind": "counter", "schedule": {"every": "1s"}})
    wait_for("8 runs of the task", lambda: len(succeeded_runs(db_url, t["id"])) >= 8)
    assert scheduler.terminate() == 0

    # The scheduler decided every slot, each exactly on the grid: anchor + k s, no drift.
    anchor = t["anchor"]
    decided = [e for e in logged_events(scheduler, "slot_fired") if e["task_id"] == t["id"]]
    assert len(decided) >= 8, decided
    assert [e["slot"] for e in decided] == [
        (anchor + timedelta(seconds=k)).isoformat() for k in range(len(decided))
    ]
    assert all(e["missed"] == 0 for e in decided)
    # Each became a run (or, if the worker lagged a whole second, was folded into one).
    runs = runs_of(db_url, t["id"])
    assert {e["outcome"] for e in decided} <= {"queued", "coalesced"}
    assert [e["slot"] for e in decided if e["outcome"] == "queued"] == [
        r["scheduled_for"].isoformat() for r in runs
    ]
    assert_every_slot_accounted_once(db_url, t["id"])
    done = [r for r in runs if r["state"] == "succeeded"]
    assert len(done) >= len(runs) - 1  # the last may still be pending or running at the end
    run_lateness = [(r["started_at"] - r["scheduled_for"]).total_seconds() * 1000 for r in done]
    scheduler_lateness = [e["lateness_ms"] for e in decided]
    report(
        fleet,
        "every_1s_lateness_ms",
        scheduler_p50=round(statistics.median(scheduler_lateness), 3),
        scheduler_p99=round(percentile(scheduler_lateness, 99), 3),
        run_start_p50=round(statistics.median(run_lateness), 3),
        run_start_p99=round(percentile(run_lateness, 99), 3),
        runs=len(runs),
    )
    # Plain slots are decided up to 20 ms before they fall due (materialised ahead);
    # their runs never start early.
    assert all(lateness >= -20 for lateness in scheduler_lateness)
    assert any(lateness < 0 for lateness in scheduler_lateness)
    assert all(lateness >= 0 for lateness in run_lateness)


def test_one_shot_at_runs_exactly_once(db_url, fleet):
    start(fleet, "scheduler")
    start(fleet, "worker")
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    t = create_task(db_url, {"kind": "counter", "schedule": {"at": at.isoformat()}})
    wait_for("the one-shot run", lambda: succeeded_runs(db_url, t["id"]))
    one_more_cycle(db_url)
    runs = runs_of(db_url, t["id"])
    assert len(runs) == 1
    assert runs[0]["scheduled_for"] == at
    assert runs[0]["started_at"] >= at
    after = task(db_url, t["id"])
    assert after["next_run_at"] is None and after["fired"] == 1
    assert (
        query(db_url, "SELECT status FROM pgbeat.task_status WHERE id = %s", t["id"])[0]["status"]
        == "complete"
    )


def test_one_shot_in_runs_after_its_delay(db_url, fleet):
    start(fleet, "scheduler")
    start(fleet, "worker")
    t = create_task(db_url, {"kind": "counter", "schedule": {"in": "2s"}})
    assert t["run_at"] - t["created_at"] == timedelta(seconds=2)
    runs = wait_for("the run", lambda: succeeded_runs(db_url, t["id"]))
    one_more_cycle(db_url)
    assert len(runs_of(db_url, t["id"])) == 1
    assert runs[0]["scheduled_for"] == t["run_at"]
    assert task(db_url, t["id"])["next_run_at"] is None


def test_cron_with_a_seconds_field_fires_on_its_seconds(db_url, fleet):
    start(fleet, "scheduler")
    start(fleet, "worker")
    expr = "* * * * * */2"  # every even second (croniter's 6th field)
    first = schedules.next_cron_slot(expr, "UTC", datetime.now(UTC) + timedelta(seconds=1))
    t = create_task(db_url, {"kind": "counter", "schedule": {"cron": expr}}, first)
    wait_for("4 runs of the task", lambda: len(succeeded_runs(db_url, t["id"])) >= 4)
    # The task row first: every run before its next slot exists once it is read.
    next_slot = task(db_url, t["id"])["next_run_at"]
    runs = [r for r in runs_of(db_url, t["id"]) if r["scheduled_for"] < next_slot]
    assert len(runs) >= 4
    for run in runs:
        assert run["scheduled_for"].second % 2 == 0 and run["scheduled_for"].microsecond == 0
    slots = [r["scheduled_for"] for r in runs]
    assert slots[0] == first
    assert all(b - a == timedelta(seconds=2) for a, b in itertools.pairwise(slots))
    assert sum(1 + r["coalesced"] for r in runs) == len(runs)  # nothing missed
    assert next_slot == slots[-1] + timedelta(seconds=2)


def test_cron_until_and_max_runs_complete_the_task(db_url, fleet):
    start(fleet, "scheduler")
    first = schedules.next_cron_slot("* * * * * *", "UTC", datetime.now(UTC) + timedelta(seconds=1))
    capped = create_task(
        db_url, {"kind": "counter", "max_runs": 2, "schedule": {"cron": "* * * * * *"}}, first
    )
    until = datetime.now(UTC) + timedelta(seconds=2.5)
    bounded = create_task(
        db_url, {"kind": "counter", "until": until.isoformat(), "schedule": {"every": "1s"}}
    )
    wait_for(
        "both tasks to complete",
        lambda: not query(db_url, "SELECT 1 FROM pgbeat.tasks WHERE next_run_at IS NOT NULL"),
    )
    # No worker: the first run stays pending and the second slot is folded into it.
    assert sum(1 + r["coalesced"] for r in runs_of(db_url, capped["id"])) == 2
    bounded_runs = runs_of(db_url, bounded["id"])
    assert bounded_runs and all(r["scheduled_for"] <= until for r in bounded_runs)


def test_a_new_task_wakes_the_sleeping_scheduler(db_url, fleet):
    """The idle scheduler sleeps up to its 30 s safety poll; the notification of a new
    task due in 1 s must re-plan its wake-up."""
    (scheduler,) = start(fleet, "scheduler")
    far = create_task(db_url, {"kind": "counter", "schedule": {"in": "1h"}})
    wait_for("the scheduler to go to sleep", lambda: scheduler_asleep(db_url))
    soon = create_task(db_url, {"kind": "counter", "schedule": {"in": "1s"}})
    # Woken by the notification: well before the safety poll would have found it.
    run = wait_for("the run", lambda: runs_of(db_url, soon["id"]), timeout=SAFETY_POLL / 2)[0]
    report(
        fleet,
        "woken_slot_lateness_ms",
        ms=(run["created_at"] - run["scheduled_for"]) / timedelta(milliseconds=1),
    )
    assert not runs_of(db_url, far["id"])
    assert scheduler.alive()


def test_idle_scheduler_does_not_poll(db_url, fleet):
    """With nothing due, the scheduling session sends nothing (only the slow safety poll)
    while the reaper, on the side pool, runs pass after pass."""
    (scheduler,) = start(fleet, "scheduler")
    create_task(db_url, {"kind": "counter", "schedule": {"every": "1h"}})
    wait_for("the scheduler to go to sleep", lambda: scheduler_asleep(db_url))
    pid = live_daemons(db_url, "scheduler")[0]["backend_pid"]

    def last_query_start() -> datetime:
        return query(db_url, "SELECT query_start FROM pg_stat_activity WHERE pid = %s", pid)[0]["query_start"]

    before = last_query_start()
    reaper_passes: set[datetime] = set()

    def two_more_reaper_passes() -> bool:
        rows = query(
            db_url,
            "SELECT query_start FROM pg_stat_activity WHERE pid <> %s AND query LIKE '%%reap%%'"
            " AND query NOT LIKE '%%pg_stat_activity%%' AND query_start > %s",
            pid,
            before,
        )
        reaper_passes.update(r["query_start"] for r in rows)
        return len(reaper_passes) >= 2

    wait_for("two passes of the scheduler's reaper", two_more_reaper_passes)
    assert last_query_start() == before  # the scheduling session stayed silent
    assert scheduler.alive()


def test_pause_resume_and_update_are_seen_at_once(db_url, fleet):
    start(fleet, "scheduler")
    t = create_task(db_url, {"kind": "counter", "schedule": {"every": "1h"}})
    query(db_url, """SELECT pgbeat.update_task(%s, '{"schedule": {"every": "1s"}}')""", t["id"])
    wait_for("a run of the updated schedule", lambda: runs_of(db_url, t["id"]), timeout=5)
    control = create_task(db_url, {"kind": "counter", "schedule": {"every": "1s"}})
    query(db_url, "SELECT pgbeat.pause_task(%s)", t["id"])
    paused_count, paused_fired = len(runs_of(db_url, t["id"])), fired(db_url, t["id"])
    control_fired = fired(db_url, control["id"])
    wait_for("2 slots of a control task", lambda: fired(db_url, control["id"]) >= control_fired + 2)
    assert len(runs_of(db_url, t["id"])) == paused_count and fired(db_url, t["id"]) == paused_fired
    query(db_url, "SELECT pgbeat.resume_task(%s)", t["id"])
    wait_for("runs after resume", lambda: len(runs_of(db_url, t["id"])) > paused_count, timeout=5)


def test_several_schedulers_never_materialise_a_slot_twice(db_url, fleet):
    schedulers = start(fleet, "scheduler", 3)
    start(fleet, "worker", 1, "--concurrency", "16")
    expr = "* * * * * *"
    first = schedules.next_cron_slot(expr, "UTC", datetime.now(UTC) + timedelta(seconds=1))
    interval_ids = [
        create_task(db_url, {"kind": "counter", "schedule": {"every": every}})["id"]
        for every in ("1s", "1s", "0.5s", "0.5s", "0.3s", "2s")
    ]
    cron_id = create_task(db_url, {"kind": "counter", "schedule": {"cron": expr}}, first)["id"]
    wait_for("6 runs of the cron task", lambda: len(succeeded_runs(db_url, cron_id)) >= 6)
    wait_for("3 slots of each task", lambda: all(fired(db_url, t) >= 3 for t in interval_ids))
    for s in schedulers:
        assert s.terminate() == 0

    decisions = [e for s in schedulers for e in logged_events(s, "slot_fired")]
    assert {e["outcome"] for e in decisions} <= {"queued", "coalesced"}
    decided_slots = [(e["task_id"], e["slot"]) for e in decisions]
    assert len(decided_slots) == len(set(decided_slots)), "a slot was decided twice"
    assert sum(1 for s in schedulers if logged_events(s, "slot_fired")) >= 2  # they really shared the work
    for task_id in interval_ids:
        slots = assert_every_slot_accounted_once(db_url, task_id)
        assert slots >= 3
    cron_runs = runs_of(db_url, cron_id)
    assert len(cron_runs) >= 6
    assert sum(1 + r["coalesced"] for r in cron_runs) == len(
        {e["slot"] for e in decisions if e["task_id"] == cron_id}
    )
    counters = query(db_url, "SELECT value FROM pgbeat.counters ORDER BY name")
    succeeded = query(db_url, "SELECT count(*) AS n FROM pgbeat.runs WHERE state = 'succeeded'")[0]["n"]
    assert sum(c["value"] for c in counters) == succeeded
