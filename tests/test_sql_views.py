"""NOTIFY triggers, the daemon registry, and the views psql users read."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from sqlsupport import (
    DAEMON_NS,
    TASK_NS,
    backend_pid,
    claim,
    connect,
    create_task,
    finish,
    make_due,
    materialize,
    release,
    wait_gone,
)

HOUR = {"every": "1h"}
CHANNELS = ("pgbeat_scheduler", "pgbeat_worker")


def listen(url: str) -> psycopg.Connection:
    conn = connect(url)
    for ch in CHANNELS:
        conn.execute(f"LISTEN {ch}")
    return conn


def drain(listener: psycopg.Connection, wait: float = 0.2) -> dict[str, list[str]]:
    """The notifications that arrived, by channel."""
    got: dict[str, list[str]] = {ch: [] for ch in CHANNELS}
    for n in listener.notifies(timeout=wait):
        got[n.channel].append(n.payload)
    return got


def other_database_url(url: str) -> str:
    """The same server, another database (another pgbeat could live there)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/postgres"))


@pytest.mark.slow  # 10,000 tasks written and read back
def test_bulk_insert_of_10000_tasks_sends_one_notification(db_url):
    conn, listener = connect(db_url), listen(db_url)
    conn.execute(
        """INSERT INTO pgbeat.tasks (name, kind, every, anchor, next_run_at)
           SELECT 'bulk' || g, 'sleep', interval '1h', now() + make_interval(secs => g),
                  now() + make_interval(secs => g)
             FROM generate_series(1, 10000) g"""
    )
    got = drain(listener)
    assert len(got["pgbeat_scheduler"]) == 1 and got["pgbeat_worker"] == []
    earliest = conn.execute("SELECT min(next_run_at) AS t FROM pgbeat.tasks").fetchone()["t"]
    payload = json.loads(got["pgbeat_scheduler"][0])
    assert set(payload) == {"next_run_at"} and payload["next_run_at"] is not None
    assert abs(
        earliest - conn.execute("SELECT %s::timestamptz AS t", (payload["next_run_at"],)).fetchone()["t"]
    ) < timedelta(milliseconds=1)

    # All 10,000 fall due: materialising them in one call wakes the workers once,
    # and the scheduler's own advancing of next_run_at is quiet.
    conn.execute(
        "UPDATE pgbeat.tasks SET anchor = now() - interval '1 s', next_run_at = now() - interval '1 s'"
    )
    assert len(drain(listener)["pgbeat_scheduler"]) == 1
    fired = materialize(conn, 20000)
    assert len(fired) == 10000 and {r["outcome"] for r in fired} == {"queued"}
    got = drain(listener)
    assert got == {"pgbeat_scheduler": [], "pgbeat_worker": [""]}

    # A bulk insert of runs is one wake-up too.
    conn.execute("UPDATE pgbeat.runs SET state = 'cancelled', started_at = now(), finished_at = now()")
    drain(listener, 0.1)
    conn.execute(
        """INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at)
           SELECT id, kind, now(), now() FROM pgbeat.tasks"""
    )
    assert drain(listener) == {"pgbeat_scheduler": [], "pgbeat_worker": [""]}


