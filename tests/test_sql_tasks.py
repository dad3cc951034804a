"""Task operations in the database: create, update, pause, resume, trigger, delete."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Jsonb
from sqlsupport import (
    claim,
    connect,
    create_task,
    finish,
    make_due,
    materialize,
    release,
    row_counts,
    runs,
    task,
)
from test_cron_standard import random_expression

from pgbeat import schedules

HOUR = {"every": "1h"}


def db_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT now() AS t").fetchone()["t"]


def update(conn: psycopg.Connection, task_id: int, changes: dict, first_slot=None) -> dict:
    return conn.execute(
        "SELECT * FROM pgbeat.update_task(%s, %s, %s)", (task_id, Jsonb(changes), first_slot)
    ).fetchone()


def call(conn: psycopg.Connection, fn: str, task_id: int, *args) -> dict:
    placeholders = ", ".join(["%s"] * (1 + len(args)))
    return conn.execute(f"SELECT * FROM pgbeat.{fn}({placeholders})", (task_id, *args)).fetchone()


def test_create_fills_defaults_and_puts_the_first_slot_one_interval_ahead(db_url):
    conn = connect(db_url)
    with conn.transaction():
        t = create_task(conn, {"kind": "http", "schedule": {"every": "1h30m"}})
        now = db_now(conn)
    assert t["name"] == "http" and t["paused"] is False and t["fired"] == 0
    assert t["params"] == {"url": "https://httpbin.org/status/200", "method": "GET"}
    assert t["every"] == timedelta(minutes=90) and t["anchor"] == now + timedelta(minutes=90)
    assert t["next_run_at"] == t["anchor"]
    assert (t["timeout"], t["overlap_policy"], t["misfire_policy"], t["max_retries"]) == (
        60,
        "queue",
        "run_once",
        0,
    )
    s = create_task(conn, {"kind": "sleep", "schedule": {"every": 90}})
    assert s["params"] == {"seconds": 1} and s["every"] == timedelta(seconds=90)
    c = create_task(conn, {"kind": "counter", "name": "c", "schedule": {"every": "2 minutes"}})
    assert c["params"] == {"step": 1} and c["every"] == timedelta(minutes=2)
    # "1 day" is a fixed 24 h, independent of the session's time zone
    d = create_task(conn, {"kind": "sleep", "schedule": {"every": "1 day"}})
    assert d["every"] == timedelta(hours=24)
    status = conn.execute(
        "SELECT status, schedule FROM pgbeat.task_status WHERE id = %s", (t["id"],)
    ).fetchone()
    assert status["status"] == "active" and status["schedule"]["every"] == "1h30m"


def test_create_with_a_past_start_continues_its_grid_from_now(db_url):
    conn = connect(db_url)
    with conn.transaction():
        t = create_task(
            conn, {"kind": "sleep", "schedule": {"every": "60s", "start": "2020-01-01T00:00:07Z"}}
        )
        now = db_now(conn)
    assert t["anchor"].isoformat() == "2020-01-01T00:00:07+00:00"
    assert now < t["next_run_at"] <= now + timedelta(seconds=60)
    assert t["next_run_at"].second == 7 and t["next_run_at"].microsecond == 0


def test_create_one_shots_and_cron(db_url):
    conn = connect(db_url)
    with conn.transaction():
        at = create_task(conn, {"kind": "sleep", "schedule": {"at": "2999-08-08T17:35:00+02:00"}})
        inn = create_task(conn, {"kind": "sleep", "schedule": {"in": "1h30m"}})
        now = db_now(conn)
    assert at["next_run_at"].isoformat() == "2999-08-08T15:35:00+00:00" and at["run_at"] == at["next_run_at"]
    assert inn["next_run_at"] == now + timedelta(minutes=90)
    slot = schedules.next_cron_slot("0 */5 * * * *", "America/New_York", now)
    cron = create_task(
        conn, {"kind": "sleep", "schedule": {"cron": " 0 */5 * * * * ", "timezone": "America/New_York"}}, slot
    )
    assert (cron["cron"], cron["timezone"], cron["next_run_at"]) == (
        "0 */5 * * * *",
        "America/New_York",
        slot,
    )
    # Stored as the tz database spells it: croniter's zoneinfo is case-sensitive.
    slot = schedules.next_cron_slot("* * * * *", "UTC", now)
    lower = create_task(
        conn, {"kind": "sleep", "schedule": {"cron": "* * * * *", "timezone": "europe/paris"}}, slot
    )
    assert lower["timezone"] == "Europe/Paris"
    # A session time zone set by the caller is left as it was.
    with conn.transaction():
        conn.execute("SET LOCAL timezone = 'Asia/Tokyo'")
        create_task(conn, {"kind": "sleep", "schedule": {"cron": "* * * * *", "timezone": "UTC"}}, slot)
        assert conn.execute("SHOW timezone").fetchone()["TimeZone"] == "Asia/Tokyo"


def test_counter_step_given_as_a_float_is_stored_as_an_integer_and_counts(db_url):
    conn = connect(db_url)
    t = create_task(conn, {"kind": "counter", "params": {"step": 2.0}, "schedule": HOUR})
    assert t["params"] == {"step": 2}
    conn.execute("SELECT pgbeat.trigger_task(%s)", (t["id"],))
    (c,) = claim(conn)
    assert finish(conn, c["run_id"])["applied"]
    assert conn.execute("SELECT value FROM pgbeat.counters").fetchone()["value"] == 2
    h = create_task(
        conn, {"kind": "http", "params": {"expect_status": 204.0, "method": "head"}, "schedule": HOUR}
    )
    assert h["params"]["expect_status"] == 204 and h["params"]["method"] == "HEAD"


def test_update_changes_only_what_is_given(db_url):
    conn = connect(db_url)
    t = create_task(conn, {"kind": "sleep", "schedule": HOUR, "params": {"seconds": 2}})
    u = update(conn, t["id"], {"name": "renamed", "timeout": 5, "params": {"seconds": 3}, "max_retries": 2})
    assert (u["name"], u["timeout"], u["params"], u["max_retries"]) == ("renamed", 5, {"seconds": 3}, 2)
    assert u["next_run_at"] == t["next_run_at"] and u["anchor"] == t["anchor"]
    assert u["updated_at"] >= t["updated_at"]
    # Same kind is accepted; another kind is not.
    assert update(conn, t["id"], {"kind": "sleep"})["kind"] == "sleep"


def test_a_new_schedule_starts_a_new_grid_and_drops_the_pending_run(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    make_due(conn, tid, 5)
    materialize(conn)
    with conn.transaction():
        u = update(conn, tid, {"schedule": {"every": "10m"}})
        now = db_now(conn)
    # fired counts every slot since creation: a new schedule keeps it (max_runs caps it).
    assert u["anchor"] == now + timedelta(minutes=10) and u["next_run_at"] == u["anchor"] and u["fired"] == 1
    (r,) = runs(conn, tid)
    assert (r["state"], r["error"]) == ("cancelled", "schedule changed")


def test_pause_resume_and_trigger(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": {"every": "60s"}})["id"]
    make_due(conn, tid, 5)
    materialize(conn)
    p = call(conn, "pause_task", tid)
    assert p["paused"] is True
    (r,) = runs(conn, tid)
    assert (r["state"], r["error"]) == ("cancelled", "task paused")
    assert call(conn, "pause_task", tid)["paused"] is True  # pausing twice is harmless
    # Slots fall due while paused: nothing fires.
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = next_run_at - interval '300 s' WHERE id = %s", (tid,))
    assert materialize(conn) == []
    assert conn.execute("SELECT status FROM pgbeat.task_status WHERE id = %s", (tid,)).fetchone()[
        "status"
    ] == ("paused")
    # Trigger works on a paused task (an explicit request), and twice gives the same run.
    trig = call(conn, "trigger_task", tid)
    assert trig["state"] == "pending" and trig["due_at"] <= db_now(conn)
    assert call(conn, "trigger_task", tid)["id"] == trig["id"]
    # Resume: the next slot is on the grid after now; slots missed while paused are not misfires.
    with conn.transaction():
        res = call(conn, "resume_task", tid)
        now = db_now(conn)
    assert res["paused"] is False and now < res["next_run_at"] <= now + timedelta(seconds=60)
    k = (res["next_run_at"] - res["anchor"]) / res["every"]
    assert k == int(k)
    assert materialize(conn) == []
    assert call(conn, "resume_task", tid)["next_run_at"] == res["next_run_at"]  # resuming twice: no change
    # A cron task resumes at the next slot its caller computed (croniter).
    t = create_task(conn, {"kind": "sleep", "schedule": {"cron": "* * * * *"}}, "2999-01-01T00:00:00Z")
    call(conn, "pause_task", t["id"])
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = now() - interval '5 min' WHERE id = %s", (t["id"],))
    res = call(conn, "resume_task", t["id"], "2999-01-01T00:01:00Z")
    assert res["next_run_at"].isoformat() == "2999-01-01T00:01:00+00:00"


def test_trigger_makes_a_retry_waiting_for_its_backoff_due_now(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR, "max_retries": 1, "retry_backoff": 3600})[
        "id"
    ]
    call(conn, "trigger_task", tid)
    (c,) = claim(conn)
    finish(conn, c["run_id"], "failed")
    release(conn, [tid])
    retry = runs(conn, tid)[1]
    assert retry["due_at"] > db_now(conn) + timedelta(minutes=30)
    trig = call(conn, "trigger_task", tid)
    assert trig["id"] == retry["id"] and trig["due_at"] <= db_now(conn)
    assert [r["run_id"] for r in claim(conn)] == [retry["id"]]


def test_delete_keeps_history_and_then_the_task_is_readable_but_never_changed(db_url):
    conn, worker = connect(db_url), connect(db_url)
    tid = create_task(conn, {"kind": "counter", "name": "doomed", "schedule": HOUR})["id"]
    call(conn, "trigger_task", tid)
    (running,) = claim(worker)
    make_due(conn, tid, 5)
    materialize(conn)  # a pending run behind the running one
    d = call(conn, "delete_task", tid)
    assert d["deleted_at"] is not None and d["next_run_at"] is None
    # The running run still finishes (its counter counts); the pending one is cancelled.
    assert finish(worker, running["run_id"])["applied"]
    release(worker, [tid])
    history = conn.execute(
        "SELECT task_name, state, error, task_deleted FROM pgbeat.run_history WHERE task_id = %s ORDER BY id",
        (tid,),
    ).fetchall()
    assert history == [
        {"task_name": "doomed", "state": "succeeded", "error": None, "task_deleted": True},
        {"task_name": "doomed", "state": "cancelled", "error": "task deleted", "task_deleted": True},
    ]
    status = conn.execute("SELECT status FROM pgbeat.task_status WHERE id = %s", (tid,)).fetchone()
    assert status["status"] == "deleted"
    assert conn.execute("SELECT value FROM pgbeat.counters").fetchone()["value"] == 1
    for fn in ("delete_task", "pause_task", "resume_task", "trigger_task"):
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match=f"task {tid} is deleted"):
            call(conn, fn, tid)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        update(conn, tid, {"name": "x"})
    assert materialize(conn) == [] and claim(worker) == []
    assert task(conn, tid)["name"] == "doomed"


def test_raising_the_limits_of_a_completed_task_lets_it_continue_on_its_grid(db_url):
    conn = connect(db_url)
    t = create_task(conn, {"kind": "sleep", "schedule": {"every": "60s"}, "max_runs": 1})
    make_due(conn, t["id"], 5)
    materialize(conn)
    assert task(conn, t["id"])["next_run_at"] is None  # complete
    assert update(conn, t["id"], {"max_runs": 1})["next_run_at"] is None  # still complete
    with conn.transaction():
        u = update(conn, t["id"], {"max_runs": 3})
        now = db_now(conn)
    assert now < u["next_run_at"] <= now + timedelta(seconds=60)
    k = (u["next_run_at"] - u["anchor"]) / u["every"]
    assert k == int(k)
    # Lowering until below the next slot completes it again; removing until continues it.
    assert update(conn, t["id"], {"until": (now + timedelta(seconds=1)).isoformat()})["next_run_at"] is None
    assert update(conn, t["id"], {"until": None})["next_run_at"] == u["next_run_at"]
    # A one-shot that ran is done whatever its limits say.
    once = create_task(conn, {"kind": "sleep", "schedule": {"in": 60}})
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = now() - interval '1 s' WHERE id = %s", (once["id"],))
    conn.execute("UPDATE pgbeat.tasks SET run_at = next_run_at WHERE id = %s", (once["id"],))
    materialize(conn)
    assert update(conn, once["id"], {"max_runs": 5})["next_run_at"] is None


def test_create_tasks_writes_every_spec_in_order_or_none(db_url):
    specs = [Jsonb({"name": f"t{i}", "kind": "sleep", "schedule": HOUR}) for i in range(3)]
    create_many = "SELECT * FROM pgbeat.api_create_tasks(%s::jsonb[], %s::timestamptz[])"
    with connect(db_url) as conn:
        rows = conn.execute(create_many, (specs, [None] * 3)).fetchall()
        assert [r["name"] for r in rows] == ["t0", "t1", "t2"]
        assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
        assert {r["status"] for r in rows} == {"active"}
        # One spec refused: the call writes nothing and names that spec's field.
        refused = [*specs, Jsonb({"kind": "nope", "schedule": HOUR})]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"^kind: ") as caught:
            conn.execute(create_many, (refused, [None] * 4))
        assert caught.value.diag.column_name == "kind"
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"^tasks: "):
            conn.execute(create_many, (specs, [None] * 2))
        assert conn.execute("SELECT count(*) AS n FROM pgbeat.tasks").fetchone()["n"] == 3


def test_psql_callers_pass_ids_as_they_write_them(db_url):
    """trigger_task, pause_task, resume_task, update_task and delete_task take a bigint:
    7, 7::bigint and '7' all work; an id past the column's range is an unknown task (P0002)."""
    with connect(db_url) as conn:
        tid = create_task(conn, {"kind": "sleep", "schedule": {"every": 3600}})["id"]
        run = conn.execute(f"SELECT * FROM pgbeat.trigger_task({tid}::bigint)").fetchone()
        assert run["task_id"] == tid and run["state"] == "pending"
        assert conn.execute(f"SELECT paused FROM pgbeat.pause_task('{tid}')").fetchone()["paused"] is True
        assert (
            conn.execute(f"SELECT paused FROM pgbeat.resume_task({tid}::int8)").fetchone()["paused"] is False
        )
        for written in (f"{tid}::bigint", f"'{tid}'"):
            renamed = conn.execute(f"""SELECT name FROM pgbeat.update_task({written}, '{{"name": "x"}}')""")
            assert renamed.fetchone()["name"] == "x"
        for fn in ("trigger_task", "pause_task", "resume_task", "delete_task"):
            with pytest.raises(psycopg.errors.NoDataFound, match="not found"):
                conn.execute(f"SELECT pgbeat.{fn}({2**40})")
            conn.rollback()
        with pytest.raises(psycopg.errors.NoDataFound, match="not found"):
            conn.execute(f"""SELECT pgbeat.update_task({2**40}, '{{"name": "x"}}')""")
        conn.rollback()
        assert conn.execute(f"SELECT deleted_at FROM pgbeat.delete_task({tid}::bigint)").fetchone()[
            "deleted_at"
        ]


