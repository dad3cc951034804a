"""The chaos run's invariant checker, tested against healthy and broken histories,
and the 60-second chaos run itself (marked `chaos`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta

import asyncpg
import psycopg
import pytest
from psycopg.types.json import Jsonb
from sqlsupport import wait_for

from pgbeat import daemon, maintenance, migrations
from pgbeat_lab import chaos, invariants

COUNTER_STEP = 2
SLOTS = 29  # the healthy task ran slots 1..29 of its 1 s grid


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


def db_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT now()").fetchone()[0]


def create_task(conn: psycopg.Connection, spec: dict, created_ago: float = 30) -> int:
    """A task created `created_ago` seconds ago (its grid and timestamps moved back too)."""
    task_id = conn.execute("SELECT id FROM pgbeat.create_task(%s)", [Jsonb(spec)]).fetchone()[0]
    conn.execute(
        """UPDATE pgbeat.tasks
              SET created_at = created_at - make_interval(secs => %(ago)s),
                  updated_at = created_at - make_interval(secs => %(ago)s),
                  anchor = anchor - make_interval(secs => %(ago)s),
                  run_at = run_at - make_interval(secs => %(ago)s),
                  next_run_at = next_run_at - make_interval(secs => %(ago)s)
            WHERE id = %(id)s""",
        {"ago": created_ago, "id": task_id},
    )
    return task_id


def insert_run(conn: psycopg.Connection, task_id: int, slot: datetime, **columns: object) -> int:
    """A run of the task for `slot`; by default it succeeded, started 10 ms late, took 40 ms."""
    row = {
        "task_id": task_id,
        "kind": conn.execute("SELECT kind FROM pgbeat.tasks WHERE id = %s", [task_id]).fetchone()[0],
        "scheduled_for": slot,
        "due_at": slot,
        "state": "succeeded",
        "daemon_id": 1,
        "backend_pid": 1,
        "started_at": slot + timedelta(milliseconds=10),
        "finished_at": slot + timedelta(milliseconds=50),
        **columns,
    }
    if isinstance(row.get("result"), dict):
        row["result"] = Jsonb(row["result"])
    names = ", ".join(row)
    values = ", ".join(f"%({k})s" for k in row)
    return conn.execute(f"INSERT INTO pgbeat.runs ({names}) VALUES ({values}) RETURNING id", row).fetchone()[
        0
    ]


@pytest.fixture
def healthy(conn: psycopg.Connection) -> tuple[int, invariants.Record]:
    """A counter task on a 1 s grid that ran every slot for 30 s, its counter exact,
    and the record of a run that stopped its load now. Returns (task id, record)."""
    task_id = create_task(
        conn,
        {"kind": "counter", "params": {"counter": "c1", "step": COUNTER_STEP}, "schedule": {"every": 1}},
    )
    anchor = conn.execute("SELECT anchor FROM pgbeat.tasks WHERE id = %s", [task_id]).fetchone()[0]
    for k in range(SLOTS):
        value = COUNTER_STEP * (k + 1)
        insert_run(
            conn,
            task_id,
            anchor + timedelta(seconds=k),
            result={"counter": "c1", "step": COUNTER_STEP, "value": value},
        )
    conn.execute(
        "INSERT INTO pgbeat.counters (name, value) VALUES ('c1', %s)",
        [COUNTER_STEP * SLOTS],
    )
    conn.execute(
        "UPDATE pgbeat.tasks SET next_run_at = anchor + make_interval(secs => %s), fired = %s WHERE id = %s",
        [SLOTS, SLOTS, task_id],
    )
    now = db_now(conn)
    record = invariants.Record(since=now - timedelta(hours=1), load_stopped_at=now)
    return task_id, record


def slot(conn: psycopg.Connection, task_id: int, k: int) -> datetime:
    return conn.execute(
        "SELECT anchor + make_interval(secs => %s) FROM pgbeat.tasks WHERE id = %s", [k, task_id]
    ).fetchone()[0]


def run_at_slot(conn: psycopg.Connection, task_id: int, k: int) -> int:
    return conn.execute(
        "SELECT id FROM pgbeat.runs WHERE task_id = %s AND scheduled_for = %s",
        [task_id, slot(conn, task_id, k)],
    ).fetchone()[0]


def test_healthy_history_has_no_violations(conn, healthy):
    _, record = healthy
    assert invariants.check(conn, record) == {name: [] for name in invariants.INVARIANTS}


def test_overlapping_runs_are_reported(conn, healthy):
    task_id, record = healthy
    # Run 5 ends after run 6 has started.
    conn.execute(
        "UPDATE pgbeat.runs SET finished_at = finished_at + interval '1.5 s' WHERE id = %s",
        [run_at_slot(conn, task_id, 5)],
    )
    violations = invariants.check(conn, record)["rule_2_no_overlap"]
    assert len(violations) == 1 and f"run {run_at_slot(conn, task_id, 6)} " in violations[0]


def test_a_running_run_is_open_ended(conn, healthy):
    task_id, record = healthy
    conn.execute(
        "UPDATE pgbeat.runs SET state = 'running', finished_at = NULL, result = NULL WHERE id = %s",
        [run_at_slot(conn, task_id, 3)],
    )
    violations = invariants.check(conn, record)["rule_2_no_overlap"]
    assert len(violations) == SLOTS - 4


def test_two_runs_of_one_slot_are_reported(conn, healthy):
    task_id, record = healthy
    conn.execute("ALTER TABLE pgbeat.runs DROP CONSTRAINT runs_one_per_slot")
    s = slot(conn, task_id, 7)
    insert_run(
        conn, task_id, s, state="skipped", daemon_id=None, backend_pid=None, started_at=s, finished_at=s
    )
    violations = invariants.check(conn, record)["rule_1_one_run_per_slot"]
    assert len(violations) == 1 and "has 2 runs" in violations[0]


def test_a_counter_off_by_one_is_reported(conn, healthy):
    _, record = healthy
    conn.execute("UPDATE pgbeat.counters SET value = value + 1 WHERE name = 'c1'")
    violations = invariants.check(conn, record)["rule_4_counters_exact"]
    assert violations == [
        f"counter c1 is {COUNTER_STEP * SLOTS + 1}, its succeeded runs add up to {COUNTER_STEP * SLOTS}"
    ]


def test_a_lost_increment_and_a_missing_counter_are_reported(conn, healthy):
    task_id, record = healthy
    conn.execute("UPDATE pgbeat.runs SET result = '{}' WHERE id = %s", [run_at_slot(conn, task_id, 2)])
    private = create_task(conn, {"kind": "counter", "schedule": {"every": 1}})
    insert_run(conn, private, slot(conn, task_id, 40), result={"counter": f"task:{private}", "step": 1})
    violations = invariants.check(conn, record)["rule_4_counters_exact"]
    assert any("records no counter increment" in v for v in violations)
    assert any(f"counter task:{private} is 0, its succeeded runs add up to 1" in v for v in violations)


def test_stuck_runs_are_reported(conn, healthy):
    task_id, record = healthy
    conn.execute(
        "UPDATE pgbeat.runs SET state = 'running', finished_at = NULL, result = NULL WHERE id = %s",
        [run_at_slot(conn, task_id, SLOTS - 1)],
    )
    other = create_task(conn, {"kind": "sleep", "schedule": {"every": 60}})
    s = slot(conn, task_id, 10)
    insert_run(
        conn, other, s, state="pending", daemon_id=None, backend_pid=None, started_at=None, finished_at=None
    )
    violations = invariants.check(conn, record)["rule_5_abandoned_only_when_the_worker_is_gone"]
    assert len(violations) == 2
    assert "is still running" in violations[0] and "is still pending" in violations[1]


def test_abandoned_runs_must_belong_to_killed_daemons(conn, healthy):
    task_id, record = healthy
    conn.execute(
        "UPDATE pgbeat.runs SET state = 'abandoned', daemon_id = 7 WHERE id = %s",
        [run_at_slot(conn, task_id, 4)],
    )
    name = "rule_5_abandoned_only_when_the_worker_is_gone"
    conn.execute("UPDATE pgbeat.counters SET value = value - %s", [COUNTER_STEP])
    (violation,) = invariants.check(conn, record)[name]
    assert violation.startswith(f"task {task_id}: run {run_at_slot(conn, task_id, 4)} was abandoned at ")
    assert violation.endswith("but its daemon 7 was not killed")
    record.killed_daemon_ids = [3, 7]
    assert invariants.check(conn, record)[name] == []


def test_a_run_beyond_its_timeout_is_reported(conn, healthy):
    task_id, record = healthy
    conn.execute("UPDATE pgbeat.tasks SET timeout = 0.5 WHERE id = %s", [task_id])
    hung = run_at_slot(conn, task_id, SLOTS - 1)
    conn.execute("UPDATE pgbeat.runs SET finished_at = started_at + interval '6 s' WHERE id = %s", [hung])
    violations = invariants.check(conn, record)["rule_5_abandoned_only_when_the_worker_is_gone"]
    assert violations == [f"task {task_id}: run {hung} (succeeded) ran 6.000 s, beyond its timeout of 0.5 s"]


def test_a_task_whose_slots_stopped_firing_is_reported(conn, healthy):
    task_id, record = healthy
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = now() - interval '20 s' WHERE id = %s", [task_id])
    violations = invariants.check(conn, record)["rule_6_every_slot_accounted_for"]
    assert len(violations) == 1 and "stopped firing" in violations[0]


def test_a_task_that_did_not_run_again_after_a_fault_is_reported(conn, healthy):
    task_id, record = healthy
    # A fault from slot 10 to slot 12, then nothing ran until slot 20 (slots coalesced).
    conn.execute(
        "DELETE FROM pgbeat.runs WHERE task_id = %s AND scheduled_for > %s AND scheduled_for < %s",
        [task_id, slot(conn, task_id, 12), slot(conn, task_id, 20)],
    )
    conn.execute("UPDATE pgbeat.runs SET coalesced = 7 WHERE id = %s", [run_at_slot(conn, task_id, 12)])
    conn.execute("UPDATE pgbeat.counters SET value = value - %s", [7 * COUNTER_STEP])
    record.fault_windows = [(slot(conn, task_id, 10), slot(conn, task_id, 12) + timedelta(milliseconds=100))]
    violations = invariants.check(conn, record)["rule_6_every_slot_accounted_for"]
    assert len(violations) == 1 and "no run started within 6.0 s after the fault window" in violations[0]


def test_a_slot_that_vanished_is_reported(conn, healthy):
    task_id, record = healthy
    conn.execute("DELETE FROM pgbeat.runs WHERE id = %s", [run_at_slot(conn, task_id, 15)])
    conn.execute("UPDATE pgbeat.counters SET value = value - %s", [COUNTER_STEP])
    violations = invariants.check(conn, record)["rule_6_every_slot_accounted_for"]
    assert len(violations) == 1
    assert f"task {task_id}: {SLOTS} grid slots from " in violations[0]
    assert violations[0].endswith(f"but runs account for {SLOTS - 1}")
    # Coalesced into its predecessor, the slot is accounted for.
    conn.execute("UPDATE pgbeat.runs SET coalesced = 1 WHERE id = %s", [run_at_slot(conn, task_id, 14)])
    assert invariants.check(conn, record)["rule_6_every_slot_accounted_for"] == []


def test_a_slot_folded_into_a_pending_retry_is_accounted_for(conn, healthy):
    task_id, record = healthy
    conn.execute("UPDATE pgbeat.tasks SET max_retries = 1 WHERE id = %s", [task_id])
    # Slot 15's first attempt failed; slot 16 fell due while its retry was pending.
    failed = run_at_slot(conn, task_id, 15)
    conn.execute("UPDATE pgbeat.runs SET state = 'failed', result = '{}' WHERE id = %s", [failed])
    conn.execute("DELETE FROM pgbeat.runs WHERE id = %s", [run_at_slot(conn, task_id, 16)])
    s = slot(conn, task_id, 15)
    insert_run(
        conn,
        task_id,
        s,
        attempt=2,
        coalesced=1,
        due_at=s + timedelta(seconds=0.5),
        started_at=s + timedelta(seconds=1.01),
        finished_at=s + timedelta(seconds=1.05),
        result={"counter": "c1", "step": COUNTER_STEP},
    )
    conn.execute("UPDATE pgbeat.counters SET value = value - %s", [COUNTER_STEP])
    assert invariants.check(conn, record) == {name: [] for name in invariants.INVARIANTS}


def test_a_one_shot_that_never_ran_is_reported(conn, healthy):
    _, record = healthy
    one_shot = create_task(conn, {"kind": "sleep", "schedule": {"in": "20s"}})
    violations = invariants.check(conn, record)["rule_6_every_slot_accounted_for"]
    assert len(violations) == 1
    assert violations[0].startswith(f"task {one_shot}: one-shot at ") and violations[0].endswith("never ran")


def test_runs_after_delete_or_pause_are_reported(conn, healthy):
    _, record = healthy
    deleted = create_task(conn, {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": 1}})
    conn.execute("SELECT pgbeat.delete_task(%s)", [deleted])
    paused = create_task(conn, {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": 1}})
    conn.execute("SELECT pgbeat.pause_task(%s)", [paused])
    after = db_now(conn) + timedelta(seconds=1)
    before = db_now(conn) - timedelta(seconds=1)
    insert_run(conn, deleted, before)  # ran before its deletion: fine
    insert_run(conn, deleted, after)
    insert_run(conn, paused, after)
    record.load_stopped_at = after + timedelta(seconds=1)
    violations = invariants.check(conn, record)["rule_11_paused_and_deleted_tasks_stop"]
    assert sorted(violations)[0].startswith(f"task {deleted}: run ")
    assert len(violations) == 2
    assert "after the task was deleted" in violations[0] + violations[1]
    assert "after the task was paused" in violations[0] + violations[1]


def test_late_runs_outside_fault_windows_are_reported(conn, healthy):
    task_id, record = healthy
    late = run_at_slot(conn, task_id, SLOTS - 1)
    conn.execute(
        """UPDATE pgbeat.runs SET started_at = scheduled_for + interval '6 s',
                                  finished_at = scheduled_for + interval '6.1 s' WHERE id = %s""",
        [late],
    )
    name = "rule_9_no_run_before_its_slot_and_lateness_bounded"
    violations = invariants.check(conn, record)[name]
    assert len(violations) == 1 and f"run {late} started 6.000 s after" in violations[0]
    # Inside a fault window (or its recovery margin) it is expected.
    s = slot(conn, task_id, SLOTS - 3)
    record.fault_windows = [(s, s + timedelta(seconds=1))]
    assert invariants.check(conn, record)[name] == []


def test_a_high_p99_reports_every_run_over_the_bound(conn, healthy):
    _, record = healthy
    slow = create_task(conn, {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": 10}})
    anchor = conn.execute("SELECT anchor FROM pgbeat.tasks WHERE id = %s", [slow]).fetchone()[0]
    for k in range(3):
        s = anchor + timedelta(seconds=10 * k)
        insert_run(
            conn, slow, s, started_at=s + timedelta(seconds=1.5), finished_at=s + timedelta(seconds=1.6)
        )
    violations = invariants.check(conn, record)["rule_9_no_run_before_its_slot_and_lateness_bounded"]
    assert len(violations) == 3 and all("started 1.500 s after it was ready" in v for v in violations)
    assert "while p99 is" in violations[0]


def test_waiting_behind_the_previous_run_is_not_lateness(conn, healthy):
    task_id, record = healthy
    sleeper = create_task(conn, {"kind": "sleep", "params": {"seconds": 3}, "schedule": {"every": 1}})
    s = slot(conn, task_id, 5)
    first = s + timedelta(milliseconds=10)
    insert_run(conn, sleeper, s, started_at=first, finished_at=first + timedelta(seconds=3), coalesced=0)
    second = first + timedelta(seconds=3, milliseconds=20)
    insert_run(
        conn, sleeper, s + timedelta(seconds=1), started_at=second, finished_at=second + timedelta(seconds=3)
    )
    assert invariants.check(conn, record)["rule_9_no_run_before_its_slot_and_lateness_bounded"] == []


def test_time_a_task_spent_paused_is_not_lateness(conn, healthy):
    """Chaos run, seed 439412: a one-shot paused across its slot fires when resumed, with
    its original slot; its run is not late by the length of the pause."""
    task_id, record = healthy
    s = slot(conn, task_id, 5)
    once = create_task(conn, {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": 3600}})
    resumed = s + timedelta(seconds=14)
    insert_run(
        conn,
        once,
        s,
        started_at=resumed + timedelta(milliseconds=5),
        finished_at=resumed + timedelta(seconds=1),
    )
    name = "rule_9_no_run_before_its_slot_and_lateness_bounded"
    assert len(invariants.check(conn, record)[name]) == 1  # without the resume it looks 14 s late
    record.resumes = [(once, resumed)]
    assert invariants.check(conn, record)[name] == []
    record.resumes = [(once, s - timedelta(seconds=1))]  # a resume before the slot excuses nothing
    assert len(invariants.check(conn, record)[name]) == 1


# --- execution, not bookkeeping ---


def test_a_run_stolen_while_its_worker_kept_executing_it_overlaps(conn, healthy):
    """Run 5's row says abandoned at its slot + 50 ms, but its worker observed it executing
    until after run 6 started: that is an overlap, although the rows do not overlap."""
    task_id, record = healthy
    victim, thief = run_at_slot(conn, task_id, 5), run_at_slot(conn, task_id, 6)
    conn.execute("UPDATE pgbeat.runs SET state = 'abandoned', result = NULL WHERE id = %s", [victim])
    conn.execute("UPDATE pgbeat.counters SET value = value - %s", [COUNTER_STEP])
    record.killed_daemon_ids = [1]
    assert invariants.check(conn, record) == {name: [] for name in invariants.INVARIANTS}
    record.observed_ends = {victim: slot(conn, task_id, 6) + timedelta(milliseconds=500)}
    (violation,) = invariants.check(conn, record)["rule_2_no_overlap"]
    assert violation.startswith(f"task {task_id}: run {thief} started at ")
    assert f"while run {victim} was executing" in violation and "although recorded abandoned" in violation


def test_the_observed_ends_come_from_the_workers_log_or_its_death():
    lines = [
        '{"event": "run_started", "run_id": 1}',
        '{"event": "run_started", "run_id": 2}',
        '{"event": "run_started", "run_id": 3}',
        '{"event": "run_finished", "run_id": 1, "ended_at": "2026-01-01T00:00:01.250000+00:00"}',
        '{"event": "runs_cancelled", "run_ids": [2], "ended_at": "2026-01-01T00:00:02+00:00"}',
        '{"event": "run_finished", "run_id": 3, "ended_',  # cut short by kill -9
    ]
    died = datetime.fromisoformat("2026-01-01T00:00:09+00:00")
    logged, died_with = invariants.observed_ends(lines, died)
    assert logged == {
        1: datetime.fromisoformat("2026-01-01T00:00:01.25+00:00"),
        2: died - timedelta(seconds=7),
    }
    assert died_with == {3: died}
    assert invariants.observed_ends(lines, None) == (logged, {})


def test_a_killed_workers_death_ends_only_the_runs_it_had_not_recorded(conn, healthy):
    """A worker batches its log lines, so kill -9 can take the line of a run it had
    finished: its death then says nothing about that run, whose recorded finish stands.
    A run it had not recorded (abandoned) executed until the death."""
    task_id, record = healthy
    recorded, next_one = run_at_slot(conn, task_id, 5), run_at_slot(conn, task_id, 6)
    record.died_with = {recorded: slot(conn, task_id, 6) + timedelta(milliseconds=500)}
    assert invariants.check(conn, record)["rule_2_no_overlap"] == []
    conn.execute("UPDATE pgbeat.runs SET state = 'abandoned', result = NULL WHERE id = %s", [recorded])
    conn.execute("UPDATE pgbeat.counters SET value = value - %s", [COUNTER_STEP])
    record.killed_daemon_ids = [1]
    (violation,) = invariants.check(conn, record)["rule_2_no_overlap"]
    assert f"run {next_one} started at " in violation and f"while run {recorded} was executing" in violation


def test_a_slot_executed_twice_is_reported(conn, healthy):
    task_id, record = healthy
    conn.execute("ALTER TABLE pgbeat.runs DROP CONSTRAINT runs_one_per_slot")
    s = slot(conn, task_id, 7)
    again = s + timedelta(milliseconds=60)
    insert_run(conn, task_id, s, started_at=again, finished_at=again, result={"counter": "c1", "step": 2})
    conn.execute("UPDATE pgbeat.counters SET value = value + %s", [COUNTER_STEP])
    (violation,) = invariants.check(conn, record)["rule_1_one_run_per_slot"]
    assert "has 2 runs" in violation and "2 of them executed" in violation


def test_runs_and_next_slots_off_the_grid_are_reported(conn, healthy):
    task_id, record = healthy
    off = run_at_slot(conn, task_id, 9)
    conn.execute(
        "UPDATE pgbeat.runs SET scheduled_for = scheduled_for - interval '1 ms' WHERE id = %s", [off]
    )
    conn.execute(
        "UPDATE pgbeat.tasks SET next_run_at = next_run_at + interval '0.3 s' WHERE id = %s", [task_id]
    )
    violations = invariants.check(conn, record)["rule_7_slots_on_the_grid"]
    assert len(violations) == 2
    assert (
        violations[0].startswith(f"task {task_id}: run {off} executed slot ")
        and "8.999 intervals" in violations[0]
    )
    assert "next slot" in violations[1] and "29.3 intervals" in violations[1]


def test_a_skip_task_executing_a_slot_that_fell_due_during_its_run_is_reported(conn, healthy):
    _, record = healthy
    skip = create_task(
        conn, {"kind": "sleep", "params": {"seconds": 2.5}, "schedule": {"every": 1}, "overlap": "skip"}
    )
    s = slot(conn, skip, 5)
    first = insert_run(conn, skip, s, finished_at=s + timedelta(seconds=2.5))
    # Slot 8 fell due after run 5 ended: fine. Slot 6 fell due while it ran: queued, not skipped.
    fine = insert_run(conn, skip, s + timedelta(seconds=3))
    name = "rule_8_skip_never_runs_an_overlapping_slot"
    assert invariants.check(conn, record)[name] == []
    queued = insert_run(
        conn,
        skip,
        s + timedelta(seconds=1),
        started_at=s + timedelta(seconds=2.6),
        finished_at=s + timedelta(seconds=2.9),
    )
    (violation,) = invariants.check(conn, record)[name]
    assert violation.startswith(f"task {skip} (overlap skip): run {queued} executed slot ")
    assert f"while run {first} was executing" in violation and f"run {fine} " not in violation
    # Run 5's worker saw it end before slot 6 (its row was abandoned later): no overlap.
    conn.execute("UPDATE pgbeat.runs SET state = 'abandoned' WHERE id = %s", [first])
    record.killed_daemon_ids = [1]
    record.observed_ends = {first: s + timedelta(seconds=0.5)}
    assert invariants.check(conn, record)[name] == []


def test_cancelled_runs_must_have_outlasted_the_grace_of_a_sigterm(conn, healthy):
    task_id, record = healthy
    cancelled = run_at_slot(conn, task_id, 20)
    conn.execute("UPDATE pgbeat.runs SET state = 'cancelled', result = NULL WHERE id = %s", [cancelled])
    conn.execute("UPDATE pgbeat.counters SET value = value - %s", [COUNTER_STEP])
    name = "rule_15_sigterm_drains_within_the_grace"
    (violation,) = invariants.check(conn, record)[name]
    assert violation.endswith("but its daemon 1 was never SIGTERMed")
    s = slot(conn, task_id, 20)
    record.sigterms, record.shutdown_grace = [(1, s - timedelta(seconds=3))], 3.0
    assert invariants.check(conn, record)[name] == []  # cancelled 3.05 s after the SIGTERM
    record.observed_ends = {cancelled: s - timedelta(seconds=1)}  # its worker stopped it 2 s after
    (violation,) = invariants.check(conn, record)[name]
    assert "2.000 s after its worker was SIGTERMed (the grace is 3 s)" in violation


def test_a_retry_must_follow_a_failed_attempt(conn, healthy):
    task_id, record = healthy
    s = slot(conn, task_id, 12)
    retry = insert_run(
        conn,
        task_id,
        s,
        attempt=2,
        result={"counter": "c1", "step": COUNTER_STEP},
        started_at=s + timedelta(seconds=0.5),
        finished_at=s + timedelta(seconds=0.6),
    )
    conn.execute("UPDATE pgbeat.counters SET value = value + %s", [COUNTER_STEP])
    (violation,) = invariants.check(conn, record)["rule_14_retries_follow_failures"]
    assert violation.startswith(f"task {task_id}: run {retry} is attempt 2 of slot ")
    assert "max_retries of 0" in violation


def test_a_daemon_still_live_or_not_stopped_after_its_sigterm_is_reported(conn, healthy, db_url):
    _, record = healthy
    with psycopg.connect(db_url, autocommit=True) as daemon_session:
        daemon_id = daemon_session.execute("SELECT pgbeat.register_daemon('worker', 'h', 1)").fetchone()[0]
        record.sigterms = [(daemon_id, db_now(conn))]
        violations = invariants.check(conn, record)["rule_12_no_daemon_outlives_its_session"]
        assert (
            len(violations) == 2
            and "still live" in violations[0]
            and "never recorded its stop" in violations[1]
        )
        daemon_session.execute("SELECT pgbeat.stop_daemon(%s)", [daemon_id])
    assert invariants.check(conn, record)["rule_12_no_daemon_outlives_its_session"] == []


# --- the rules guarded by what the chaos run plants: refusals, maintenance, migrate, poison, limits ---


def test_a_task_written_by_a_refused_request_is_reported(conn, healthy):
    """Rule 10: the chaos run names each refused request's task uniquely; a task with
    such a name was written by a refusal (created, or changed)."""
    task_id, record = healthy
    record.refused_names = ["chaos-refused-create-1", "chaos-refused-patch-2"]
    name = "rule_10_refused_input_writes_nothing"
    assert invariants.check(conn, record)[name] == []
    created = create_task(
        conn, {"name": "chaos-refused-create-1", "kind": "sleep", "schedule": {"every": 60}}
    )
    conn.execute("SELECT pgbeat.update_task(%s, %s::jsonb)", [task_id, '{"name": "chaos-refused-patch-2"}'])
    assert invariants.check(conn, record)[name] == [
        f"task {task_id} is named chaos-refused-patch-2, a name only a refused request used"
        " (a refused change wrote it)",
        f"task {created} is named chaos-refused-create-1, a name only a refused request used"
        " (a refused creation wrote it)",
    ]


async def test_history_past_the_retention_and_dead_daemons_are_reported_until_maintenance_runs(
    conn, healthy, db_url
):
    """Rule 13: a finished run and a deleted task older than the retention, and a daemon
    whose session is gone, are violations until the daemons' own maintenance (the
    prune and reap a scheduler or worker runs at its first turn) has removed them."""
    _, record = healthy
    record.retention_days = 1.0
    old = create_task(conn, {"kind": "sleep", "schedule": {"every": 60}}, created_ago=3 * 86400)
    long_ago = db_now(conn) - timedelta(days=2)
    old_run = insert_run(conn, old, long_ago)
    gone = create_task(conn, {"kind": "sleep", "schedule": {"every": 60}}, created_ago=3 * 86400)
    conn.execute("SELECT pgbeat.delete_task(%s)", [gone])
    conn.execute("UPDATE pgbeat.tasks SET deleted_at = now() - interval '2 days' WHERE id = %s", [gone])
    with psycopg.connect(db_url, autocommit=True) as session:  # registers, then its session ends
        dead = session.execute("SELECT pgbeat.register_daemon('worker', 'h', 1)").fetchone()[0]
    record.dead_daemons = [dead]
    name = "rule_13_maintenance_prunes_and_reaps"
    violations = invariants.check(conn, record)[name]
    assert len(violations) == 3
    assert violations[0].startswith(f"task {old}: run {old_run} (succeeded) finished at ")
    assert violations[0].endswith("older than the retention of 1 days, was not pruned")
    assert violations[1].startswith(f"task {gone} was deleted at ")
    assert (
        violations[2]
        == f"daemon {dead} (worker, pid 1) was dead before the load but is still registered (never reaped)"
    )
    async with maintenance.Maintenance(db_url, daemon_id=dead, role="worker", retention_days=1.0) as upkeep:
        await upkeep.prune()
        await upkeep.reap()
    assert invariants.check(conn, record)[name] == []


def test_a_migration_applied_twice_a_lock_left_or_a_stale_schema_is_reported(conn, healthy, db_url):
    """Rule 16: after every migrate ended, each migration was applied once, neither the
    migration lock nor yoyo's lock row is left, the schema files are current, and each
    migrate that was not killed exited 0."""
    _, record = healthy
    name = "rule_16_one_migrate_at_a_time"
    assert invariants.check(conn, record)[name] == []
    conn.execute(
        """INSERT INTO public._yoyo_log (id, migration_hash, migration_id, operation, username, hostname,
                                         created_at_utc)
           SELECT gen_random_uuid()::text, migration_hash, migration_id, 'apply', username, hostname,
                  created_at_utc
             FROM public._yoyo_log WHERE migration_id = '0001_baseline' AND operation = 'apply' LIMIT 1"""
    )
    conn.execute("INSERT INTO public.yoyo_lock (locked, ctime, pid) VALUES (1, now(), 4242)")
    conn.execute("COMMENT ON SCHEMA pgbeat IS 'pgbeat schema files sha256:old'")
    record.migrate_failures = ["pgbeat migrate (pid 7) exited 1: boom"]
    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(1885823597, 0)")
        holder_pid = holder.info.backend_pid
        violations = invariants.check(conn, record)[name]
    assert violations == [
        "migration 0001_baseline was applied 2 times (rolled back 0 times)",
        f"the migration lock is held by backend {holder_pid} after every migrate ended",
        "yoyo's lock row of pid 4242 was left after every migrate ended",
        "the schema files recorded are pgbeat schema files sha256:old,"
        f" not the current {migrations.schema_digest()}",
        "pgbeat migrate (pid 7) exited 1: boom",
    ]


def test_poison_left_in_place_and_a_task_that_stopped_firing_beside_it_are_reported(conn, healthy):
    """Rule 17: a poison task must end set aside (error, paused, nothing pending), and
    every other untouched interval task must have started a run within its interval
    (plus its run's length and the lateness bound) of each slot after the poison."""
    task_id, record = healthy
    poison = create_task(conn, {"kind": "counter", "schedule": {"every": 1}})
    conn.execute("""UPDATE pgbeat.tasks SET params = '{"step": "abc"}' WHERE id = %s""", [poison])
    record.poison_tasks, record.poison_at = [poison], slot(conn, task_id, 10)
    name = "rule_17_one_tasks_data_stops_no_other_task"
    assert invariants.check(conn, record)[name] == [
        f"poison task {poison} is not set aside (no error, not paused)"
    ]
    conn.execute("SELECT pgbeat.set_task_aside(%s, 'finishing a run failed: step')", [poison])
    assert invariants.check(conn, record)[name] == []
    # The healthy task stopped firing at slot 20, beside the poison.
    conn.execute(
        "DELETE FROM pgbeat.runs WHERE task_id = %s AND scheduled_for >= %s",
        [task_id, slot(conn, task_id, 20)],
    )
    violations = invariants.check(conn, record)[name]
    assert violations and all(
        v.startswith(f"task {task_id}: no run started within 6.0 s of its slot ") for v in violations
    )
    first = conn.execute("SELECT %s::timestamptz::text", [slot(conn, task_id, 20)]).fetchone()[0]
    assert f"of its slot {first} " in violations[0]
    # Inside a fault window (and its recovery margin), it is excused.
    record.fault_windows = [(slot(conn, task_id, 19), slot(conn, task_id, 20))]
    assert invariants.check(conn, record)[name] == []


def test_rows_outside_the_limits_and_a_count_that_did_not_saturate_are_reported(conn, healthy):
    """Rule 18: times outside [1970, 9000), an interval under the minimum, a name over
    200 characters, a task set aside by an overflow, a count that stopped short of its
    cap; the constraints that hold most of these are dropped to write them."""
    task_id, record = healthy
    name = "rule_18_limits_hold"
    for table, constraint in [
        ("tasks", "tasks_times_in_range"),
        ("tasks", "tasks_every_floor"),
        ("tasks", "tasks_name_length"),
        ("runs", "runs_times_in_range"),
    ]:
        conn.execute(f"ALTER TABLE pgbeat.{table} DROP CONSTRAINT {constraint}")
    spec = {"kind": "sleep", "schedule": {"every": 60}}
    far, fine, long, overflowed, short = (create_task(conn, spec) for _ in range(5))
    record.saturated_tasks = [short]
    conn.execute("UPDATE pgbeat.tasks SET fired = 2147483647 WHERE id = %s", [short])
    assert invariants.check(conn, record)[name] == []
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = '9500-01-01 00:00:00+00' WHERE id = %s", [far])
    conn.execute("UPDATE pgbeat.tasks SET every = '200 ms', anchor = anchor WHERE id = %s", [fine])
    conn.execute("UPDATE pgbeat.tasks SET name = repeat('n', 201) WHERE id = %s", [long])
    conn.execute("SELECT pgbeat.set_task_aside(%s, 'integer out of range')", [overflowed])
    conn.execute("UPDATE pgbeat.tasks SET fired = 2147483646 WHERE id = %s", [short])
    late = run_at_slot(conn, task_id, 3)
    conn.execute("UPDATE pgbeat.runs SET finished_at = '9001-01-01 00:00:00+00' WHERE id = %s", [late])
    violations = invariants.check(conn, record)[name]
    anchor = conn.execute("SELECT anchor::text FROM pgbeat.tasks WHERE id = %s", [far]).fetchone()[0]
    assert violations[0].startswith(f"task {task_id}: run {late} holds a time outside [1970, 9000)")
    assert violations[1:] == [
        f"task {far}: a time outside [1970, 9000) (next 9500-01-01 00:00:00+00, at none, anchor {anchor},"
        " until none)",
        f"task {fine}: every 00:00:00.2 is under the minimum of 1 s",
        f"task {long}: a name of 201 characters",
        f"task {overflowed}: set aside by a value out of range instead of saturating: integer out of range",
        f"task {short}: fired is 2147483646 after firing past 2^31 - 1 (it saturates there)",
    ]


# --- regressions found by the chaos run ---


@pytest.mark.slow
def test_a_resume_counts_from_its_transaction_not_from_its_answer(fleet, conn):
    """Chaos run, seed 266319: a one-shot resumed past its slot started before the resume's
    answer reached the harness, so the resume, timed by its answer, excused nothing and
    the run looked 5.65 s late. The resume's own transaction time is never after the run
    it releases."""
    since = db_now(conn)
    fleet.start("scheduler")
    fleet.start("worker")
    api = chaos.Api(fleet.start_api()[1])
    status, task = api.call(
        "POST", "/tasks", {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"in": 0.5}}
    )
    assert status == 201, task
    assert api.call("POST", f"/tasks/{task['id']}/pause")[0] == 200
    wait_for(  # its slot passes while it is paused
        "the paused one-shot's slot to pass by 1 s",
        lambda: db_now(conn) > datetime.fromisoformat(task["schedule"]["at"]) + timedelta(seconds=1),
    )
    status, resumed = api.call("POST", f"/tasks/{task['id']}/resume")
    assert status == 200, resumed
    moment = chaos.resumed_at(resumed)
    [(started_at,)] = wait_for(
        "the resumed one-shot to start",
        lambda: conn.execute(
            "SELECT started_at FROM pgbeat.runs WHERE task_id = %s AND started_at IS NOT NULL", [task["id"]]
        ).fetchall(),
        timeout=15,
        every=0.05,
    )
    assert since < moment <= started_at
    record = invariants.Record(since=since, load_stopped_at=db_now(conn), resumes=[(task["id"], moment)])
    assert invariants.check(conn, record)["rule_9_no_run_before_its_slot_and_lateness_bounded"] == []
    assert started_at - datetime.fromisoformat(task["schedule"]["at"]) > timedelta(seconds=1)


async def test_a_daemon_reconnects_when_asyncpg_loses_track_of_a_terminated_session():
    """Chaos run, PostgreSQL restart: both schedulers exited with asyncpg's
    InternalClientError ("cannot switch to state 12; another operation (2) is in
    progress") instead of reconnecting, and no slot fired again."""
    stop = asyncio.Event()
    calls = 0

    async def session_main() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.InternalClientError(
                "cannot switch to state 12; another operation (2) is in progress"
            )
        stop.set()

    await daemon.run_forever("scheduler", stop, session_main)
    assert calls == 2


# --- the chaos run itself ---


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_chaos_run_60s():
    """60 s of load with kill -9s, a SIGTERM, a PostgreSQL restart, patches,
    deletes, pauses and resumes: every invariant holds."""
    result = chaos.run(chaos.ChaosOptions(duration=60, tasks=200))
    print(result.report)
    assert result.passed, result.report
