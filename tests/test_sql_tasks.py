"""Task operations in the database: create, update, pause, resume, trigger, delete."""

from __future__ import annotations

from datetime import datetime, timedelta

import psycopg
import pytest
from psycopg.types.json import Jsonb
from sqlsupport import claim, connect, create_task, finish, make_due, materialize, release, runs, task

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
    """trigger_task, pause_task, resume_task and delete_task take a bigint: 7, 7::bigint
    and '7' all work; an id past the column's range is an unknown task (P0002)."""
    with connect(db_url) as conn:
        tid = create_task(conn, {"kind": "sleep", "schedule": {"every": 3600}})["id"]
        run = conn.execute(f"SELECT * FROM pgbeat.trigger_task({tid}::bigint)").fetchone()
        assert run["task_id"] == tid and run["state"] == "pending"
        assert conn.execute(f"SELECT paused FROM pgbeat.pause_task('{tid}')").fetchone()["paused"] is True
        assert (
            conn.execute(f"SELECT paused FROM pgbeat.resume_task({tid}::int8)").fetchone()["paused"] is False
        )
        for fn in ("trigger_task", "pause_task", "resume_task", "delete_task"):
            with pytest.raises(psycopg.errors.NoDataFound, match="not found"):
                conn.execute(f"SELECT pgbeat.{fn}({2**40})")
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