@pytest.mark.parametrize(
    ("cron", "problem"),
    [
        ("61 * * * *", "61 is out of range in the minute field"),
        ("0 24 * * *", "hour field"),
        ("0 0 0 * *", "day-of-month field"),
        ("0 0 * 13 *", "month field"),
        ("0 0 * * 8", "day-of-week field"),
        ("* * * * * 60", "seconds field"),
        ("*/0 * * * *", "step 0"),
        ("0 0 * foo *", "not a value of the month field"),
        ("*/61 * * * *", "step 61 is out of range"),
        ("5/10 * * * *", "a step needs \\* or a range"),
        ("10-5 * * * *", "goes backwards"),
        ("0 0 31 2 *", "never fires"),
    ],
)
def test_psql_callers_get_the_cron_field_ranges_the_api_checks(db_url, cron, problem):
    """An expression the API's Python (schedules.parse_cron) refuses is refused in SQL
    too, so a psql user cannot store a schedule no scheduler can compute (Rule 10)."""
    with pytest.raises(ValueError):
        schedules.parse_cron(cron)
    with connect(db_url) as conn:
        spec = {"kind": "sleep", "schedule": {"cron": cron}}
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=problem):
            conn.execute("SELECT pgbeat.create_task(%s, now() + interval '1 hour')", (Jsonb(spec),))
        conn.rollback()
        for good in ("0 9 * * mon-fri", "*/15 * * * *", "0 0 1 jan,jul *", "0 9 * * 1-5 30", "@daily"):
            spec = {"kind": "sleep", "schedule": {"cron": good}}
            first = schedules.next_cron_slot(good, "UTC", db_now(conn))
            conn.execute("SELECT pgbeat.create_task(%s, %s)", (Jsonb(spec), first))


