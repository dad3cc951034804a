"""The workers' rules in the database: claims under the task's advisory lock,
no lock leaks or stacking, finish before unlock, reaping by lock absence,
exactly-once counters, retries and retention."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from sqlsupport import (
    backend_pid,
    claim,
    connect,
    create_task,
    finish,
    make_due,
    materialize,
    race,
    release,
    runs,
    task_locks_of,
    wait_blocked,
    wait_gone,
)

HOUR = {"every": "1h"}


def trigger(conn: psycopg.Connection, task_id: int) -> dict:
    return conn.execute("SELECT * FROM pgbeat.trigger_task(%s)", (task_id,)).fetchone()


def test_sessions_racing_to_claim_each_win_distinct_tasks_and_leak_no_lock(db_url):
    setup = connect(db_url)
    ids = [create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"] for _ in range(12)]
    for i in ids:
        trigger(setup, i)
    conns = [connect(db_url) for _ in range(4)]
    pids = [backend_pid(c) for c in conns]
    results = [[] for _ in conns]

    def worker(i: int) -> None:
        while True:
            got = claim(conns[i], limit=2)
            if not got:
                return
            results[i].extend(got)

    race(4, worker)
    claimed = [r["task_id"] for result in results for r in result]
    assert sorted(claimed) == sorted(ids)  # each run claimed once, by one session
    for c, pid, result in zip(conns, pids, results, strict=True):
        # A session holds exactly the locks of the runs it got: none leaked.
        assert task_locks_of(setup, pid) == sorted(r["task_id"] for r in result)
        for r in result:
            assert finish(c, r["run_id"])["applied"] is True
        assert release(c, [r["task_id"] for r in result]) == len(result)
        assert task_locks_of(setup, pid) == []
    assert setup.execute("SELECT count(*) AS n FROM pgbeat.task_locks").fetchone()["n"] == 0


def test_a_claim_of_a_task_locked_elsewhere_gets_nothing_for_it_and_takes_no_lock(db_url):
    a, b, watcher = connect(db_url), connect(db_url), connect(db_url)
    busy = create_task(a, {"kind": "sleep", "schedule": HOUR})["id"]
    free = create_task(a, {"kind": "sleep", "schedule": HOUR})["id"]
    trigger(a, busy)
    (first,) = claim(a)
    assert first["task_id"] == busy
    trigger(a, busy)  # the next run of the busy task waits behind the running one
    trigger(a, free)
    # The busy task's pending run is first in line, but its lock is A's.
    got = claim(b, limit=5)
    assert [r["task_id"] for r in got] == [free]
    assert task_locks_of(watcher, backend_pid(b)) == [free]
    assert task_locks_of(watcher, backend_pid(a)) == [busy]
    # A cannot take the busy task's lock twice either (locks stack).
    assert claim(a, limit=5) == []
    assert [r["state"] for r in runs(watcher, busy)] == ["running", "pending"]
    finish(a, first["run_id"])
    assert release(a, [busy]) == 1
    assert task_locks_of(watcher, backend_pid(a)) == []  # one release frees it: it never stacked
    (second,) = claim(b)
    assert second["task_id"] == busy and second["attempt"] == 1


def test_a_session_never_stacks_a_lock_it_already_holds(db_url):
    conn, watcher = connect(db_url), connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    # The lock is held (e.g. a run is executing), and a run of the task is pending.
    conn.execute("SELECT pg_advisory_lock(pgbeat.task_lock_ns(), %s)", (tid,))
    trigger(conn, tid)
    for _ in range(3):
        assert claim(conn, limit=3) == []
    assert conn.execute("SELECT pg_advisory_unlock(pgbeat.task_lock_ns(), %s) AS ok", (tid,)).fetchone()["ok"]
    assert task_locks_of(watcher, backend_pid(conn)) == []


def test_a_failed_claim_transaction_leaves_no_lock_after_release_stray_task_locks(db_url):
    conn, watcher = connect(db_url), connect(db_url)
    kept = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    stray = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    trigger(conn, kept)
    (running,) = claim(conn)
    trigger(conn, stray)
    with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
        (c,) = claim(conn)
        assert c["task_id"] == stray
        conn.execute("SELECT 1 / 0")
    # The run is pending again, but the session lock survived the rollback.
    assert [r["state"] for r in runs(watcher, stray)] == ["pending"]
    assert task_locks_of(watcher, backend_pid(conn)) == [kept, stray]
    assert conn.execute("SELECT pgbeat.release_stray_task_locks(%s) AS n", ([kept],)).fetchone()["n"] == 1
    assert task_locks_of(watcher, backend_pid(conn)) == [kept]
    assert finish(conn, running["run_id"])["applied"]
    assert conn.execute("SELECT pgbeat.release_stray_task_locks('{}') AS n").fetchone()["n"] == 1
    assert task_locks_of(watcher, backend_pid(conn)) == []
    assert [r["task_id"] for r in claim(watcher)] == [stray]


@pytest.mark.parametrize("how", ["close", "terminate"])
def test_a_run_whose_session_ended_is_abandoned_and_a_live_one_is_not(db_url, how):
    reaper, live = connect(db_url), connect(db_url)
    dead_task = create_task(reaper, {"kind": "sleep", "schedule": HOUR, "max_retries": 1})["id"]
    live_task = create_task(reaper, {"kind": "sleep", "schedule": HOUR})["id"]
    trigger(reaper, dead_task)
    doomed = connect(db_url)
    (lost,) = claim(doomed)
    trigger(reaper, live_task)
    (kept,) = claim(live)
    assert reaper.execute("SELECT pgbeat.reap_abandoned_runs() AS n").fetchone()["n"] == 0
    pid = backend_pid(doomed)
    if how == "close":
        doomed.close()
    else:
        assert reaper.execute("SELECT pg_terminate_backend(%s) AS ok", (pid,)).fetchone()["ok"]
    wait_gone(reaper, pid)
    assert reaper.execute("SELECT pgbeat.reap_abandoned_runs() AS n").fetchone()["n"] == 1
    first, retry = runs(reaper, dead_task)
    assert first["id"] == lost["run_id"] and first["state"] == "abandoned"
    assert first["error"] == "worker lost its database session" and first["finished_at"] is not None
    assert retry["state"] == "pending" and retry["attempt"] == 2  # max_retries = 1
    (still,) = runs(reaper, live_task)
    assert still["state"] == "running"
    assert reaper.execute("SELECT pgbeat.reap_abandoned_runs() AS n").fetchone()["n"] == 0
    assert finish(live, kept["run_id"])["applied"]


def test_the_claim_that_wins_a_lock_abandons_the_orphan_it_finds(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    trigger(conn, tid)
    doomed = connect(db_url)
    (lost,) = claim(doomed)
    pid = backend_pid(doomed)
    trigger(conn, tid)  # the next run waits behind the (dead) running one
    doomed.close()
    wait_gone(conn, pid)
    (c,) = claim(conn)
    states = {r["id"]: r["state"] for r in runs(conn, tid)}
    assert states == {lost["run_id"]: "abandoned", c["run_id"]: "running"}


def test_live_runs_are_never_reaped_by_racing_reapers(db_url):
    setup = connect(db_url)
    ids = [create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"] for _ in range(6)]
    for i in ids:
        trigger(setup, i)
    stop = threading.Event()
    reaped: list[int] = []
    finished = [0, 0]

    def worker(i: int) -> None:
        conn = connect(db_url)
        while finished[i] < 20:  # by count, not time: the machine may be busy
            got = claim(conn, limit=2)
            for r in got:
                assert finish(conn, r["run_id"])["applied"], "a live worker's run was taken from it"
            release(conn, [r["task_id"] for r in got])
            for r in got:
                trigger(conn, r["task_id"])
            finished[i] += len(got)
        conn.close()

    def reaper(_: int) -> None:
        conn = connect(db_url)
        while not stop.is_set():
            reaped.append(conn.execute("SELECT pgbeat.reap_abandoned_runs() AS n").fetchone()["n"])
            time.sleep(0.001)  # leave the 2-core test machine some room for the workers
        conn.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    reapers = [threading.Thread(target=reaper, args=(i,)) for i in range(2)]
    for t in workers + reapers:
        t.start()
    for t in workers:
        t.join(60)
    stop.set()
    for t in reapers:
        t.join(10)
    assert min(finished) >= 20, finished  # both workers really raced the reapers
    assert len(reaped) > 5 and sum(reaped) == 0
    states = setup.execute("SELECT state, count(*) AS n FROM pgbeat.runs GROUP BY state").fetchall()
    assert {r["state"] for r in states} <= {"succeeded", "pending"}


def test_counter_equals_succeeded_runs_after_concurrent_finishes(db_url):
    setup = connect(db_url)
    specs = (
        [{"kind": "counter", "params": {"counter": "shared", "step": 3}}] * 4
        + [{"kind": "counter", "params": {"step": 1}}] * 3
        + [{"kind": "counter", "params": {"counter": "down", "step": -2}}] * 2
    )
    tasks = [create_task(setup, {**s, "schedule": HOUR}) for s in specs]
    for t in tasks:
        trigger(setup, t["id"])
    rounds = 15
    stop_after = rounds * len(tasks)
    done = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        rng = random.Random(i)
        conn = connect(db_url)
        while True:
            with lock:
                if done[0] >= stop_after:
                    break
            got = claim(conn, limit=3)
            if not got:
                time.sleep(0.005)
                continue
            states = [rng.choice(["succeeded", "succeeded", "failed"]) for _ in got]
            conn.execute(
                "SELECT * FROM pgbeat.finish_runs(%s, %s, %s, %s)",
                ([r["run_id"] for r in got], states, [None] * len(got), [None] * len(got)),
            )
            release(conn, [r["task_id"] for r in got])
            for r in got:
                trigger(conn, r["task_id"])
            with lock:
                done[0] += len(got)
        conn.close()

    race(4, worker, timeout=60)
    expected = setup.execute(
        """SELECT coalesce(t.params->>'counter', 'task:' || t.id) AS name,
                  sum((t.params->>'step')::bigint) FILTER (WHERE r.state = 'succeeded') AS value
             FROM pgbeat.runs r JOIN pgbeat.tasks t ON t.id = r.task_id
            GROUP BY 1 ORDER BY 1"""
    ).fetchall()
    got = setup.execute("SELECT name, value FROM pgbeat.counters ORDER BY name").fetchall()
    assert got == expected
    assert {r["name"] for r in got} == {"shared", "down"} | {f"task:{t['id']}" for t in tasks[4:7]}
    n_succeeded = setup.execute("SELECT count(*) AS n FROM pgbeat.runs WHERE state = 'succeeded'").fetchone()
    assert n_succeeded["n"] > 50
    # Each succeeded counter run recorded the value it produced; the last one of
    # the shared counter saw its final value.
    last = setup.execute(
        """SELECT result FROM pgbeat.runs WHERE state = 'succeeded' AND result->>'counter' = 'shared'
            ORDER BY finished_at DESC LIMIT 1"""
    ).fetchone()
    shared = next(r["value"] for r in got if r["name"] == "shared")
    assert last["result"] == {"counter": "shared", "step": 3, "value": shared}


def test_finish_by_another_session_or_twice_is_not_applied(db_url):
    a, b = connect(db_url), connect(db_url)
    tid = create_task(a, {"kind": "counter", "schedule": HOUR})["id"]
    trigger(a, tid)
    (c,) = claim(a)
    assert finish(b, c["run_id"])["applied"] is False  # not B's run
    assert finish(a, 10**9)["applied"] is False  # no such run
    assert finish(a, c["run_id"], result={"x": 1})["applied"] is True
    again = finish(a, c["run_id"], "failed")
    assert again["applied"] is False and again["state"] == "succeeded"
    assert a.execute("SELECT value FROM pgbeat.counters").fetchone()["value"] == 1
    (run,) = runs(a, tid)
    assert run["result"] == {"x": 1, "counter": f"task:{tid}", "step": 1, "value": 1}


def test_failed_runs_are_retried_with_backoff(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR, "max_retries": 2, "retry_backoff": 10})["id"]
    trigger(conn, tid)

    def run_and_end(state: str) -> None:
        (c,) = claim(conn)
        finish(conn, c["run_id"], state, error="boom")
        release(conn, [tid])

    run_and_end("failed")
    first, second = runs(conn, tid)
    assert (second["state"], second["attempt"]) == ("pending", 2)
    assert second["scheduled_for"] == first["scheduled_for"]
    backoff = (second["due_at"] - first["finished_at"]).total_seconds()
    assert 9 <= backoff <= 11
    assert claim(conn) == []  # not due yet
    assert conn.execute("SELECT pgbeat.next_pending_due_at() AS t").fetchone()["t"] == second["due_at"]
    # The worker's question: the next run due after now (and none after that one).
    after = conn.execute("SELECT pgbeat.next_pending_due_at(now()) AS t").fetchone()["t"]
    assert after == second["due_at"]
    assert conn.execute("SELECT pgbeat.next_pending_due_at(%s) AS t", (after,)).fetchone()["t"] is None
    conn.execute("UPDATE pgbeat.runs SET due_at = scheduled_for WHERE id = %s", (second["id"],))
    run_and_end("timed_out")
    third = runs(conn, tid)[2]
    assert third["attempt"] == 3
    assert 19 <= (third["due_at"] - runs(conn, tid)[1]["finished_at"]).total_seconds() <= 21  # doubled
    conn.execute("UPDATE pgbeat.runs SET due_at = scheduled_for WHERE id = %s", (third["id"],))
    run_and_end("failed")
    assert [(r["state"], r["attempt"]) for r in runs(conn, tid)] == [
        ("failed", 1),
        ("timed_out", 2),
        ("failed", 3),  # max_retries reached: no attempt 4
    ]
    # Succeeded and cancelled runs are never retried.
    for state in ("succeeded", "cancelled"):
        trigger(conn, tid)
        run_and_end(state)
    assert (
        conn.execute(
            "SELECT count(*) AS n FROM pgbeat.runs WHERE task_id = %s AND state = 'pending'", (tid,)
        ).fetchone()["n"]
        == 0
    )


def test_prune_history_deletes_only_old_finished_runs_in_batches(db_url):
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    gone = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    for t in [tid] * 9 + [gone]:
        trigger(conn, t)
        (c,) = claim(conn)
        finish(conn, c["run_id"], "failed" if c["run_id"] % 3 else "succeeded")
        release(conn, [t])
    # 7 runs (one of them the deleted task's only run) finished 40 days ago, 3 recently.
    old = conn.execute(
        """UPDATE pgbeat.runs SET scheduled_for = scheduled_for - interval '40 days',
                  due_at = due_at - interval '40 days', started_at = started_at - interval '40 days',
                  finished_at = finished_at - interval '40 days'
            WHERE id IN (SELECT id FROM pgbeat.runs WHERE task_id = %s ORDER BY id LIMIT 6) OR task_id = %s
            RETURNING id""",
        (tid, gone),
    ).fetchall()
    assert len(old) == 7
    conn.execute("SELECT pgbeat.delete_task(%s)", (gone,))
    conn.execute("UPDATE pgbeat.tasks SET deleted_at = now() - interval '40 days' WHERE id = %s", (gone,))
    # A pending and a running run are never pruned, however old.
    trigger(conn, tid)
    (running,) = claim(conn)
    trigger(conn, tid)
    conn.execute(
        "UPDATE pgbeat.runs SET scheduled_for = scheduled_for - interval '90 days',"
        " due_at = due_at - interval '90 days' WHERE task_id = %s AND state = 'pending'",
        (tid,),
    )
    d = conn.execute("SELECT pgbeat.register_daemon('worker', 'h', 1) AS id").fetchone()["id"]
    conn.execute("SELECT pgbeat.stop_daemon(%s)", (d,))
    conn.execute("UPDATE pgbeat.daemons SET stopped_at = now() - interval '40 days'")

    batches = [conn.execute("SELECT pgbeat.prune_history(interval '30 days', 3) AS n").fetchone()["n"]]
    while batches[-1]:
        batches.append(
            conn.execute("SELECT pgbeat.prune_history(interval '30 days', 3) AS n").fetchone()["n"]
        )
    assert batches == [3, 3, 1, 0]
    left = runs(conn, tid)
    assert sorted(r["state"] for r in left if r["finished_at"] is None) == ["pending", "running"]
    assert len([r for r in left if r["finished_at"] is not None]) == 3  # the recent ones
    assert {r["id"] for r in old}.isdisjoint(r["id"] for r in runs(conn, tid))
    assert running["run_id"] in [r["id"] for r in runs(conn, tid)]
    assert conn.execute("SELECT count(*) AS n FROM pgbeat.tasks WHERE id = %s", (gone,)).fetchone()["n"] == 0
    assert conn.execute("SELECT count(*) AS n FROM pgbeat.daemons").fetchone()["n"] == 0
    # The default keeps 30 days.
    assert conn.execute("SELECT pgbeat.prune_history() AS n").fetchone()["n"] == 0


def _in_thread(fn):
    out: dict = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    return t, out


def test_a_slot_falling_due_while_a_retry_is_being_queued_is_coalesced_not_lost(db_url):
    conn, worker = connect(db_url), connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR, "max_retries": 1, "retry_backoff": 0})["id"]
    trigger(conn, tid)
    (c,) = claim(worker)
    make_due(conn, tid, 5)
    with worker.transaction():
        finish(worker, c["run_id"], "failed")  # queues attempt 2, not yet committed
        # The retry's insert holds the task row (foreign key): the scheduler
        # leaves the task for its next call rather than race the retry.
        t, out = _in_thread(lambda: materialize(connect(db_url)))
        t.join(10)
        assert out == {"value": []}
    (fired,) = materialize(conn)
    assert fired["outcome"] == "coalesced"
    assert [(r["state"], r["attempt"], r["coalesced"]) for r in runs(conn, tid)] == [
        ("failed", 1, 0),
        ("pending", 2, 1),
    ]


def test_trigger_racing_a_retry_being_queued_returns_the_pending_run(db_url):
    conn, worker = connect(db_url), connect(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR, "max_retries": 1, "retry_backoff": 600})["id"]
    trigger(conn, tid)
    (c,) = claim(worker)
    with worker.transaction():
        finish(worker, c["run_id"], "failed")
        t, out = _in_thread(lambda: trigger(connect(db_url), tid))
        wait_blocked(conn)  # the trigger waits for the finishing transaction
    t.join(10)
    assert "error" not in out, out
    retry = runs(conn, tid)[1]
    assert out["value"]["id"] == retry["id"] and retry["attempt"] == 2
    assert retry["due_at"] <= conn.execute("SELECT now() AS t").fetchone()["t"]  # made due now


def test_runs_of_one_task_never_overlap(db_url):
    """After the concurrent tests' kind of traffic: no two runs of a task share a moment."""
    setup = connect(db_url)
    ids = [create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"] for _ in range(3)]
    for i in ids:
        trigger(setup, i)
    conns = [connect(db_url) for _ in range(3)]

    done = [0]

    def worker(i: int) -> None:
        while done[0] < 30:  # by count, not time: the machine may be busy
            for r in claim(conns[i], limit=3):
                done[0] += 1
                finish(conns[i], r["run_id"])
                release(conns[i], [r["task_id"]])
                trigger(conns[i], r["task_id"])
                trigger(conns[i], r["task_id"])  # and once more while one is pending

    race(3, worker)
    assert (
        setup.execute("SELECT count(*) AS n FROM pgbeat.runs WHERE state = 'succeeded'").fetchone()["n"] >= 30
    )
    overlaps = setup.execute(
        """SELECT count(*) AS n FROM pgbeat.runs a JOIN pgbeat.runs b
               ON a.task_id = b.task_id AND a.id < b.id
              AND tstzrange(a.started_at, a.finished_at) && tstzrange(b.started_at, b.finished_at)
            WHERE a.state NOT IN ('pending', 'skipped', 'cancelled')
              AND b.state NOT IN ('pending', 'skipped', 'cancelled')"""
    ).fetchone()["n"]
    assert overlaps == 0


def test_sessions_racing_for_one_task_one_wins_the_others_get_nothing_and_hold_nothing(db_url):
    setup = connect(db_url)
    tid = create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"]
    conns = [connect(db_url) for _ in range(3)]
    pids = [backend_pid(c) for c in conns]
    for _round in range(8):
        trigger(setup, tid)
        results = race(3, lambda i: claim(conns[i], limit=5))
        winners = [i for i, r in enumerate(results) if r]
        assert len(winners) == 1, results
        (w,) = winners
        assert [r["task_id"] for r in results[w]] == [tid]
        for i, pid in enumerate(pids):
            assert task_locks_of(setup, pid) == ([tid] if i == w else [])
        assert finish(conns[w], results[w][0]["run_id"])["applied"]
        assert release(conns[w], [tid]) == 1
        assert all(task_locks_of(setup, pid) == [] for pid in pids)
    assert (
        setup.execute(
            "SELECT count(*) AS n FROM pgbeat.runs WHERE task_id = %s AND state = 'succeeded'", (tid,)
        ).fetchone()["n"]
        == 8
    )


def test_release_and_claim_releases_first_so_the_task_can_run_again_in_the_same_call(db_url):
    setup, worker = connect(db_url), connect(db_url)
    pid = backend_pid(worker)
    tid = create_task(setup, {"kind": "sleep", "schedule": HOUR})["id"]
    trigger(setup, tid)
    (first,) = claim(worker)
    assert finish(worker, first["run_id"])["applied"] is True
    second = trigger(setup, tid)  # due now, but its task is still locked by the worker

    def release_and_claim(release_ids: list[int]) -> list[dict]:
        return worker.execute(
            "SELECT * FROM pgbeat.release_and_claim_runs(%s, NULL, 1)", (release_ids,)
        ).fetchall()

    assert release_and_claim([]) == []  # its own lock still stands in the way: no stacking
    assert task_locks_of(setup, pid) == [tid]
    (got,) = release_and_claim([tid])  # unlocked, then claimed again under a fresh lock
    assert got["run_id"] == second["id"]
    assert task_locks_of(setup, pid) == [tid]
    assert setup.execute("SELECT count(*) AS n FROM pgbeat.runs WHERE state = 'running'").fetchone()["n"] == 1
    assert finish(worker, got["run_id"])["applied"] is True
    assert release_and_claim([tid]) == [] and task_locks_of(setup, pid) == []


def test_one_batch_shows_each_runs_own_counter_value(db_url):
    """Several runs of one counter finished in one call: each result shows the value
    its own increment reached, in the order the runs were passed."""
    conn = connect(db_url)
    shared = [
        create_task(conn, {"kind": "counter", "params": {"counter": "batch", "step": 2}, "schedule": HOUR})
        for _ in range(3)
    ]
    alone = create_task(conn, {"kind": "counter", "params": {"step": 5}, "schedule": HOUR})
    for t in [*shared, alone]:
        trigger(conn, t["id"])
    got = claim(conn, limit=4)
    assert len(got) == 4
    order = sorted(got, key=lambda r: -r["run_id"])  # not claim order
    rows = conn.execute(
        "SELECT * FROM pgbeat.finish_runs(%s, %s, %s, %s)",
        ([r["run_id"] for r in order], ["succeeded"] * 4, [None] * 4, [None] * 4),
    ).fetchall()
    values = [(row["result"]["counter"], row["result"]["value"]) for row in rows]
    batch = [v for name, v in values if name == "batch"]
    assert batch == [2, 4, 6]
    assert (f"task:{alone['id']}", 5) in values


def counter_value(conn: psycopg.Connection, name: str) -> int | None:
    row = conn.execute("SELECT value FROM pgbeat.counters WHERE name = %s", (name,)).fetchone()
    return row and row["value"]


@pytest.mark.parametrize("state", ["failed", "timed_out", "cancelled"])
def test_a_counter_run_that_does_not_succeed_moves_no_counter(db_url, state):
    """Rule 4: the increment commits with a succeeded run, and only with one. Neither
    the claim nor an outcome other than `succeeded` moves the counter."""
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "counter", "schedule": HOUR, "params": {"counter": "c", "step": 5}})[
        "id"
    ]
    trigger(conn, tid)
    (c,) = claim(conn)
    assert counter_value(conn, "c") is None
    done = finish(conn, c["run_id"], state, error="it did not succeed")
    assert (done["applied"], done["state"]) == (True, state)
    assert done["result"] == {}  # no increment recorded either
    assert counter_value(conn, "c") is None
    release(conn, [tid])
    # The same task's next run that succeeds moves it by exactly its step.
    trigger(conn, tid)
    (c,) = claim(conn)
    assert finish(conn, c["run_id"])["result"] == {"counter": "c", "step": 5, "value": 5}
    assert counter_value(conn, "c") == 5