def test_task_operations_notify_the_schedulers_only_when_the_schedule_changes(db_url):
    conn, listener = connect(db_url), listen(db_url)
    t = create_task(conn, {"kind": "sleep", "schedule": {"every": "10s"}})
    got = drain(listener)
    assert len(got["pgbeat_scheduler"]) == 1 and got["pgbeat_worker"] == []
    conn.execute('SELECT pgbeat.update_task(%s, \'{"name": "renamed", "timeout": 3}\')', (t["id"],))
    assert drain(listener) == {"pgbeat_scheduler": [], "pgbeat_worker": []}
    conn.execute("SELECT pgbeat.pause_task(%s)", (t["id"],))
    got = drain(listener)
    assert [json.loads(p) for p in got["pgbeat_scheduler"]] == [{"next_run_at": None}]  # nothing active
    conn.execute("SELECT pgbeat.resume_task(%s)", (t["id"],))
    assert len(drain(listener)["pgbeat_scheduler"]) == 1
    conn.execute("SELECT pgbeat.trigger_task(%s)", (t["id"],))
    assert drain(listener) == {"pgbeat_scheduler": [], "pgbeat_worker": [""]}
    conn.execute("SELECT pgbeat.trigger_task(%s)", (t["id"],))  # the pending run again: still a wake-up
    assert drain(listener)["pgbeat_worker"] == [""]
    conn.execute("SELECT pgbeat.delete_task(%s)", (t["id"],))
    assert [json.loads(p) for p in drain(listener)["pgbeat_scheduler"]] == [{"next_run_at": None}]


def test_releasing_a_lock_wakes_the_workers_when_a_run_waits_for_it(db_url):
    conn, listener = connect(db_url), listen(db_url)
    tid = create_task(conn, {"kind": "sleep", "schedule": HOUR})["id"]
    conn.execute("SELECT pgbeat.trigger_task(%s)", (tid,))
    (c,) = claim(conn)
    finish(conn, c["run_id"])
    drain(listener, 0.1)
    release(conn, [tid])
    assert drain(listener)["pgbeat_worker"] == []  # nothing waits
    conn.execute("SELECT pgbeat.trigger_task(%s)", (tid,))
    (c,) = claim(conn)
    conn.execute("SELECT pgbeat.trigger_task(%s)", (tid,))  # waits behind the running one
    finish(conn, c["run_id"])
    drain(listener, 0.1)
    release(conn, [tid])
    assert drain(listener)["pgbeat_worker"] == [""]