# ---------------------------------------------------------------- psql callers' input


def refused(conn: psycopg.Connection, sql: str, params: tuple = (), field: str = "schedule.cron") -> str:
    """Run `sql`: it must fail with 22023 naming `field` and write nothing (Rule 10).
    Returns the message."""
    before = row_counts(conn)
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql, params)
    exc = info.value
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", field), (sql, params, str(exc))
    assert row_counts(conn) == before, (sql, params)
    return exc.diag.message_primary


def test_a_cron_slot_off_its_grid_or_in_the_past_is_refused_and_nothing_is_written(db_url):
    """Rules 7 and 10: the first (or next) slot a caller passes must be a slot of the
    expression in the task's zone, and not more than 5 s in the past."""
    conn = connect(db_url)
    daily = {"kind": "sleep", "schedule": {"cron": "0 9 * * *"}}
    message = refused(
        conn, "SELECT pgbeat.create_task(%s, now() + interval '7 minutes 13 seconds')", (Jsonb(daily),)
    )
    assert (
        message.startswith("schedule.cron: the first slot ")
        and 'is not a slot of "0 9 * * *" in UTC' in message
    )
    berlin = {"kind": "sleep", "schedule": {"cron": "0 9 * * *", "timezone": "Europe/Berlin"}}
    # 09:00 UTC is 10:00 in Berlin; a whole second late or a microsecond off is off the grid too.
    for slot in ("2999-01-01T09:00:00Z", "2999-01-01T08:00:01Z", "2999-01-01T08:00:00.000001Z"):
        assert "in Europe/Berlin" in refused(conn, "SELECT pgbeat.create_task(%s, %s)", (Jsonb(berlin), slot))
    assert create_task(conn, berlin, "2999-01-01T08:00:00Z")["next_run_at"].isoformat() == (
        "2999-01-01T08:00:00+00:00"
    )
    # The past: a slot the API computed a moment before its transaction began passes.
    every_second = {"kind": "sleep", "schedule": {"cron": "* * * * * *"}}
    message = refused(
        conn,
        "SELECT pgbeat.create_task(%s, date_trunc('second', now()) - interval '6 seconds')",
        (Jsonb(every_second),),
    )
    assert message.endswith("is in the past")
    conn.execute(
        "SELECT pgbeat.create_task(%s, date_trunc('second', now()) - interval '1 second')",
        (Jsonb(every_second),),
    )

    # A new schedule, raised limits and a resume check their slot the same way.
    t = create_task(conn, berlin, "2999-01-01T08:00:00Z")
    refused(
        conn,
        "SELECT pgbeat.update_task(%s, %s, %s)",
        (t["id"], Jsonb({"schedule": daily["schedule"]}), "2999-01-01T09:30:00Z"),
    )
    conn.execute("SELECT pgbeat.update_task(%s, '{\"max_runs\": 1}')", (t["id"],))
    # As if it had fired once: complete, until its limit is raised.
    conn.execute("UPDATE pgbeat.tasks SET fired = 1, next_run_at = NULL WHERE id = %s", (t["id"],))
    refused(conn, "SELECT pgbeat.update_task(%s, '{\"max_runs\": 2}', %s)", (t["id"], "2999-01-02T08:30:00Z"))
    raised = update(conn, t["id"], {"max_runs": 2}, "2999-01-02T08:00:00Z")
    assert raised["next_run_at"].isoformat() == "2999-01-02T08:00:00+00:00"
    conn.execute("SELECT pgbeat.pause_task(%s)", (t["id"],))
    conn.execute("UPDATE pgbeat.tasks SET next_run_at = now() - interval '1 day' WHERE id = %s", (t["id"],))
    for slot in ("2999-01-03T08:00:01Z", "2000-01-03T08:00:00Z", None):
        refused(conn, "SELECT pgbeat.resume_task(%s, %s)", (t["id"], slot))
    resumed = call(conn, "resume_task", t["id"], "2999-01-03T08:00:00Z")
    assert resumed["next_run_at"].isoformat() == "2999-01-03T08:00:00+00:00" and not resumed["paused"]


