"""Every bad input to every stored function raises the documented error and
writes nothing:
  22023 invalid_parameter_value, message "field: problem", COLUMN = field
  P0002 no_data_found for an id that never existed
  55000 object_not_in_prerequisite_state for a change to a deleted task (readable, never changed)
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb as _Jsonb
from sqlsupport import connect, create_task, row_counts

HOUR = {"every": "1h"}
DELETED = "<deleted>"  # expect_error's field for 55000 "task N is deleted"
HUGE = "<1e400>"  # a JSON number no double precision can hold (Python would write inf)
FAR = "2999-01-01T00:00:00Z"


def Jsonb(value: Any) -> _Jsonb:
    return _Jsonb(value, dumps=lambda v: json.dumps(v).replace(json.dumps(HUGE), "1e400"))


def spec(**changes: Any) -> dict:
    return {"kind": "sleep", "schedule": HOUR, **changes}


def sched(**schedule: Any) -> dict:
    return {"kind": "sleep", "schedule": schedule}


# (spec, first cron slot, the field the error must name)
CREATE_CASES: list[tuple[Any, Any, str]] = [
    (None, None, "body"),
    ([], None, "body"),
    ("sleep", None, "body"),
    (spec(bogus=1), None, "bogus"),
    ({"schedule": HOUR}, None, "kind"),
    ({"kind": 5, "schedule": HOUR}, None, "kind"),
    ({"kind": "shell", "schedule": HOUR}, None, "kind"),
    ({"kind": "Sleep", "schedule": HOUR}, None, "kind"),
    (spec(params=[]), None, "params"),
    (spec(params="x"), None, "params"),
    (spec(params={"secs": 1}), None, "params.secs"),
    (spec(params={"seconds": "1"}), None, "params.seconds"),
    (spec(params={"seconds": -1}), None, "params.seconds"),
    (spec(params={"seconds": HUGE}), None, "params.seconds"),
    ({"kind": "counter", "params": {"counter": ""}, "schedule": HOUR}, None, "params.counter"),
    ({"kind": "counter", "params": {"counter": 5}, "schedule": HOUR}, None, "params.counter"),
    ({"kind": "counter", "params": {"step": 1.5}, "schedule": HOUR}, None, "params.step"),
    ({"kind": "counter", "params": {"step": "1"}, "schedule": HOUR}, None, "params.step"),
    ({"kind": "counter", "params": {"step": 1e10}, "schedule": HOUR}, None, "params.step"),
    ({"kind": "counter", "params": {"seconds": -1}, "schedule": HOUR}, None, "params.seconds"),
    ({"kind": "counter", "params": {"secs": 1}, "schedule": HOUR}, None, "params.secs"),
    ({"kind": "http", "params": {"url": "ftp://example.com"}, "schedule": HOUR}, None, "params.url"),
    ({"kind": "http", "params": {"url": "http://"}, "schedule": HOUR}, None, "params.url"),
    ({"kind": "http", "params": {"url": "http://a b"}, "schedule": HOUR}, None, "params.url"),
    ({"kind": "http", "params": {"url": 5}, "schedule": HOUR}, None, "params.url"),
    ({"kind": "http", "params": {"method": "FETCH"}, "schedule": HOUR}, None, "params.method"),
    ({"kind": "http", "params": {"method": 1}, "schedule": HOUR}, None, "params.method"),
    ({"kind": "http", "params": {"expect_status": 99}, "schedule": HOUR}, None, "params.expect_status"),
    ({"kind": "http", "params": {"expect_status": 200.5}, "schedule": HOUR}, None, "params.expect_status"),
    ({"kind": "sleep"}, None, "schedule"),
    (spec(schedule="30s"), None, "schedule"),
    (spec(schedule=None), None, "schedule"),
    (spec(schedule={}), None, "schedule"),
    (spec(schedule={"every": "1m", "in": "1m"}), None, "schedule"),
    (spec(schedule={"every": "1m", "bogus": 1}), None, "schedule.bogus"),
    (sched(every=0), None, "schedule.every"),
    (sched(every=-5), None, "schedule.every"),
    (sched(every="-5s"), None, "schedule.every"),
    (sched(every="0s"), None, "schedule.every"),
    (sched(every="abc"), None, "schedule.every"),
    (sched(every=""), None, "schedule.every"),
    (sched(every="1 month"), None, "schedule.every"),
    (sched(every="11 years"), None, "schedule.every"),
    (sched(every="999999999 hours"), None, "schedule.every"),
    (sched(every=1e300), None, "schedule.every"),
    (sched(every=HUGE), None, "schedule.every"),
    (sched(every=True), None, "schedule.every"),
    (sched(every=None), None, "schedule.every"),
    (sched(every="1m", start="yesterday"), None, "schedule.start"),
    (sched(every="1m", start=5), None, "schedule.start"),
    (sched(every="1m", timezone="UTC"), None, "schedule.timezone"),
    (sched(at="2000-01-01T00:00:00Z"), None, "schedule.at"),
    (sched(at="tomorrow"), None, "schedule.at"),
    (sched(at="2999-01-01T00:00:00"), None, "schedule.at"),  # no UTC offset
    (sched(at="2999-02-30T00:00:00Z"), None, "schedule.at"),
    (sched(at=5), None, "schedule.at"),
    (sched(at=None), None, "schedule.at"),
    (sched(**{"in": -1}), None, "schedule.in"),
    (sched(**{"in": "soon"}), None, "schedule.in"),
    (sched(**{"in": HUGE}), None, "schedule.in"),
    (sched(**{"in": "1h", "start": FAR}), None, "schedule.start"),
    (sched(cron="* * *"), FAR, "schedule.cron"),
    (sched(cron="* * * * * * *"), FAR, "schedule.cron"),
    (sched(cron="* * * * ;"), FAR, "schedule.cron"),
    (sched(cron=""), FAR, "schedule.cron"),
    (sched(cron=5), FAR, "schedule.cron"),
    (sched(cron="* * * * *"), None, "schedule.cron"),  # the caller must give the first slot
    (sched(cron="0 9 * * *"), "2999-01-01T09:07:13Z", "schedule.cron"),  # not a slot of it (Rule 7)
    (sched(cron="*/5 * * * *"), "2000-01-01T00:00:00Z", "schedule.cron"),  # in the past
    (sched(cron="* * * * *", timezone="Mars/Base"), FAR, "schedule.timezone"),
    (sched(cron="* * * * *", timezone="UTC+3"), FAR, "schedule.timezone"),
    (sched(cron="* * * * *", timezone="PST"), FAR, "schedule.timezone"),
    (sched(cron="* * * * *", timezone=""), FAR, "schedule.timezone"),
    (sched(cron="* * * * *", timezone=3), FAR, "schedule.timezone"),
    (sched(cron="* * * * *", start=FAR), FAR, "schedule.start"),
    (spec(name=""), None, "name"),
    (spec(name=5), None, "name"),
    (spec(name="x" * 201), None, "name"),
    (spec(timeout=0), None, "timeout"),
    (spec(timeout=86401), None, "timeout"),
    (spec(timeout="5"), None, "timeout"),
    (spec(timeout=HUGE), None, "timeout"),
    (spec(paused="yes"), None, "paused"),
    (spec(paused=None), None, "paused"),
    (spec(until="2000-01-01T00:00:00Z"), None, "until"),
    (spec(until="later"), None, "until"),
    (spec(until="2999-01-01T00:00:00Z", schedule={"at": "2999-06-01T00:00:00Z"}), None, "until"),
    (spec(max_runs=0), None, "max_runs"),
    (spec(max_runs=1.5), None, "max_runs"),
    (spec(max_runs="3"), None, "max_runs"),
    (spec(max_runs=HUGE), None, "max_runs"),
    (spec(max_runs=2**31), None, "max_runs"),
    (spec(overlap="drop"), None, "overlap"),
    (spec(overlap=None), None, "overlap"),
    (spec(misfire="later"), None, "misfire"),
    (spec(misfire_grace=-1), None, "misfire_grace"),
    (spec(max_retries=101), None, "max_retries"),
    (spec(max_retries=-1), None, "max_retries"),
    (spec(max_retries=1.5), None, "max_retries"),
    (spec(retry_backoff=-1), None, "retry_backoff"),
]


def expect_error(conn: psycopg.Connection, sql: str, params: tuple, field: str | None) -> None:
    """Run `sql`; it must fail with 22023 naming `field` (P0002 when field is None,
    55000 when it is DELETED) and leave every table, and the session's locks, as they were."""
    before = row_counts(conn)
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql, params)
    exc = info.value
    if field is None:
        assert exc.sqlstate == "P0002", (sql, params, exc.sqlstate, str(exc))
        assert "not found" in str(exc)
    elif field == DELETED:
        assert exc.sqlstate == "55000", (sql, params, exc.sqlstate, str(exc))
        assert "is deleted" in str(exc)
    else:
        assert exc.sqlstate == "22023", (sql, params, exc.sqlstate, str(exc))
        assert exc.diag.column_name == field, (sql, params, exc.diag.column_name, str(exc))
        assert exc.diag.message_primary.startswith(f"{field}: "), exc.diag.message_primary
        assert len(exc.diag.message_primary) > len(field) + 6
    assert row_counts(conn) == before, (sql, params)


