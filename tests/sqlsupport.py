"""Small helpers for the tests that talk to the database (tests/test_sql_*.py, the daemons' tests).

Every helper talks to a real PostgreSQL session; each psycopg connection is one
session, so several connections are several workers or schedulers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

TASK_NS = 1885823604  # 'pgbt'
DAEMON_NS = 1885823588  # 'pgbd'

T = TypeVar("T")


def query(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """One statement on a new session; rows as dicts."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description else []


def wait_for(what: str, check: Callable[[], T], timeout: float = 30, every: float = 0.1) -> T:
    """Poll check() until it returns something truthy; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def wait_gone(conn: psycopg.Connection, pid: int) -> None:
    """Wait until the session `pid` has ended (its locks are then released)."""
    wait_for(
        f"session {pid} to end",
        lambda: not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchall(),
        timeout=4,
        every=0.02,
    )


def wait_blocked(conn: psycopg.Connection) -> None:
    """Wait until some session waits for a lock another one holds."""
    wait_for(
        "a session to wait for a lock",
        lambda: conn.execute("SELECT 1 FROM pg_locks WHERE NOT granted").fetchall(),
        every=0.02,
    )


def connect(url: str, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row)


def create_task(conn: psycopg.Connection, spec: dict, first_slot: Any = None) -> dict:
    return conn.execute("SELECT * FROM pgbeat.create_task(%s, %s)", (Jsonb(spec), first_slot)).fetchone()


def task(conn: psycopg.Connection, task_id: int) -> dict:
    return conn.execute("SELECT * FROM pgbeat.tasks WHERE id = %s", (task_id,)).fetchone()


def runs(conn: psycopg.Connection, task_id: int) -> list[dict]:
    return conn.execute("SELECT * FROM pgbeat.runs WHERE task_id = %s ORDER BY id", (task_id,)).fetchall()


def make_due(conn: psycopg.Connection, task_id: int, ago: float) -> Any:
    """Put a fresh slot of an interval task `ago` seconds in the past, with no
    missed slots before it: the grid restarts there (test setup only). The
    interval must be longer than `ago`. Returns the slot."""
    return conn.execute(
        """UPDATE pgbeat.tasks SET anchor = now() - make_interval(secs => %s), next_run_at = now()
                  - make_interval(secs => %s) WHERE id = %s RETURNING next_run_at""",
        (ago, ago, task_id),
    ).fetchone()["next_run_at"]


def materialize(conn: psycopg.Connection, limit: int = 1000, ahead: float = 0.0) -> list[dict]:
    return conn.execute(
        "SELECT * FROM pgbeat.materialize_due_runs(%s, make_interval(secs => %s))", (limit, ahead)
    ).fetchall()


def claim(conn: psycopg.Connection, limit: int = 1, daemon_id: int | None = None) -> list[dict]:
    return conn.execute("SELECT * FROM pgbeat.claim_runs(%s, %s)", (daemon_id, limit)).fetchall()


def finish(
    conn: psycopg.Connection,
    run_id: int,
    state: str = "succeeded",
    result: dict | None = None,
    error: str | None = None,
) -> dict:
    return conn.execute(
        "SELECT * FROM pgbeat.finish_run(%s, %s, %s, %s)",
        (run_id, state, Jsonb(result) if result is not None else None, error),
    ).fetchone()


def release(conn: psycopg.Connection, task_ids: list[int]) -> int:
    return conn.execute("SELECT pgbeat.release_task_locks(%s) AS n", (task_ids,)).fetchone()["n"]


def backend_pid(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]


def task_locks_of(conn: psycopg.Connection, pid: int) -> list[int]:
    """Task ids whose advisory lock the session `pid` holds, as seen from `conn`."""
    rows = conn.execute(
        """SELECT objid::bigint AS task_id FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND pid = %s AND classid = %s::oid AND objsubid = 2
            ORDER BY 1""",
        (pid, TASK_NS),
    ).fetchall()
    return [r["task_id"] for r in rows]


def row_counts(conn: psycopg.Connection) -> dict[str, Any]:
    """Everything a function could write: rows of every table, the counters'
    values, the tasks' and runs' contents, and advisory locks held."""
    return conn.execute(
        """SELECT (SELECT count(*) FROM pgbeat.tasks) AS tasks,
                  (SELECT count(*) FROM pgbeat.runs) AS runs,
                  (SELECT count(*) FROM pgbeat.counters) AS counters,
                  (SELECT count(*) FROM pgbeat.daemons) AS daemons,
                  (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM pgbeat.tasks t) AS tasks_md5,
                  (SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM pgbeat.runs r) AS runs_md5,
                  (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                      AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
                   AS advisory_locks"""
    ).fetchone()


def race(n: int, fn: Callable[[int], Any], timeout: float = 30) -> list[Any]:
    """Run fn(0..n-1) in n threads released together by a barrier; return their
    results in order, re-raising the first exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    if errors:
        raise errors[0]
    return results