# Instants at which the clocks change, with the UTC offsets before and after.
BERLIN_SPRING = "2026-03-29T01:00:00Z"  # 02:00 CET -> 03:00 CEST
BERLIN_FALL = "2026-10-25T01:00:00Z"  # 03:00 CEST -> 02:00 CET
LORD_HOWE_SPRING = "2026-10-03T15:30:00Z"  # 02:00 +10:30 -> 02:30 +11:00
LORD_HOWE_FALL = "2026-04-04T15:00:00Z"  # 02:00 +11:00 -> 01:30 +10:30
SAO_PAULO_SPRING = "2018-11-04T03:00:00Z"  # 00:00 -03:00 -> 01:00 -02:00


@pytest.mark.parametrize(
    ("cron", "zone", "slot", "accepted"),
    [
        # Spring forward: a wall time the jump skips runs at the jump's instant.
        ("30 2 * * *", "Europe/Berlin", BERLIN_SPRING, True),
        ("0 3 * * *", "Europe/Berlin", BERLIN_SPRING, True),  # 03:00 CEST itself
        ("15 2 * * * 30", "Europe/Berlin", "2026-03-29T01:00:30Z", True),  # croniter keeps the seconds
        ("15 2 * * * 30", "Europe/Berlin", BERLIN_SPRING, False),
        ("15,45 2 * * * 5,30", "Europe/Berlin", "2026-03-29T01:00:05Z", True),  # the first second only
        ("15,45 2 * * * 5,30", "Europe/Berlin", "2026-03-29T01:00:30Z", False),
        ("*/10 2 * * * 30", "Australia/Lord_Howe", "2026-10-03T15:30:30Z", True),
        ("*/20 * * * *", "Europe/Berlin", BERLIN_SPRING, True),
        ("30 3 * * *", "Europe/Berlin", BERLIN_SPRING, False),  # 02:xx skipped, none is 03:30
        ("30 2 * * *", "Europe/Berlin", "2026-03-29T01:30:00Z", False),  # 03:30 CEST
        ("30 2 * * *", "Europe/Berlin", "2026-03-29T00:30:00Z", False),  # 01:30 CET
        ("15 2 * * *", "Australia/Lord_Howe", LORD_HOWE_SPRING, True),
        ("45 2 * * *", "Australia/Lord_Howe", LORD_HOWE_SPRING, False),  # 02:45 is not skipped
        ("45 2 * * *", "Australia/Lord_Howe", "2026-10-03T15:45:00Z", True),
        ("0 0 * * *", "America/Sao_Paulo", SAO_PAULO_SPRING, True),  # midnight skipped
        # Fall back: both occurrences of a repeated wall time are slots.
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T00:30:00Z", True),  # 02:30 CEST
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T01:30:00Z", True),  # 02:30 CET
        ("40 1 * * *", "Australia/Lord_Howe", "2026-04-04T14:40:00Z", True),  # 01:40 +11:00
        ("40 1 * * *", "Australia/Lord_Howe", "2026-04-04T15:10:00Z", True),  # 01:40 +10:30
        ("40 1 * * *", "Australia/Lord_Howe", LORD_HOWE_FALL, False),  # 01:30 +10:30
    ],
)
def test_cron_slots_across_dst_changes(db_url, cron, zone, slot, accepted):
    """README, "Cron across DST changes": what the API's croniter maths yields there is
    accepted; a wall time the fields do not name is not."""
    conn = connect(db_url)
    problem = conn.execute("SELECT pgbeat.cron_slot_problem(%s, %s, %s) AS p", (cron, zone, slot)).fetchone()[
        "p"
    ]
    assert (problem is None) == accepted, problem
    # What the API computes from 3 hours before (a fixed-hour job runs only in the first
    # of two repeated hours; SQL accepts both).
    moment = datetime.fromisoformat(slot)
    api_slots = schedules.cron_slots(cron, zone, moment - timedelta(hours=3), 200)
    repeat = slot in ("2026-10-25T01:30:00Z", "2026-04-04T15:10:00Z")
    assert (moment in api_slots) == (accepted and not repeat), api_slots


