"""The scheduler's rules in the database: one run per slot, bounded backlog,
fixed-rate grid, misfire and overlap policies, limits, cron slots."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta

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
    race,
    release,
    runs,
    task,
    wait_for,
)

HOUR = {"every": "1h"}


def run_a_slot(conn: psycopg.Connection, task_id: int, ago: float) -> datetime:
    """Make a slot of the task due `ago` seconds ago and run it to the end (materialise,
    claim, finish, release); returns the slot."""
    slot = make_due(conn, task_id, ago)
    materialize(conn)
    (run,) = claim(conn)
    finish(conn, run["run_id"])
    release(conn, [task_id])
    return slot


def test_sessions_racing_to_materialise_one_slot_make_exactly_one_run(db_url):
    setup = connect(db_url)
    ids = [create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"] for _ in range(20)]
    slots = {i: make_due(setup, i, 1.0) for i in ids}
    conns = [connect(db_url) for _ in range(4)]
    try:
        for rnd in range(3):
            results = race(4, lambda i: materialize(conns[i]))
            fired = [row for result in results for row in result]
            # Every due task fired once, by exactly one of the schedulers.
            assert sorted(r["task_id"] for r in fired) == sorted(ids)
            assert {r["outcome"] for r in fired} == {"queued" if rnd == 0 else "coalesced"}
            for i in ids:
                (run,) = runs(setup, i)
                assert run["scheduled_for"] == slots[i] and run["state"] == "pending"
                assert task(setup, i)["next_run_at"] == slots[i] + timedelta(hours=1)
            # Next round: the same slots again must not make a second run.
            for i in ids:
                setup.execute(
                    "UPDATE pgbeat.tasks SET next_run_at = %s, fired = 0 WHERE id = %s", (slots[i], i)
                )
        # The re-fired slots were folded into the pending run (coalesced), never a second run.
        assert setup.execute("SELECT count(*) AS n FROM pgbeat.runs").fetchone()["n"] == len(ids)
        assert setup.execute("SELECT sum(coalesced) AS n FROM pgbeat.runs").fetchone()["n"] == 2 * len(ids)
    finally:
        for c in conns:
            c.close()


def test_racing_schedulers_on_a_duplicate_slot_insert_nothing(db_url):
    """The unique (task, slot, attempt) constraint backs the row lock up: a slot
    that already has a finished run is reported as a duplicate, never run twice."""
    setup = connect(db_url)
    tid = create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"]
    slot = run_a_slot(setup, tid, 1.0)
    setup.execute("UPDATE pgbeat.tasks SET next_run_at = %s WHERE id = %s", (slot, tid))
    conns = [connect(db_url) for _ in range(3)]
    results = race(3, lambda i: materialize(conns[i]))
    outcomes = [r["outcome"] for result in results for r in result]
    assert outcomes == ["duplicate"]
    assert len(runs(setup, tid)) == 1


def test_fired_saturates_at_its_cap_and_the_task_keeps_firing(db_url):
    """Rule 18: `fired` stops at 2^31 - 1 instead of overflowing, whether the slot is
    fired by the pass's fast path (no pending run) or by fire_slot (one pending): the
    task is not set aside, and each slot is decided as usual."""
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    conn.execute("UPDATE pgbeat.tasks SET fired = 2147483646 WHERE id = %s", [tid])
    outcomes = []
    for ago in (10, 9, 8):
        make_due(conn, tid, ago)
        outcomes += [r["outcome"] for r in materialize(conn)]
    assert outcomes == ["queued", "coalesced", "coalesced"]
    row = conn.execute("SELECT fired, error, paused FROM pgbeat.tasks WHERE id = %s", [tid]).fetchone()
    assert row == {"fired": 2147483647, "error": None, "paused": False}


def test_queue_policy_keeps_one_pending_run_and_counts_coalesced_slots(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    first = make_due(conn, tid, 10)
    assert [r["outcome"] for r in materialize(conn)] == ["queued"]
    for ago in (9, 8, 7):
        make_due(conn, tid, ago)
        assert [r["outcome"] for r in materialize(conn)] == ["coalesced"]
    (pending,) = runs(conn, tid)
    assert pending["state"] == "pending" and pending["coalesced"] == 3 and pending["scheduled_for"] == first

    # While it runs, the next slot queues one new pending run; later slots coalesce into that.
    (claimed,) = claim(conn)
    make_due(conn, tid, 6)
    assert [r["outcome"] for r in materialize(conn)] == ["queued"]
    make_due(conn, tid, 5)
    assert [r["outcome"] for r in materialize(conn)] == ["coalesced"]
    states = [(r["state"], r["coalesced"]) for r in runs(conn, tid)]
    assert states == [("running", 3), ("pending", 1)]
    # The pending run waits for the running one: the task lock is held.
    other = connect(db_url)
    assert claim(other) == []
    finish(conn, claimed["run_id"])
    release(conn, [tid])
    assert [r["task_id"] for r in claim(other)] == [tid]
    assert conn.execute(
        "SELECT coalesced_slots, runs FROM pgbeat.task_stats WHERE task_id = %s", (tid,)
    ).fetchone() == {"coalesced_slots": 4, "runs": 2}


def test_skip_policy_records_a_skipped_run_for_each_overlapping_slot(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR, "overlap": "skip"})["id"]
    make_due(conn, tid, 10)
    assert [r["outcome"] for r in materialize(conn)] == ["queued"]
    make_due(conn, tid, 9)
    assert [r["outcome"] for r in materialize(conn)] == ["skipped"]  # the first is still pending
    (claimed,) = claim(conn)
    make_due(conn, tid, 8)
    assert [r["outcome"] for r in materialize(conn)] == ["skipped"]  # the first is running
    finish(conn, claimed["run_id"])
    release(conn, [tid])
    make_due(conn, tid, 7)
    assert [r["outcome"] for r in materialize(conn)] == ["queued"]
    got = [(r["state"], r["error"]) for r in runs(conn, tid)]
    assert got == [
        ("succeeded", None),
        ("skipped", "overlap: the previous run was still pending"),
        ("skipped", "overlap: the previous run was still running"),
        ("pending", None),
    ]
    # Skipped runs are finished history rows, visible in run_history.
    assert (
        conn.execute(
            "SELECT count(*) AS n FROM pgbeat.run_history WHERE task_id = %s AND state = 'skipped'", (tid,)
        ).fetchone()["n"]
        == 2
    )


def test_skip_policy_decides_at_the_slot_not_when_the_scheduler_gets_to_it(db_url):
    """Rule 8 at the slot's time: a scheduler that reaches a skip-policy slot late, when
    the run that was executing as it fell due has already finished, still skips it; a
    slot that fell due after that run ended is queued."""
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR, "overlap": "skip"})["id"]
    trigger = conn.execute("SELECT id FROM pgbeat.trigger_task(%s)", (tid,)).fetchone()["id"]
    (c,) = claim(conn)
    finish(conn, c["run_id"])
    release(conn, [tid])
    conn.execute(
        """UPDATE pgbeat.runs SET started_at = now() - interval '5 s', finished_at = now() - interval '1 s'
            WHERE id = %s""",
        (trigger,),
    )
    make_due(conn, tid, 3)  # fell due 3 s ago, while the run executed (from -5 s to -1 s)
    assert [r["outcome"] for r in materialize(conn)] == ["skipped"]
    make_due(conn, tid, 0.5)  # fell due after it ended
    assert [r["outcome"] for r in materialize(conn)] == ["queued"]
    got = [(r["state"], r["error"]) for r in runs(conn, tid)]
    assert got == [
        ("succeeded", None),
        ("skipped", "overlap: the previous run was still running"),
        ("pending", None),
    ]


# (seconds the pass runs after the slot it decides, negative: ahead of it; slots
# missed before it; the pass's look-ahead). The interval is 10 s.
GRID_CASES = {
    "a microsecond after its slot": (0.000001, 0, 0.0),
    "mid-interval": (3.7, 0, 0.0),
    "a microsecond before the next slot": (9.999999, 0, 0.0),
    "two slots missed": (4.2, 2, 0.0),
    "ahead of its slot": (-0.01, 0, 0.02),
}


@pytest.mark.parametrize("late, missed, ahead", GRID_CASES.values(), ids=GRID_CASES.keys())
def test_interval_slots_stay_on_the_grid_when_materialised_late(db_url, late, missed, ahead):
    """Rule 7 at a controlled clock: a transaction's now() is fixed at its start, so the
    pass runs exactly `late` seconds after slot k of a grid laid out from that now().
    The run takes slot k itself, and the task's next slot is k + 1, on the grid, however
    late (or early) the pass ran."""
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": {"every": "10s"}})["id"]
    every, k = timedelta(seconds=10), 5
    with conn.transaction():
        anchor = conn.execute(
            """UPDATE pgbeat.tasks SET anchor = now() - every * %s - make_interval(secs => %s),
                      next_run_at = now() - every * %s - make_interval(secs => %s)
                WHERE id = %s RETURNING anchor""",
            (k, late, missed, late, tid),
        ).fetchone()["anchor"]
        (fired,) = materialize(conn, ahead=ahead)
        now = conn.execute("SELECT now() AS t").fetchone()["t"]
    slot = anchor + k * every
    assert slot == now - timedelta(seconds=late)  # the clock was where the case says
    assert (fired["outcome"], fired["scheduled_for"], fired["missed"]) == ("queued", slot, missed)
    (run,) = runs(conn, tid)
    assert (run["scheduled_for"], run["due_at"], run["coalesced"]) == (slot, slot, missed)
    assert task(conn, tid)["next_run_at"] == slot + every


def test_misfire_run_once_folds_missed_slots_into_one_run_and_keeps_the_grid(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": {"every": "60s"}})["id"]
    # The scheduler was down: the grid's slot 0 was 630 s ago, so slots 0..10 are due.
    anchor = conn.execute(
        """UPDATE pgbeat.tasks SET anchor = now() - interval '630 s', next_run_at = now() - interval '630 s'
            WHERE id = %s RETURNING anchor""",
        (tid,),
    ).fetchone()["anchor"]
    (fired,) = materialize(conn)
    assert fired["outcome"] == "queued" and fired["missed"] == 10
    (run,) = runs(conn, tid)
    assert run["scheduled_for"] == anchor + timedelta(seconds=600) and run["coalesced"] == 10
    assert task(conn, tid)["next_run_at"] == anchor + timedelta(seconds=660)
    assert materialize(conn) == []  # nothing more is due


@pytest.mark.parametrize("grace, expect", [(60, "late_slot_runs"), (10, "all_skipped")])
def test_misfire_skip_records_missed_slots_and_honours_the_grace(db_url, grace, expect):
    conn = connect(db_url)
    tid = create_task(
        conn, {"kind": "sleep", "schedule": {"every": "60s"}, "misfire": "skip", "misfire_grace": grace}
    )["id"]
    anchor = conn.execute(
        """UPDATE pgbeat.tasks SET anchor = now() - interval '630 s', next_run_at = now() - interval '630 s'
            WHERE id = %s RETURNING anchor""",
        (tid,),
    ).fetchone()["anchor"]
    latest = anchor + timedelta(seconds=600)  # 30 s late
    (fired,) = materialize(conn)
    got = [(r["state"], r["scheduled_for"], r["coalesced"]) for r in runs(conn, tid)]
    if expect == "late_slot_runs":
        # 10 missed slots as one skipped run (the first, plus 9 folded), the latest runs.
        assert got == [("skipped", anchor, 9), ("pending", latest, 0)]
        assert fired["outcome"] == "queued"
    else:
        # The latest slot is later than the grace too: all 11 recorded as skipped.
        assert got == [("skipped", latest, 10)]
        assert fired["outcome"] == "misfire_skipped"
    assert task(conn, tid)["next_run_at"] == anchor + timedelta(seconds=660)


def test_max_runs_completes_the_task(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR, "max_runs": 2})["id"]
    make_due(conn, tid, 5)
    materialize(conn)
    assert task(conn, tid)["next_run_at"] is not None
    make_due(conn, tid, 4)
    materialize(conn)
    t = task(conn, tid)
    assert t["next_run_at"] is None and t["fired"] == 2
    assert materialize(conn) == []
    status = conn.execute("SELECT status FROM pgbeat.task_status WHERE id = %s", (tid,)).fetchone()
    assert status["status"] == "active"  # its last run is still pending
    (c,) = claim(conn)
    finish(conn, c["run_id"])
    release(conn, [tid])
    status = conn.execute("SELECT status FROM pgbeat.task_status WHERE id = %s", (tid,)).fetchone()
    assert status["status"] == "complete"


def test_until_completes_the_task_and_no_slot_after_it_runs(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": {"every": "60s"}, "until": "2999-01-01T00:00:00Z"})[
        "id"
    ]
    # The scheduler was down across `until`: slots 0..10 are due, only 0..4 are before until.
    anchor = conn.execute(
        """UPDATE pgbeat.tasks SET anchor = now() - interval '630 s', next_run_at = now() - interval '630 s',
                  until = now() - interval '350 s' WHERE id = %s RETURNING anchor""",
        (tid,),
    ).fetchone()["anchor"]
    materialize(conn)
    (run,) = runs(conn, tid)
    assert run["scheduled_for"] == anchor + timedelta(seconds=240)  # the last slot before until
    assert run["coalesced"] == 4
    assert task(conn, tid)["next_run_at"] is None

    # In the normal case the slot after until is never set.
    t2 = create_task(conn, {"kind": "sleep", "schedule": {"every": "60s"}, "until": "2999-01-01T00:00:00Z"})
    conn.execute("UPDATE pgbeat.tasks SET until = next_run_at + interval '30 s' WHERE id = %s", (t2["id"],))
    conn.execute(
        "UPDATE pgbeat.tasks SET next_run_at = next_run_at - interval '60 s',"
        " anchor = anchor - interval '60 s', until = until - interval '60 s' WHERE id = %s",
        (t2["id"],),
    )
    (fired,) = materialize(conn)
    assert fired["outcome"] == "queued" and task(conn, t2["id"])["next_run_at"] is None

    # A due slot already past until (the limit was moved under it): nothing runs, the task ends.
    t3 = create_task(conn, {"kind": "sleep", "schedule": {"every": "60s"}, "until": "2999-01-01T00:00:00Z"})
    conn.execute(
        "UPDATE pgbeat.tasks SET anchor = now() - interval '90 s', next_run_at = now() - interval '90 s',"
        " until = now() - interval '100 s' WHERE id = %s",
        (t3["id"],),
    )
    (fired,) = materialize(conn)
    assert (fired["task_id"], fired["run_id"], fired["outcome"]) == (t3["id"], None, "expired")
    assert runs(conn, t3["id"]) == [] and task(conn, t3["id"])["next_run_at"] is None


def test_one_call_mixes_plain_slots_and_special_cases(db_url):
    """materialize_due_runs fires plain slots set-based and the rest through
    fire_slot: in one call, each task gets the outcome, run and next slot the
    rules give it, and the scheduler's own advancing wakes no scheduler."""
    conn = connect(db_url)
    # A slot that already has a finished run: a duplicate, never a second run.
    dup = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    dup_slot = run_a_slot(conn, dup, 20)
    # A skip-policy task whose run is still running.
    busy = create_task(conn, {"kind": "sleep", "schedule": HOUR, "overlap": "skip"})["id"]
    make_due(conn, busy, 19)
    materialize(conn)
    claim(conn)
    # A queue-policy task whose run is running: plain, its next run queues behind it.
    queued_behind = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    make_due(conn, queued_behind, 17)
    materialize(conn)
    claim(conn)
    # A queue-policy task with a pending run.
    pend = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    make_due(conn, pend, 18)
    materialize(conn)
    # Plain ones: interval (one with max_runs, one with a far until, one skip-misfire
    # within its grace), one-shot.
    plain = [create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"] for _ in range(3)]
    last = create_task(conn, {"kind": "sleep", "schedule": HOUR, "max_runs": 1})["id"]
    far = create_task(conn, {"kind": "sleep", "schedule": HOUR, "until": "2999-01-01T00:00:00Z"})["id"]
    graced = create_task(conn, {"kind": "sleep", "schedule": HOUR, "misfire": "skip", "misfire_grace": 60})[
        "id"
    ]
    once = create_task(conn, {"kind": "sleep", "schedule": {"in": 3600}})["id"]
    # A task whose scheduler was down: 10 missed slots folded into one run.
    late = create_task(conn, {"kind": "sleep", "schedule": {"every": "60s"}})["id"]

    conn.execute("UPDATE pgbeat.tasks SET next_run_at = %s WHERE id = %s", (dup_slot, dup))
    slots = {i: make_due(conn, i, 5) for i in [*plain, last, far, graced, queued_behind]}
    slots[busy] = make_due(conn, busy, 9)
    make_due(conn, pend, 8)
    slots[once] = conn.execute(
        "UPDATE pgbeat.tasks SET run_at = now() - interval '1 s', next_run_at = now() - interval '1 s'"
        " WHERE id = %s RETURNING run_at",
        (once,),
    ).fetchone()["run_at"]
    late_anchor = conn.execute(
        """UPDATE pgbeat.tasks SET anchor = now() - interval '630 s', next_run_at = now() - interval '630 s'
            WHERE id = %s RETURNING anchor""",
        (late,),
    ).fetchone()["anchor"]
    before = {t["id"]: t for t in conn.execute("SELECT * FROM pgbeat.tasks").fetchall()}

    listener = connect(db_url)
    listener.execute("LISTEN pgbeat_scheduler")
    fired = {r["task_id"]: r for r in materialize(conn)}
    assert list(listener.notifies(timeout=0.3)) == []
    listener.close()

    outcomes = {i: (r["outcome"], r["missed"]) for i, r in fired.items()}
    assert outcomes == {
        **{i: ("queued", 0) for i in [*plain, last, far, graced, queued_behind, once]},
        dup: ("duplicate", 0),
        busy: ("skipped", 0),
        pend: ("coalesced", 0),
        late: ("queued", 10),
    }
    assert fired[dup]["run_id"] is None and len(runs(conn, dup)) == 1
    assert [(r["state"], r["coalesced"]) for r in runs(conn, pend)] == [("pending", 1)]
    assert runs(conn, busy)[-1]["state"] == "skipped"
    for i in [*plain, last, far, graced, queued_behind, once]:
        run = runs(conn, i)[-1]
        assert (run["id"], run["state"], run["scheduled_for"], run["coalesced"]) == (
            fired[i]["run_id"],
            "pending",
            slots[i],
            0,
        )
        assert fired[i]["scheduled_for"] == slots[i]
    (late_run,) = runs(conn, late)
    assert late_run["scheduled_for"] == late_anchor + timedelta(seconds=600) and late_run["coalesced"] == 10
    after = {t["id"]: t for t in conn.execute("SELECT * FROM pgbeat.tasks").fetchall()}
    for i in fired:
        assert after[i]["fired"] == before[i]["fired"] + 1
    hour = timedelta(hours=1)
    for i in [*plain, far, graced, queued_behind, busy]:
        assert after[i]["next_run_at"] == slots[i] + hour
    assert after[last]["next_run_at"] is None and after[once]["next_run_at"] is None
    assert after[late]["next_run_at"] == late_anchor + timedelta(seconds=660)
    assert materialize(conn) == []


def test_one_shot_runs_once_and_completes(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": {"in": 3600}})["id"]
    at = conn.execute(
        "UPDATE pgbeat.tasks SET run_at = now() - interval '1 s', next_run_at = now() - interval '1 s'"
        " WHERE id = %s RETURNING run_at",
        (tid,),
    ).fetchone()["run_at"]
    assert [r["outcome"] for r in materialize(conn)] == ["queued"]
    assert [r["scheduled_for"] for r in runs(conn, tid)] == [at]
    assert task(conn, tid)["next_run_at"] is None
    assert materialize(conn) == []


def test_fire_cron_slots_fires_once_and_ignores_a_stale_slot(db_url):
    conn = connect(db_url)
    t = create_task(
        conn,
        {"kind": "sleep", "schedule": {"cron": "*/5 * * * *", "timezone": "Europe/Paris"}},
        first_slot="2999-01-01T00:00:00Z",
    )
    seen = conn.execute(
        "UPDATE pgbeat.tasks SET next_run_at = date_trunc('minute', now()) - interval '10 min'"
        " WHERE id = %s RETURNING next_run_at",
        (t["id"],),
    ).fetchone()["next_run_at"]
    (due,) = conn.execute("SELECT * FROM pgbeat.due_cron_tasks()").fetchall()
    assert due["task_id"] == t["id"] and due["timezone"] == "Europe/Paris"
    slot = {
        "task_id": t["id"],
        "slot": seen.isoformat(),
        "latest": (seen + timedelta(minutes=5)).isoformat(),
        "next": (seen + timedelta(minutes=15)).isoformat(),
        "missed": 1,
    }
    conns = [connect(db_url) for _ in range(3)]
    results = race(
        3, lambda i: conns[i].execute("SELECT * FROM pgbeat.fire_cron_slots(%s)", (Jsonb([slot]),)).fetchall()
    )
    fired = [r for result in results for r in result]
    assert len(fired) == 1 and fired[0]["outcome"] == "queued" and fired[0]["missed"] == 1
    (run,) = runs(conn, t["id"])
    assert run["scheduled_for"] == seen + timedelta(minutes=5) and run["coalesced"] == 1
    assert task(conn, t["id"])["next_run_at"] == seen + timedelta(minutes=15)
    # The same (now stale) slot again does nothing.
    assert conn.execute("SELECT * FROM pgbeat.fire_cron_slots(%s)", (Jsonb([slot]),)).fetchall() == []
    assert conn.execute("SELECT * FROM pgbeat.due_cron_tasks()").fetchall() == []


def test_paused_and_deleted_tasks_never_fire_and_next_due_at_ignores_them(db_url):
    conn = connect(db_url)
    paused = create_task(conn, {"kind": "sleep", "schedule": HOUR, "paused": True})["id"]
    deleted = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    make_due(conn, paused, 5)
    make_due(conn, deleted, 5)
    conn.execute("SELECT pgbeat.delete_task(%s)", (deleted,))
    assert materialize(conn) == []
    # The scheduler wakes for the earliest slot of an active task only.
    a = create_task(conn, {"kind": "sleep", "schedule": {"every": "10m"}})
    b = create_task(conn, {"kind": "sleep", "schedule": {"every": "5m"}})
    assert conn.execute("SELECT pgbeat.next_due_at() AS t").fetchone()["t"] == b["next_run_at"]
    conn.execute("SELECT pgbeat.delete_task(%s)", (b["id"],))
    assert conn.execute("SELECT pgbeat.next_due_at() AS t").fetchone()["t"] == a["next_run_at"]
    with pytest.raises(psycopg.errors.CheckViolation):
        # a deleted task cannot be given a slot again: the row says so
        conn.execute("UPDATE pgbeat.tasks SET next_run_at = now() WHERE id = %s", (deleted,))


def make_due_in(conn: psycopg.Connection, task_id: int, seconds: float) -> datetime:
    """Put the task's next slot `seconds` from now, on a fresh grid; returns the slot."""
    return make_due(conn, task_id, -seconds)


def test_a_plain_slot_is_materialised_ahead_and_claimable_only_at_its_slot(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    slot = make_due_in(conn, tid, 0.4)
    assert materialize(conn, ahead=0.1) == []  # beyond the horizon: nothing yet
    (fired,) = materialize(conn, ahead=0.5)
    assert fired["outcome"] == "queued" and fired["scheduled_for"] == slot
    (run,) = runs(conn, tid)
    assert run["state"] == "pending" and run["due_at"] == slot
    assert task(conn, tid)["next_run_at"] == slot + timedelta(hours=1)  # the grid moved on
    assert claim(conn) == []  # not before its slot
    wait_for(
        "the slot to fall due",
        lambda: conn.execute("SELECT clock_timestamp() > %s AS due", (slot,)).fetchone()["due"],
        every=0.01,
    )
    (claimed,) = claim(conn)
    assert claimed["run_id"] == run["id"] and claimed["started_at"] >= slot


def test_only_plain_slots_are_decided_ahead(db_url):
    """A skip-policy task whose run is still in progress, a slot with missed slots
    before it, and a slot past `until` are decided by fire_slot once due, not ahead."""
    conn = connect(db_url)
    skip = create_task(conn, {"kind": "sleep", "schedule": HOUR, "overlap": "skip"})["id"]
    make_due(conn, skip, 1)
    materialize(conn)
    claim(conn)  # skip's run is running now
    make_due_in(conn, skip, 0.3)
    missed = create_task(conn, {"kind": "sleep", "schedule": {"every": "1s"}})["id"]
    conn.execute(
        """UPDATE pgbeat.tasks SET anchor = now() - interval '3.7 s', next_run_at = now() - interval '2.7 s'
            WHERE id = %s""",
        (missed,),
    )
    # missed: slots at -2.7 s, -1.7 s and -0.7 s are due; the one at +0.3 s is not decided ahead.
    fired = materialize(conn, ahead=0.5)
    assert [(r["task_id"], r["outcome"], r["missed"]) for r in fired] == [(missed, "queued", 2)]
    assert [r["state"] for r in runs(conn, skip)] == ["running"]  # no skipped row ahead of the slot
    assert task(conn, missed)["next_run_at"] > conn.execute("SELECT now() AS t").fetchone()["t"]


def test_materialise_ahead_is_bounded(db_url):
    conn = connect(db_url)
    for ahead in (-0.001, 1.5):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="ahead"):
            materialize(conn, ahead=ahead)


@pytest.mark.slow  # rounds of a three-session race over 1,000 tasks
def test_a_pending_run_committed_during_a_pass_takes_the_slot_and_loses_none(db_url):
    """A scheduler's pass reads the runs as they were when its statement began, then
    locks each task. A run queued for a task in between (here by trigger, which takes
    the task's lock and commits before the pass reaches that task) collides with the
    pass's insert on the one-pending-run rule. The slot must then be folded into that
    run (fire_slot, which reads afresh), never dropped while the task moves on."""
    setup = connect(db_url)
    ids = [create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"] for _ in range(1000)]
    pass_conn, trigger_conns = connect(db_url), [connect(db_url) for _ in range(2)]
    done = threading.Event()
    folded = 0

    def trigger_until_done(conn: psycopg.Connection, seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            conn.execute("SELECT pgbeat.trigger_task(%s)", (rng.choice(ids),))

    try:
        for rnd in range(12):
            setup.execute("DELETE FROM pgbeat.runs")
            slot = setup.execute(
                """UPDATE pgbeat.tasks
                      SET anchor = now() - interval '1 s', next_run_at = now() - interval '1 s', fired = 0
                RETURNING next_run_at"""
            ).fetchone()["next_run_at"]
            done.clear()
            threads = [
                threading.Thread(target=trigger_until_done, args=(c, rnd * 10 + i))
                for i, c in enumerate(trigger_conns)
            ]
            for t in threads:
                t.start()
            try:
                time.sleep(0.005)
                fired = materialize(pass_conn, limit=len(ids))
            finally:
                done.set()
                for t in threads:
                    t.join()
            fired += materialize(pass_conn, limit=len(ids))  # tasks a trigger held locked were skipped
            assert sorted(r["task_id"] for r in fired) == ids
            assert "duplicate" not in {r["outcome"] for r in fired}
            folded += sum(r["outcome"] == "coalesced" for r in fired)
            # Each task's one slot is accounted for exactly once: a run of its own, or
            # coalesced into the run a trigger queued.
            unaccounted = setup.execute(
                """SELECT t.id, count(r.id) FILTER (WHERE r.scheduled_for = %s) AS own,
                          coalesce(sum(r.coalesced), 0) AS coalesced
                     FROM pgbeat.tasks t LEFT JOIN pgbeat.runs r ON r.task_id = t.id
                    GROUP BY t.id
                   HAVING count(r.id) FILTER (WHERE r.scheduled_for = %s)
                          + coalesce(sum(r.coalesced), 0) <> 1""",
                (slot, slot),
            ).fetchall()
            assert unaccounted == [], f"round {rnd}: slots lost or doubled: {unaccounted[:5]}"
        assert folded > 0  # triggers queued runs that slots were folded into
    finally:
        for c in (pass_conn, *trigger_conns):
            c.close()