def test_a_counter_run_whose_params_cannot_count_fails_and_sets_only_its_task_aside(db_url):
    """Rule 17 at finish: a succeeded counter run whose task's params were made uncountable
    in psql is recorded failed with the reason, moves no counter, and its task is set
    aside (paused, with the error); the other run finished in the same batch counts."""
    conn = connect(db_url)
    bad = create_task(conn, {"kind": "counter", "schedule": HOUR, "params": {"counter": "bad"}})["id"]
    good = create_task(conn, {"kind": "counter", "schedule": HOUR, "params": {"counter": "good"}})["id"]
    for tid in (bad, good):
        trigger(conn, tid)
    got = {r["task_id"]: r["run_id"] for r in claim(conn, limit=2)}
    conn.execute(
        """UPDATE pgbeat.tasks SET params = '{"counter": "bad", "step": "abc"}' WHERE id = %s""", [bad]
    )
    conn.execute(
        "SELECT * FROM pgbeat.finish_runs(%s, %s, %s, %s)",
        ([got[bad], got[good]], ["succeeded"] * 2, [None] * 2, [None] * 2),
    )
    states = {r["task_id"]: (r["state"], r["error"]) for r in (*runs(conn, bad), *runs(conn, good))}
    assert states[good] == ("succeeded", None)
    assert states[bad][0] == "failed" and "(the task is set aside)" in states[bad][1]
    assert (counter_value(conn, "bad"), counter_value(conn, "good")) == (None, 1)
    aside = conn.execute("SELECT paused, error FROM pgbeat.tasks WHERE id = %s", [bad]).fetchone()
    assert aside["paused"] and aside["error"].startswith("finishing a run failed: ")
    assert not conn.execute("SELECT paused FROM pgbeat.tasks WHERE id = %s", [good]).fetchone()["paused"]