def test_daemon_registry_reads_liveness_from_locks(db_url):
    watcher = connect(db_url)
    daemon = connect(db_url)
    pid = backend_pid(daemon)
    did = daemon.execute("SELECT pgbeat.register_daemon('worker', 'host-a', 4242) AS id").fetchone()["id"]
    lock = watcher.execute(
        """SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid AND objid = %s
              AND objsubid = 2
              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
        (DAEMON_NS, did),
    ).fetchall()
    assert lock == [{"pid": pid}]
    (live,) = watcher.execute("SELECT * FROM pgbeat.live_daemons").fetchall()
    assert (live["id"], live["role"], live["host"], live["pid"], live["backend_pid"]) == (
        did,
        "worker",
        "host-a",
        4242,
        pid,
    )
    before = live["heartbeat_at"]
    time.sleep(0.01)
    daemon.execute("SELECT pgbeat.heartbeat_daemon(%s)", (did,))
    assert watcher.execute("SELECT heartbeat_at FROM pgbeat.live_daemons").fetchone()["heartbeat_at"] > before
    assert watcher.execute("SELECT pgbeat.reap_dead_daemons() AS n").fetchone()["n"] == 0

    daemon.close()
    wait_gone(watcher, pid)
    assert watcher.execute("SELECT * FROM pgbeat.live_daemons").fetchall() == []
    assert watcher.execute("SELECT pgbeat.reap_dead_daemons() AS n").fetchone()["n"] == 1
    assert watcher.execute("SELECT stopped_at FROM pgbeat.daemons WHERE id = %s", (did,)).fetchone()[
        "stopped_at"
    ]
    assert watcher.execute("SELECT pgbeat.reap_dead_daemons() AS n").fetchone()["n"] == 0

    # A clean stop: recorded, lock released, stopping twice is harmless.
    other = connect(db_url)
    d2 = other.execute("SELECT pgbeat.register_daemon('scheduler', 'host-b', 1) AS id").fetchone()["id"]
    other.execute("SELECT pgbeat.stop_daemon(%s)", (d2,))
    other.execute("SELECT pgbeat.stop_daemon(%s)", (d2,))
    assert watcher.execute("SELECT * FROM pgbeat.live_daemons").fetchall() == []
    assert watcher.execute("SELECT stopped_at FROM pgbeat.daemons WHERE id = %s", (d2,)).fetchone()[
        "stopped_at"
    ]
    assert (
        other.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ).fetchone()["n"]
        == 0
    )


def test_locks_taken_in_another_database_on_the_same_server_are_not_ours(db_url):
    """Another pgbeat database on the same server has its own daemon 1 and task 1:
    its locks must not make our dead daemon look alive, nor show in task_locks."""
    watcher = connect(db_url)
    elsewhere = connect(other_database_url(db_url))
    daemon = connect(db_url)
    pid = backend_pid(daemon)
    did = daemon.execute("SELECT pgbeat.register_daemon('worker', 'h', 1) AS id").fetchone()["id"]
    tid = create_task(watcher, {"kind": "sleep", "schedule": HOUR})["id"]
    elsewhere.execute("SELECT pg_advisory_lock(%s, %s)", (DAEMON_NS, did))
    elsewhere.execute("SELECT pg_advisory_lock(%s, %s)", (TASK_NS, tid))
    try:
        daemon.close()
        wait_gone(watcher, pid)
        assert watcher.execute("SELECT * FROM pgbeat.live_daemons").fetchall() == []
        assert watcher.execute("SELECT pgbeat.reap_dead_daemons() AS n").fetchone()["n"] == 1
        assert watcher.execute("SELECT * FROM pgbeat.task_locks").fetchall() == []
        # A worker here can still take that task (the key spaces of two databases are apart).
        watcher.execute("SELECT pgbeat.trigger_task(%s)", (tid,))
        assert [c["task_id"] for c in claim(watcher)] == [tid]
    finally:
        elsewhere.close()


def test_views_show_history_stats_upcoming_runs_and_locks(db_url):
    conn, worker = connect(db_url), connect(db_url)
    did = worker.execute("SELECT pgbeat.register_daemon('worker', 'w1', 77) AS id").fetchone()["id"]
    a = create_task(conn, {"kind": "counter", "name": "a", "schedule": HOUR})["id"]
    b = create_task(conn, {"kind": "sleep", "name": "b", "schedule": {"every": "10m"}})
    # Three runs of a: two succeed (100 ms and 300 ms), one fails.
    for i, (state, ms) in enumerate([("succeeded", 100), ("succeeded", 300), ("failed", 200)]):
        slot = make_due(conn, a, 30 - i)
        materialize(conn)
        (c,) = claim(worker, daemon_id=did)
        finish(worker, c["run_id"], state, error="boom" if state == "failed" else None)
        release(worker, [a])
        conn.execute(
            """UPDATE pgbeat.runs SET started_at = %s + interval '2 s',
                      finished_at = %s + interval '2 s' + make_interval(secs => %s / 1000.0) WHERE id = %s""",
            (slot, slot, ms, c["run_id"]),
        )
    history = conn.execute("SELECT * FROM pgbeat.run_history WHERE task_id = %s ORDER BY id", (a,)).fetchall()
    assert [(h["state"], float(h["duration_ms"]), float(h["lateness_ms"])) for h in history] == [
        ("succeeded", 100.0, 2000.0),
        ("succeeded", 300.0, 2000.0),
        ("failed", 200.0, 2000.0),
    ]
    assert {(h["task_name"], h["kind"], h["worker_host"], h["worker_pid"]) for h in history} == {
        ("a", "counter", "w1", 77)
    }
    assert history[0]["result"]["value"] == 1 and history[2]["error"] == "boom"

    stats = conn.execute("SELECT * FROM pgbeat.task_stats WHERE task_id = %s", (a,)).fetchone()
    assert (stats["runs"], stats["succeeded"], stats["failed"], stats["pending"]) == (3, 2, 1, 0)
    assert float(stats["p50_duration_ms"]) == 200.0 and float(stats["p95_duration_ms"]) == 290.0
    assert stats["last_state"] == "failed"
    empty = conn.execute("SELECT * FROM pgbeat.task_stats WHERE task_id = %s", (b["id"],)).fetchone()
    assert (empty["runs"], empty["p50_duration_ms"], empty["last_state"]) == (0, None, None)

    # Upcoming: a pending run (now), then each active task's next slot, soonest first.
    conn.execute("SELECT pgbeat.trigger_task(%s)", (a,))
    upcoming = conn.execute("SELECT * FROM pgbeat.upcoming_runs ORDER BY run_at").fetchall()
    assert [(u["task_name"], u["source"]) for u in upcoming] == [
        ("a", "pending"),
        ("b", "scheduled"),
        ("a", "scheduled"),
    ]
    assert upcoming[1]["run_at"] == b["next_run_at"]

    # Locks: who holds which task, running what.
    (c,) = claim(worker, daemon_id=did)
    (lock,) = conn.execute("SELECT * FROM pgbeat.task_locks").fetchall()
    assert (lock["task_id"], lock["task_name"], lock["daemon_id"], lock["host"], lock["run_id"]) == (
        a,
        "a",
        did,
        "w1",
        c["run_id"],
    )
    assert lock["backend_pid"] == backend_pid(worker) and lock["running_for"] >= timedelta(0)
    # A dead daemon whose session pid was reused is not the lock holder.
    conn.execute(
        "INSERT INTO pgbeat.daemons (role, host, pid, backend_pid) VALUES ('worker', 'ghost', 1, %s)",
        (backend_pid(worker),),
    )
    assert [
        (r["daemon_id"], r["host"]) for r in conn.execute("SELECT * FROM pgbeat.task_locks").fetchall()
    ] == [(did, "w1")]


def test_slots_more_than_a_minute_away_do_not_wake_the_schedulers(db_url):
    """A scheduler asks the database at least every 30 s, so a slot over 60 s away is
    read in time without a NOTIFY (each of which serialises commits)."""
    conn, listener = connect(db_url), listen(db_url)
    t = create_task(conn, {"kind": "sleep", "schedule": HOUR})
    create_task(conn, {"kind": "sleep", "schedule": {"in": "2m"}})
    assert drain(listener) == {"pgbeat_scheduler": [], "pgbeat_worker": []}
    soon = create_task(conn, {"kind": "sleep", "schedule": {"in": "50s"}})
    (payload,) = drain(listener)["pgbeat_scheduler"]
    announced = conn.execute("SELECT %s::timestamptz AS t", (json.loads(payload)["next_run_at"],)).fetchone()
    assert announced["t"] == soon["next_run_at"]
    # Moving a far slot near wakes them; moving it far again does not; a pause always does.
    conn.execute("""SELECT pgbeat.update_task(%s, '{"schedule": {"every": "20s"}}')""", (t["id"],))
    assert len(drain(listener)["pgbeat_scheduler"]) == 1
    conn.execute("""SELECT pgbeat.update_task(%s, '{"schedule": {"every": "1h"}}')""", (t["id"],))
    assert drain(listener)["pgbeat_scheduler"] == []
    conn.execute("SELECT pgbeat.pause_task(%s)", (t["id"],))
    assert [json.loads(p) for p in drain(listener)["pgbeat_scheduler"]] == [{"next_run_at": None}]


# ---------------------------------------------------------------- the task list (list_tasks)


def listed(conn: psycopg.Connection, page_size: int = 2, **filters) -> list[int]:
    """The ids list_tasks returns, every page (a few at a time, so the cursor is exercised)."""
    ids: list[int] = []
    while True:
        page = conn.execute(
            """SELECT id FROM pgbeat.list_tasks(p_kind => %(kind)s, p_status => %(status)s,
                      p_name => %(name)s, p_after_id => %(after)s, p_limit => %(limit)s)""",
            {
                "kind": None,
                "status": None,
                "name": None,
                **filters,
                "after": ids[-1] if ids else 0,
                "limit": page_size,
            },
        ).fetchall()
        ids += [row["id"] for row in page]
        if len(page) < page_size:
            return ids


NAMES = [
    "100% done",
    "1000 done",
    "a_b",
    "axb",
    "back\\slash",
    "back\\\\twice",
    "backslash",
    "MiXeD Case",
    "mixed case",
    "Ünïcode Größe",
    "deleted match",
]
SEARCHES = [
    "%",
    "_",
    "\\",
    "\\\\",
    "0%",
    "0% d",
    "a_b",
    "a%b",
    "MIXED",
    "xed c",
    "ünï",
    "GRÖSSE",
    "größe",
    "back\\s",
    "slash",
    "match",
    "",
    " ",
    "no such task",
]


def named_tasks(conn: psycopg.Connection) -> dict[str, int]:
    """NAMES (one deleted) among 5,000 others named by md5."""
    ids = {name: create_task(conn, {"kind": "sleep", "name": name, "schedule": HOUR})["id"] for name in NAMES}
    conn.execute("SELECT pgbeat.delete_task(%s)", (ids["deleted match"],))
    conn.execute(
        """INSERT INTO pgbeat.tasks (name, kind, every, anchor, next_run_at)
           SELECT md5(g::text), 'sleep', interval '1h', now(), now() + interval '1h'
             FROM generate_series(1, 5000) g"""
    )
    conn.execute("VACUUM ANALYZE pgbeat.tasks")  # statistics, and the index's pending entries merged
    return ids


def name_search(conn: psycopg.Connection, searches: list[str]) -> dict[str, list[int]]:
    return {search: listed(conn, page_size=1000, name=search) for search in searches}


def test_the_name_filter_is_a_literal_case_insensitive_substring(db_url):
    """% _ and \\ in the search are characters, not patterns; case is ignored as lower()
    ignores it; deleted tasks are left out: what strpos on lower() found before."""
    conn = connect(db_url)
    by = named_tasks(conn)
    md5s = [
        row["s"]
        for row in conn.execute("SELECT upper(substr(md5(g::text), 7, 5)) AS s FROM generate_series(1, 20) g")
    ]
    # What the filter meant before it could use an index: strpos on lower(), over live tasks.
    expected = {
        search: [
            row["id"]
            for row in conn.execute(
                """SELECT id FROM pgbeat.tasks WHERE deleted_at IS NULL
                      AND strpos(lower(name), lower(%s)) > 0 ORDER BY id""",
                (search,),
            )
        ]
        for search in SEARCHES + md5s
    }
    assert expected["%"] == [by["100% done"]] and expected["_"] == [by["a_b"]]
    assert expected["\\"] == [by["back\\slash"], by["back\\\\twice"]]
    assert expected["\\\\"] == [by["back\\\\twice"]]
    assert expected["MIXED"] == [by["MiXeD Case"], by["mixed case"]]
    assert expected["größe"] == [by["Ünïcode Größe"]]  # beyond ASCII, lower() is the locale's
    assert expected["match"] == [] and len(expected[""]) == 5000 + len(NAMES) - 1
    assert all(expected[s] for s in md5s)

    assert name_search(conn, SEARCHES + md5s) == expected


def test_the_status_filter_lists_exactly_the_tasks_of_that_status(db_url):
    """Every status, alone and with a kind, is the status task_status gives the task,
    including a task with no next slot whose run is still pending (active) and one
    whose runs are done (complete)."""
    conn, worker = connect(db_url), connect(db_url)
    ids: dict[str, int] = {}

    def task_of(name: str, kind: str = "sleep", **spec) -> int:
        ids[name] = create_task(conn, {"kind": kind, "name": name, "schedule": HOUR, **spec})["id"]
        return ids[name]

    task_of("active")
    task_of("active counter", kind="counter")
    conn.execute("SELECT pgbeat.pause_task(%s)", (task_of("paused"),))
    conn.execute("SELECT pgbeat.pause_task(%s)", (task_of("paused counter", kind="counter"),))
    conn.execute("SELECT pgbeat.delete_task(%s)", (task_of("deleted"),))
    conn.execute("SELECT pgbeat.pause_task(%s)", (task_of("deleted paused"),))
    conn.execute("SELECT pgbeat.delete_task(%s)", (ids["deleted paused"],))
    # Set aside (Rule 17) as the scheduling pass does it: paused, with the error.
    conn.execute(
        "UPDATE pgbeat.tasks SET paused = true, error = 'bad', error_at = now() WHERE id = %s",
        (task_of("error", kind="counter"),),
    )
    # Two tasks whose one slot fired (no next slot): the run of one is still waiting
    # (active), the other's finished (complete).
    for name in ("ended, run pending", "complete"):
        make_due(conn, task_of(name, max_runs=1), 10)
    assert len(materialize(conn)) == 2
    (run,) = claim(worker)
    finish(worker, run["run_id"], "succeeded")
    release(worker, [run["task_id"]])
    if run["task_id"] != ids["complete"]:
        ids["complete"], ids["ended, run pending"] = ids["ended, run pending"], ids["complete"]

    status = {row["id"]: row["status"] for row in conn.execute("SELECT id, status FROM pgbeat.task_status")}
    expected = {
        "active": ["active", "active counter", "ended, run pending"],
        "paused": ["paused", "paused counter"],
        "deleted": ["deleted", "deleted paused"],
        "error": ["error"],
        "complete": ["complete"],
    }
    assert {ids[name]: s for s, names in expected.items() for name in names} == status
    kind = {row["id"]: row["kind"] for row in conn.execute("SELECT id, kind FROM pgbeat.tasks")}
    for s, names in expected.items():
        assert listed(conn, status=s) == sorted(ids[name] for name in names), s
        for k in ("sleep", "counter"):
            assert listed(conn, status=s, kind=k) == sorted(ids[n] for n in names if kind[ids[n]] == k), (
                s,
                k,
            )
    assert listed(conn) == sorted(i for i, s in status.items() if s != "deleted")
    assert listed(conn, status="unknown") == []


def test_the_name_filter_follows_renames_and_bulk_inserts(db_url):
    """task_names (the name search's table) follows every way a name is written:
    create_task, update_task, a rename in psql, and a bulk INSERT of many tasks in one
    statement; a scheduling decision, which never sets name, leaves it alone."""
    conn = connect(db_url)
    task = create_task(conn, {"kind": "sleep", "name": "Nightly Report", "schedule": HOUR})
    assert listed(conn, name="nightly") == [task["id"]]
    conn.execute("""SELECT pgbeat.update_task(%s, '{"name": "Weekly Digest"}')""", (task["id"],))
    assert listed(conn, name="nightly") == [] and listed(conn, name="DIGEST") == [task["id"]]
    conn.execute("UPDATE pgbeat.tasks SET name = 'Renamed In psql' WHERE id = %s", (task["id"],))
    assert listed(conn, name="in psql") == [task["id"]] and listed(conn, name="digest") == []
    conn.execute(
        """INSERT INTO pgbeat.tasks (name, kind, every, anchor, next_run_at)
           SELECT 'Bulk ' || g, 'sleep', interval '1h', now(), now() + interval '1h'
             FROM generate_series(1, 300) g"""
    )
    assert len(listed(conn, page_size=500, name="bulk")) == 300
    counts = conn.execute(
        """SELECT (SELECT count(*) FROM pgbeat.tasks) AS tasks,
                  (SELECT count(*) FROM pgbeat.task_names) AS names"""
    ).fetchone()
    assert counts["tasks"] == counts["names"] == 301
    # On this server pg_trgm can be created, so the search has its index.
    assert conn.execute("SELECT to_regclass('pgbeat.task_names_trgm') AS i").fetchone()["i"] is not None