@pytest.fixture
def conn(db_url):
    c = connect(db_url)
    # Some state the failing calls must leave alone.
    live = create_task(c, {"kind": "counter", "schedule": HOUR, "max_runs": 5})
    c.execute("UPDATE pgbeat.tasks SET fired = 3 WHERE id = %s", (live["id"],))
    c.execute("SELECT pgbeat.trigger_task(%s)", (live["id"],))
    gone = create_task(c, spec())
    c.execute("SELECT pgbeat.delete_task(%s)", (gone["id"],))
    cron = create_task(c, sched(cron="*/5 * * * *"), FAR)
    c.execute("SELECT pgbeat.pause_task(%s)", (cron["id"],))
    c.execute("UPDATE pgbeat.tasks SET next_run_at = now() - interval '1 h' WHERE id = %s", (cron["id"],))
    c.ids = {"live": live["id"], "gone": gone["id"], "cron": cron["id"]}
    yield c
    c.close()


def test_create_task_rejects_every_bad_input(conn):
    for body, first_slot, field in CREATE_CASES:
        expect_error(
            conn,
            "SELECT pgbeat.create_task(%s, %s)",
            (Jsonb(body) if body is not None else None, first_slot),
            field,
        )


def test_update_task_rejects_bad_input_and_unknown_ids(conn):
    live, gone = conn.ids["live"], conn.ids["gone"]
    sql = "SELECT pgbeat.update_task(%s, %s, %s)"
    for task_id in (10**6, None):
        expect_error(conn, sql, (task_id, Jsonb({"name": "x"}), None), None)
    expect_error(conn, sql, (gone, Jsonb({"name": "x"}), None), DELETED)
    cases = [
        (None, "body"),
        ([], "body"),
        ({"bogus": 1}, "bogus"),
        ({"kind": "http"}, "kind"),
        ({"params": {"seconds": "1"}}, "params.seconds"),  # a counter's params
        ({"params": {"url": "http://a"}}, "params.url"),
        ({"params": {"step": 0.5}}, "params.step"),
        ({"schedule": {"every": -1}}, "schedule.every"),
        ({"schedule": {"cron": "* * * * *"}}, "schedule.cron"),
        ({"max_runs": 2}, "max_runs"),  # it already fired 3 times
        ({"fired": 1}, "fired"),  # only a reset to 0
        ({"fired": None}, "fired"),
        ({"name": ""}, "name"),
        ({"paused": 1}, "paused"),
        ({"until": "2000-01-01T00:00:00Z"}, "until"),
    ]
    # Every create-time check of an option applies to update too.
    cases += [
        ({k: v for k, v in body.items() if k not in ("kind", "schedule")}, field)
        for body, _, field in CREATE_CASES
        if field in {"timeout", "overlap", "max_retries", "misfire", "retry_backoff"}
    ]
    for changes, field in cases:
        expect_error(conn, sql, (live, Jsonb(changes) if changes is not None else None, None), field)
    # Resuming a cron task whose slot passed needs the next slot from croniter.
    expect_error(conn, "SELECT pgbeat.resume_task(%s)", (conn.ids["cron"],), "schedule.cron")


