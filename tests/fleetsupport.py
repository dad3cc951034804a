"""Helpers for the tests that run real pgbeat processes (pgbeat_lab.fleet) against a
test's database: start and wait for daemons, create tasks, read runs, and the checks
several of those tests share."""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlsupport import query, wait_for

from pgbeat_lab.fleet import Fleet, Process


def create_task(url: str, spec: dict[str, Any], first_cron_slot: datetime | None = None) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        # Some tests run intervals under the default minimum of 1 s (Rule 18; the floor is 100 ms).
        conn.execute("SET pgbeat.min_interval = '0.1'")
        created = conn.execute("SELECT * FROM pgbeat.create_task(%s, %s)", (Jsonb(spec), first_cron_slot))
        return created.fetchone()


def runs_of(url: str, task_id: int) -> list[dict[str, Any]]:
    """The task's runs in slot order, each with the pid of the worker that claimed it."""
    return query(
        url,
        "SELECT r.*, d.pid AS worker_pid FROM pgbeat.runs r LEFT JOIN pgbeat.daemons d ON d.id = r.daemon_id"
        " WHERE r.task_id = %s ORDER BY r.scheduled_for, r.attempt, r.id",
        task_id,
    )


def task(url: str, task_id: int) -> dict[str, Any]:
    return query(url, "SELECT * FROM pgbeat.tasks WHERE id = %s", task_id)[0]


def live_daemons(url: str, role: str) -> list[dict[str, Any]]:
    return query(url, "SELECT * FROM pgbeat.live_daemons WHERE role = %s", role)


def start(
    fleet: Fleet, role: str, n: int = 1, *args: str, env: dict[str, str] | None = None
) -> list[Process]:
    """Start n processes of a role and wait until each has registered."""
    before = len(live_daemons(fleet.database_url, role))
    procs = [fleet.start(role, *args, env=env) for _ in range(n)]

    def ready() -> bool:
        for p in procs:
            assert p.alive(), f"{role} exited with {p.proc.returncode}:\n{p.log()}"
        return len(live_daemons(fleet.database_url, role)) >= before + n

    wait_for(f"{n} {role}(s) to register", ready)
    return procs


def logged_events(process: Process, event: str) -> list[dict[str, Any]]:
    return process.events(event)


def db_now(url: str) -> datetime:
    return query(url, "SELECT clock_timestamp() AS now")[0]["now"]


def one_more_cycle(url: str, worker: bool = True) -> None:
    """Wait until the daemons have been through one more cycle: a control task due in 1 s
    has had its slot decided (and, with a worker, its run succeeded). Whatever a bug
    would have done meanwhile to the tasks under test (a second run, a slot decided
    while paused), it has had the time to do."""
    control = create_task(url, {"kind": "counter", "schedule": {"in": "1s"}})
    wait_for(
        "a control task's run",
        lambda: [r for r in runs_of(url, control["id"]) if not worker or r["state"] == "succeeded"],
    )


def succeeded_runs(url: str, task_id: int) -> list[dict[str, Any]]:
    return [r for r in runs_of(url, task_id) if r["state"] == "succeeded"]


def fired(url: str, task_id: int) -> int:
    """The task's slots decided so far (runs and the slots folded into them)."""
    return task(url, task_id)["fired"]


def assert_no_overlap(runs: list[dict[str, Any]]) -> None:
    started = sorted((r for r in runs if r["started_at"] is not None), key=lambda r: r["started_at"])
    for a, b in itertools.pairwise(started):
        assert a["finished_at"] is not None and a["finished_at"] <= b["started_at"], (
            f"run {a['id']} [{a['started_at']}, {a['finished_at']}] overlaps run {b['id']}"
        )


def assert_every_slot_accounted_once(url: str, task_id: int) -> int:
    """Every grid slot before the task's next_run_at is covered by exactly one run: its
    own row, or counted in the `coalesced` of the run it was folded into. Returns the
    number of slots. Read in one statement, so tasks and runs are one snapshot."""
    row = query(
        url,
        """
        SELECT round(extract(epoch FROM t.next_run_at - t.anchor) / extract(epoch FROM t.every))::int
                   AS slots,
               (SELECT coalesce(sum(1 + r.coalesced), 0)::int FROM pgbeat.runs r
                 WHERE r.task_id = t.id AND r.attempt = 1 AND r.scheduled_for < t.next_run_at) AS covered,
               (SELECT count(*)::int FROM pgbeat.runs r
                 WHERE r.task_id = t.id AND r.attempt = 1
                   AND extract(epoch FROM r.scheduled_for - t.anchor)
                       <> round(extract(epoch FROM r.scheduled_for - t.anchor) / extract(epoch FROM t.every))
                          * extract(epoch FROM t.every)) AS off_grid
          FROM pgbeat.tasks t WHERE t.id = %s
        """,
        task_id,
    )[0]
    assert row["off_grid"] == 0, "a run's slot is not on the task's grid"
    assert row["covered"] == row["slots"], f"{row['slots']} slots fired, runs cover {row['covered']}"
    return row["slots"]


def report(fleet: Fleet, name: str, **figures: Any) -> None:
    """Print measured figures and keep them next to the test's logs."""
    line = json.dumps({"test": name, **figures}, default=str)
    print(line)
    fleet.log_dir.mkdir(parents=True, exist_ok=True)
    with open(fleet.log_dir / "figures.jsonl", "a") as out:
        out.write(line + "\n")