# ---------------------------------------------------------------- the API's slots, differentially

DIFF_SEED = 20261203
DIFF_EXPRESSIONS = 300
DIFF_SLOTS = 20
DIFF_ZONES = {  # each with instants its offset changes at (none for UTC and Kolkata)
    "UTC": [],
    "Asia/Kolkata": [],
    "Europe/Berlin": [BERLIN_SPRING, BERLIN_FALL, "2027-03-28T01:00:00Z"],
    "Australia/Lord_Howe": [LORD_HOWE_FALL, LORD_HOWE_SPRING],
    "America/Sao_Paulo": [SAO_PAULO_SPRING, "2019-02-17T02:00:00Z"],
}
SECONDS_FIELDS = ["0", "30", "*/15", "5,35", "10-40/10", "*/7", "*"]
ALIASES = ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"]


def repeated_wall_time(moment: datetime, zone: ZoneInfo) -> bool:
    """Whether moment's wall time occurs twice (a fall-back's repeated hour)."""
    wall = moment.astimezone(zone).replace(tzinfo=None)
    first, second = (wall.replace(tzinfo=zone, fold=f) for f in (0, 1))
    return first.utcoffset() != second.utcoffset()


def diff_cases() -> list[tuple[str, str, datetime]]:
    """(expression, zone, start): random expressions of test_cron_standard, a seconds
    field on some, the aliases; each in one zone, starting at a random time of
    2026-2027 or, in a zone with DST, up to three days before one of its changes."""
    rng = random.Random(DIFF_SEED)
    zones = list(DIFF_ZONES)
    cases = [
        (alias, zones[i % len(zones)], datetime(2026, 1, 1, tzinfo=UTC)) for i, alias in enumerate(ALIASES)
    ]
    while len(cases) < DIFF_EXPRESSIONS:
        expr = random_expression(rng)
        if rng.random() < 0.25:
            expr += " " + rng.choice(SECONDS_FIELDS)
        zone = zones[len(cases) % len(zones)]
        try:
            schedules.parse_cron(expr)
        except ValueError:
            continue  # the API refuses it ("never fires"): no slots to compare
        changes = DIFF_ZONES[zone]
        if changes and rng.random() < 0.6:
            start = datetime.fromisoformat(rng.choice(changes)) - timedelta(minutes=rng.randint(1, 3 * 1440))
        else:
            start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 2 * 365 * 86400))
        cases.append((expr, zone, start))
    return cases