def test_task_operations_on_unknown_ids_are_not_found_and_on_deleted_ones_refused(conn):
    for fn in ("pause_task", "resume_task", "delete_task", "trigger_task"):
        for task_id in (10**6, None, -1):
            expect_error(conn, f"SELECT pgbeat.{fn}(%s)", (task_id,), None)
        expect_error(conn, f"SELECT pgbeat.{fn}(%s)", (conn.ids["gone"],), DELETED)


def test_scheduler_functions_reject_bad_input(conn):
    for limit in (0, -1, None):
        expect_error(conn, "SELECT * FROM pgbeat.materialize_due_runs(%s)", (limit,), "limit")
        expect_error(conn, "SELECT * FROM pgbeat.due_cron_tasks(%s)", (limit,), "limit")
    cron = conn.ids["cron"]
    # Due since the fixture put its slot an hour back; unpaused by hand (a resume would
    # move it to its next slot after now).
    conn.execute("UPDATE pgbeat.tasks SET paused = false WHERE id = %s", (cron,))
    slot = conn.execute("SELECT next_run_at FROM pgbeat.tasks WHERE id = %s", (cron,)).fetchone()[
        "next_run_at"
    ]
    good = {"task_id": cron, "slot": slot.isoformat(), "latest": slot.isoformat(), "next": FAR, "missed": 0}
    cases = [
        (None, "slots"),
        ({"task_id": cron}, "slots"),
        ([5], "slots[0]"),
        ([good, {**good, "bogus": 1}], "slots[1].bogus"),
        ([{**good, "task_id": "x"}], "slots[0].task_id"),
        ([{**good, "task_id": None}], "slots[0].task_id"),
        ([{**good, "slot": "when"}], "slots[0].slot"),
        ([{**good, "slot": None}], "slots[0].slot"),
        ([{**good, "latest": None}], "slots[0].latest"),
        ([{**good, "latest": FAR}], "slots[0].latest"),  # in the future
        ([{**good, "latest": "1999-01-01T00:00:00Z"}], "slots[0].latest"),  # before the slot
        ([{**good, "next": good["latest"]}], "slots[0].next"),
        ([{**good, "missed": -1}], "slots[0].missed"),
        ([{**good, "missed": 0.5}], "slots[0].missed"),
    ]
    for slots, field in cases:
        expect_error(
            conn,
            "SELECT * FROM pgbeat.fire_cron_slots(%s)",
            (Jsonb(slots) if slots is not None else None,),
            field,
        )
    # The good slot still fires (nothing above touched it).
    (fired,) = conn.execute("SELECT * FROM pgbeat.fire_cron_slots(%s)", (Jsonb([good]),)).fetchall()
    assert fired["outcome"] == "queued"