# A worker that claims one counter run, says so, and then hangs with its session open.
CLAIMING_WORKER = """
import sys, time, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    row = conn.execute("SELECT run_id, pg_backend_pid() FROM pgbeat.claim_runs(NULL, 1)").fetchone()
    print(row[0], row[1], flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["pg_terminate_backend", "kill -9"])
def test_a_killed_session_holding_a_counter_run_moves_no_counter(db_url, how):
    """Rule 4 under a crash: the worker holding a claimed counter run dies (its session is
    terminated, or its process is killed with -9) before it finishes; the run is abandoned
    and the counter does not move."""
    conn = connect(db_url)
    tid = create_task(conn, {"kind": "counter", "schedule": HOUR, "params": {"counter": "c", "step": 5}})[
        "id"
    ]
    trigger(conn, tid)
    worker = subprocess.Popen(
        [sys.executable, "-c", CLAIMING_WORKER, db_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        run_id, pid = map(int, worker.stdout.readline().split())
        assert task_locks_of(conn, pid) == [tid]  # claimed and held
        assert counter_value(conn, "c") is None
        if how == "kill -9":
            worker.kill()
        else:
            assert conn.execute("SELECT pg_terminate_backend(%s) AS ok", (pid,)).fetchone()["ok"]
        wait_gone(conn, pid)
    finally:
        worker.kill()
        worker.wait(10)
    assert conn.execute("SELECT pgbeat.reap_abandoned_runs() AS n").fetchone()["n"] == 1
    (run,) = runs(conn, tid)
    assert (run["id"], run["state"], run["result"]) == (run_id, "abandoned", None)
    assert counter_value(conn, "c") is None


def test_a_run_whose_lock_is_held_is_never_reaped_however_old(db_url):
    """Rule 5: only the absence of the lock proves a worker gone. A run that started a
    day ago, of a worker whose heartbeat is a day old, is alive while its session
    holds the task lock: no reaper takes it, and its worker still finishes it."""
    worker, reaper = connect(db_url), connect(db_url)
    tid = create_task(worker, {"kind": "counter", "schedule": HOUR})["id"]
    daemon_id = worker.execute("SELECT pgbeat.register_daemon('worker', 'test', 1) AS id").fetchone()["id"]
    trigger(worker, tid)
    (c,) = claim(worker, daemon_id=daemon_id)
    reaper.execute(
        """UPDATE pgbeat.runs SET scheduled_for = scheduled_for - interval '1 day',
                  due_at = due_at - interval '1 day', started_at = started_at - interval '1 day'
            WHERE id = %s""",
        (c["run_id"],),
    )
    reaper.execute(
        "UPDATE pgbeat.daemons SET heartbeat_at = now() - interval '1 day' WHERE id = %s", (daemon_id,)
    )
    reaped = reaper.execute(
        "SELECT pgbeat.reap_abandoned_runs() AS runs, pgbeat.reap_dead_daemons() AS daemons"
    ).fetchone()
    assert reaped == {"runs": 0, "daemons": 0}
    (run,) = runs(reaper, tid)
    assert run["state"] == "running"
    # A claim elsewhere neither takes the task nor abandons its run.
    trigger(reaper, tid)
    assert claim(reaper) == []
    assert [r["state"] for r in runs(reaper, tid)] == ["running", "pending"]
    assert finish(worker, c["run_id"])["applied"]