@pytest.mark.slow  # ~10 s: croniter's 10,000 slots, then 18,000 instants checked in SQL
def test_the_slots_the_api_computes_are_accepted_and_their_neighbours_refused(db_url):
    """Differential (Rule 7): for each case, 20 consecutive slots of pgbeat.schedules
    (what the API passes) are accepted by cron_slot_problem, and each slot + 1 s and
    + 1 min is refused unless the API would yield that instant too (or it is the second
    occurrence of a repeated wall time, which SQL accepts for every job)."""
    checks: list[tuple[str, str, datetime, bool]] = []  # (expr, zone, instant, a slot?)
    for expr, zone, start in diff_cases():
        # Every slot up to the last one's + 1 min: slots are whole seconds apart, and
        # whole minutes without a seconds field.
        known = schedules.cron_slots(expr, zone, start, DIFF_SLOTS + (60 if len(expr.split()) == 6 else 1))
        slots = known[:DIFF_SLOTS]
        assert len(slots) == DIFF_SLOTS
        checks += [(expr, zone, slot, True) for slot in slots]
        for slot in slots:
            for step in (timedelta(seconds=1), timedelta(minutes=1)):
                moment = slot + step
                if moment in known or not repeated_wall_time(moment, ZoneInfo(zone)):
                    checks.append((expr, zone, moment, moment in known))
    conn = connect(db_url)
    started = time.perf_counter()
    problems = conn.execute(
        """SELECT pgbeat.cron_slot_problem(e, z, s) AS problem
             FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) WITH ORDINALITY AS c(e, z, s, i)
            ORDER BY i""",
        ([c[0] for c in checks], [c[1] for c in checks], [c[2] for c in checks]),
    ).fetchall()
    print(f"{len(checks)} instants checked in SQL in {time.perf_counter() - started:.2f} s")
    wrong = [
        f"{expr!r} in {zone} at {moment.isoformat()}: expected {'a slot' if is_slot else 'a refusal'},"
        f" got {row['problem']}"
        for (expr, zone, moment, is_slot), row in zip(checks, problems, strict=True)
        if (row["problem"] is None) != is_slot
    ]
    assert not wrong, f"{len(wrong)} of {len(checks)} differ:\n" + "\n".join(wrong[:20])
    refusals = sum(1 for *_, is_slot in checks if not is_slot)
    assert refusals > len(checks) // 3, refusals
    # And through the API's own call: every first slot after now is accepted, in one transaction.
    cases = diff_cases()
    with conn.transaction():  # one now(), however long croniter takes
        now = conn.execute("SELECT now() AS t").fetchone()["t"]
        specs = [Jsonb({"kind": "sleep", "schedule": {"cron": e, "timezone": z}}) for e, z, _ in cases]
        firsts = [schedules.next_cron_slot(e, z, now) for e, z, _ in cases]
        created = conn.execute(
            "SELECT id, next_run_at FROM pgbeat.api_create_tasks(%s, %s)", (specs, firsts)
        ).fetchall()
    assert [r["next_run_at"] for r in created] == firsts


