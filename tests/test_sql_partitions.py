"""History by day (migration 0007, 50_daemons.sql): pgbeat.runs is partitioned by its
slot, one partition per UTC day; partitions are added ahead and whole days dropped
past retention, never one holding a pending or running run (Rules 3 and 13), and
Rule 3 holds across partitions although its unique index is each partition's own."""

from __future__ import annotations

import psycopg
from sqlsupport import claim, connect, create_task, finish, materialize, runs

from pgbeat import migrations

EVERY_HOUR = {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": "1h"}}


def partitions(conn: psycopg.Connection) -> dict[str, str]:
    rows = conn.execute(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'pgbeat.runs'::regclass"""
    ).fetchall()
    return {r["relname"]: r["bound"] for r in rows}


def day_name(conn: psycopg.Connection, days: int) -> str:
    return conn.execute(
        "SELECT 'runs_' || to_char((now() AT TIME ZONE 'UTC')::date + %s, 'YYYYMMDD') AS name", [days]
    ).fetchone()["name"]


def add_run(
    conn: psycopg.Connection, task_id: int, state: str, slot_ago: str, finished_ago: str | None = None
):
    """A run of the task whose slot was `slot_ago` ago (finished `finished_ago` ago, or at
    its slot); returns its id and the partition it sits in."""
    return conn.execute(
        """INSERT INTO pgbeat.runs AS r (task_id, kind, scheduled_for, due_at, state, started_at, finished_at)
           SELECT %(id)s, 'sleep', s.at, s.at, %(state)s,
                  CASE WHEN %(state)s <> 'pending' THEN s.at END,
                  CASE WHEN %(state)s <> 'pending' THEN now() - coalesce(%(done)s::interval, now() - s.at) END
             FROM (SELECT now() - %(ago)s::interval AS at) s
           RETURNING r.id, r.tableoid::regclass::text AS part""",
        {"id": task_id, "state": state, "ago": slot_ago, "done": finished_ago},
    ).fetchone()


def test_runs_are_kept_by_day_with_the_coming_days_made_ahead(db_url):
    conn = connect(db_url)
    parts = partitions(conn)
    assert {day_name(conn, d) for d in range(3)} <= parts.keys()
    assert parts["runs_default"] == "DEFAULT"
    assert [b for b in parts.values() if "MINVALUE" in b], "every slot before the migration has a partition"
    assert conn.execute("SELECT pgbeat.add_run_partitions(4) AS n").fetchone()["n"] == 2
    assert conn.execute("SELECT pgbeat.add_run_partitions(4) AS n").fetchone()["n"] == 0
    assert {day_name(conn, d) for d in range(5)} <= partitions(conn).keys()
    # Each partition carries Rule 3's unique index, the day's runs land in the day's partition.
    for part in partitions(conn):
        assert conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AS ok", [f"pgbeat.{part}_one_pending"]
        ).fetchone()["ok"], part
    task = create_task(conn, EVERY_HOUR)["id"]
    assert add_run(conn, task, "succeeded", "1 minute")["part"] in (f"pgbeat.{day_name(conn, 0)}",)


def test_a_day_whose_slots_sit_in_the_default_partition_keeps_them_there(db_url):
    """A slot no partition covered went to runs_default; that day's partition is then
    not made (attaching it would fail), the other days are, and nothing is lost."""
    conn = connect(db_url)
    task = create_task(conn, EVERY_HOUR)["id"]
    stray = add_run(conn, task, "succeeded", "-6 days")
    assert stray["part"] == "pgbeat.runs_default"
    assert conn.execute("SELECT pgbeat.add_run_partitions(8) AS n").fetchone()["n"] == 5
    assert day_name(conn, 6) not in partitions(conn)
    assert {day_name(conn, d) for d in (3, 4, 5, 7, 8)} <= partitions(conn).keys()
    assert [r["id"] for r in runs(conn, task)] == [stray["id"]]


def test_retention_drops_whole_days_but_never_one_with_a_live_run(db_url):
    """The partition of the days before the migration is past a retention of zero; it is
    dropped only once nothing in it is pending or running and nothing finished after the
    cutoff. A day not yet past stays whole; rows outside the day partitions go row by
    row (prune_history)."""
    conn = connect(db_url)
    done, live = create_task(conn, EVERY_HOUR)["id"], create_task(conn, EVERY_HOUR)["id"]
    old = add_run(conn, done, "succeeded", "3 days")
    late = add_run(
        conn, done, "failed", "3 days 1 hour", finished_ago="-1 minute"
    )  # finishes after the cutoff
    pending = add_run(conn, live, "pending", "2 days")
    assert old["part"] == late["part"] == pending["part"]
    before = partitions(conn)

    def drop() -> int:
        return conn.execute("SELECT pgbeat.drop_run_partitions(interval '0') AS n").fetchone()["n"]

    assert drop() == 0
    conn.execute("UPDATE pgbeat.runs SET finished_at = now() - interval '1 s' WHERE id = %s", [late["id"]])
    assert drop() == 0, "a pending run keeps its day"
    conn.execute("SELECT pgbeat.pause_task(%s)", [live])  # cancels the pending run
    # Detached, then its foreign key dropped, then the table: one step per call.
    assert [drop(), drop(), drop(), drop()] == [1, 1, 1, 0]
    assert partitions(conn).keys() == before.keys() - {old["part"].removeprefix("pgbeat.")}
    assert conn.execute("SELECT to_regclass(%s) AS t", [old["part"]]).fetchone()["t"] is None
    assert runs(conn, done) == [] and runs(conn, live) == []
    # Today is not over: its partition stays whole, even row by row. A slot of the days
    # before, now that their partition is gone, lands in runs_default: row by row.
    recent = add_run(conn, done, "succeeded", "1 second", finished_ago="1 second")
    stray = add_run(conn, done, "succeeded", "3 days")
    assert stray["part"] == "pgbeat.runs_default"
    assert drop() == 0
    assert conn.execute("SELECT pgbeat.prune_history(interval '0', 100) AS n").fetchone()["n"] == 1
    assert [r["id"] for r in runs(conn, done)] == [recent["id"]]


def test_a_retry_never_becomes_a_second_pending_run_across_partitions(db_url):
    """Rule 3: a run from a slot two days ago (in the partition of the past days) fails
    while its task's next slot is already pending (in today's): its retry would be a
    second pending run in another partition, which no unique index sees; the task's
    pending run is the next attempt instead."""
    conn = connect(db_url)
    task = create_task(conn, {**EVERY_HOUR, "max_retries": 3, "overlap": "queue"})["id"]
    old = add_run(conn, task, "pending", "2 days")
    [claimed] = claim(conn)
    assert claimed["run_id"] == old["id"]
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = now() - interval '1 s' WHERE id = %s", [task])
    [queued] = [m for m in materialize(conn) if m["task_id"] == task]
    assert queued["outcome"] == "queued"
    finish(conn, old["id"], "failed", error="boom")
    pending = [r for r in runs(conn, task) if r["state"] == "pending"]
    assert [r["id"] for r in pending] == [queued["run_id"]]


def test_a_due_slot_finds_the_pending_run_in_another_partition(db_url):
    """Rule 3: a task whose pending run has a slot two days back (a retry waiting out its
    backoff) folds its slot due now into that run; it never writes a second one."""
    conn = connect(db_url)
    task = create_task(conn, {**EVERY_HOUR, "overlap": "queue"})["id"]
    waiting = add_run(conn, task, "pending", "2 days")
    conn.execute("UPDATE pgbeat.runs SET due_at = now() + interval '1 h' WHERE id = %s", [waiting["id"]])
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = now() - interval '1 s' WHERE id = %s", [task])
    [fired] = [m for m in materialize(conn) if m["task_id"] == task]
    assert (fired["outcome"], fired["run_id"]) == ("coalesced", waiting["id"])
    triggered = conn.execute("SELECT (pgbeat.trigger_task(%s)).id AS id", [task]).fetchone()["id"]
    assert triggered == waiting["id"]
    assert [r["id"] for r in runs(conn, task) if r["state"] == "pending"] == [waiting["id"]]


def test_migration_0007_keeps_every_run_and_its_rollback_too(db_url):
    """Runs written before the migration (finished, pending, with their ids) are the same
    rows after it and after its rollback, and new ids continue after theirs."""
    conn = connect(db_url)
    task = create_task(conn, EVERY_HOUR)["id"]
    migrations.rollback(db_url, 1)
    assert conn.execute("SELECT count(*) AS n FROM pg_partitioned_table").fetchone()["n"] == 0
    migrations.apply_schema(db_url)
    for state, ago in (("succeeded", "400 days"), ("failed", "2 days"), ("pending", "1 minute")):
        add_run(conn, task, state, ago)
    before = conn.execute("SELECT * FROM pgbeat.runs ORDER BY id").fetchall()
    assert migrations.apply(db_url) == ["0007_runs_by_day"]
    assert conn.execute("SELECT * FROM pgbeat.runs ORDER BY id").fetchall() == before
    newer = add_run(conn, task, "succeeded", "1 second")
    assert newer["id"] > before[-1]["id"]
    migrations.rollback(db_url, 1)
    migrations.apply_schema(db_url)
    assert [r["id"] for r in conn.execute("SELECT id FROM pgbeat.runs ORDER BY id").fetchall()] == [
        *(r["id"] for r in before),
        newer["id"],
    ]
    assert migrations.apply(db_url) == ["0007_runs_by_day"]