def test_worker_functions_reject_bad_input(conn):
    for limit in (0, -3, None):
        expect_error(conn, "SELECT * FROM pgbeat.claim_runs(NULL, %s)", (limit,), "limit")
    (c,) = conn.execute("SELECT * FROM pgbeat.claim_runs(NULL, 1)").fetchall()
    rid = c["run_id"]
    sql = "SELECT * FROM pgbeat.finish_runs(%s, %s, %s, %s)"
    ok = Jsonb({})
    cases = [
        (([rid], ["succeeded", "failed"], [ok], [None]), "runs"),
        (([rid], ["succeeded"], [], [None]), "runs"),
        (([rid], ["succeeded"], [ok], None), "runs"),
        (([rid], ["done"], [ok], [None]), "state"),
        (([rid], ["running"], [ok], [None]), "state"),
        (([rid], ["pending"], [ok], [None]), "state"),
        (([rid], [None], [ok], [None]), "state"),
        (([rid], ["succeeded"], [Jsonb([1])], [None]), "result"),
        (([rid], ["succeeded"], [Jsonb("x")], [None]), "result"),
        (([rid, rid], ["succeeded", "bad"], [ok, ok], [None, None]), "state"),  # all or nothing
    ]
    for params, field in cases:
        expect_error(conn, sql, params, field)
    expect_error(conn, "SELECT * FROM pgbeat.finish_run(%s, 'finished')", (rid,), "state")
    # The run is still this session's, and still finishes.
    assert conn.execute("SELECT * FROM pgbeat.finish_run(%s, 'succeeded')", (rid,)).fetchone()["applied"]


def test_registry_and_retention_functions_reject_bad_input(conn):
    for role in ("boss", None, ""):
        expect_error(conn, "SELECT pgbeat.register_daemon(%s, 'h', 1)", (role,), "role")
    for daemon_id in (10**6, None):
        expect_error(conn, "SELECT pgbeat.heartbeat_daemon(%s)", (daemon_id,), None)
        expect_error(conn, "SELECT pgbeat.stop_daemon(%s)", (daemon_id,), None)
    for retention in ("-1 day", None):
        expect_error(conn, "SELECT pgbeat.prune_history(%s::interval, 10)", (retention,), "retention")
    for batch in (0, -1, None):
        expect_error(conn, "SELECT pgbeat.prune_history(interval '1 day', %s)", (batch,), "batch")


async def test_asyncpg_callers_see_the_field_and_the_sqlstate(db_url):
    """The API's driver: the field is in exc.column_name, the SQLSTATE in exc.sqlstate."""
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        with pytest.raises(asyncpg.InvalidParameterValueError) as info:
            await conn.fetchrow(
                "SELECT * FROM pgbeat.create_task($1::jsonb)", json.dumps(sched(every="1 month"))
            )
        assert info.value.sqlstate == "22023" and info.value.column_name == "schedule.every"
        assert info.value.args[0].startswith("schedule.every: ")
        with pytest.raises(asyncpg.NoDataFoundError):
            await conn.fetchrow("SELECT * FROM pgbeat.pause_task($1)", 12345)
        assert await conn.fetchval("SELECT count(*) FROM pgbeat.tasks") == 0
    finally:
        await conn.close()