# ---------------------------------------------------------------- spec forms


SPEC_FORMS = ["a quoted literal", "json", "jsonb", "text", "jsonb_build_object", "json_build_object"]


def written_as(form: str, doc: dict[str, Any]) -> str:
    """doc as SQL text, the way a psql user writes it in `form`."""
    if form.endswith("_build_object"):
        return (
            f"{form}("
            + ", ".join(
                f"'{k}', " + (written_as(form, v) if isinstance(v, dict) else f"'{v}'")
                for k, v in doc.items()
            )
            + ")"
        )
    cast = {"a quoted literal": "", "json": "::json", "jsonb": "::jsonb", "text": "::text"}[form]
    return f"'{json.dumps(doc)}'{cast}"


@pytest.mark.parametrize("form", SPEC_FORMS)
def test_psql_callers_write_a_spec_as_json_jsonb_or_a_quoted_literal(db_url, form):
    conn = connect(db_url)
    spec = written_as(form, {"kind": "sleep", "name": "made", "schedule": {"every": "1m"}})
    created = conn.execute(f"SELECT * FROM pgbeat.create_task({spec})").fetchone()
    assert (created["name"], created["every"]) == ("made", timedelta(minutes=1))
    changes = written_as(form, {"name": "changed", "schedule": {"every": "2m"}})
    changed = conn.execute(f"SELECT * FROM pgbeat.update_task(%s, {changes})", (created["id"],)).fetchone()
    assert (changed["name"], changed["every"]) == ("changed", timedelta(minutes=2))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("'every minute please'", "body: is not valid JSON"),
        ('\'{"kind": "sleep",}\'', "body: is not valid JSON"),
        ("42", "body: must be a JSON object"),
        ("'[1, 2]'::json", "body: must be a JSON object"),
        ("'\"sleep\"'::jsonb", "body: must be a JSON object"),
        ("NULL", "body: must be a JSON object"),
    ],
)
def test_psql_callers_get_a_named_refusal_for_a_body_that_is_not_a_json_object(db_url, value, problem):
    conn = connect(db_url)
    t = create_task(conn, {"kind": "sleep", "schedule": HOUR})
    for sql in (f"SELECT pgbeat.create_task({value})", f"SELECT pgbeat.update_task({t['id']}, {value})"):
        assert refused(conn, sql, field="body") == problem
