"""The worker as real `pgbeat worker` processes against a real database.

The tests wait on database state and assert no speed: figures are printed, the
targets live in `pgbeat bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import psycopg
import pytest
from fleetsupport import assert_no_overlap, create_task, db_now, logged_events, runs_of, start
from sqlsupport import query, wait_for

from pgbeat.worker import CLAIM_RUNS, SAFETY_POLL
from pgbeat_lab.fleet import Fleet, Process

# --- helpers -------------------------------------------------------------------------------------


def new_task(url: str, spec: dict[str, Any]) -> int:
    return create_task(url, spec)["id"]


def trigger(url: str, *task_ids: int) -> None:
    """Make the tasks due now, in one transaction (so at the same moment)."""
    with psycopg.connect(url) as conn:
        for task_id in task_ids:
            conn.execute("SELECT pgbeat.trigger_task(%s)", (task_id,))


@contextlib.contextmanager
def scheduling(fleet: Fleet) -> Iterator[Process]:
    """A `pgbeat scheduler` turning due slots into runs while the block runs."""
    (scheduler,) = start(fleet, "scheduler")
    try:
        yield scheduler
    finally:
        assert scheduler.terminate() == 0, scheduler.log()


class HttpTarget:
    """An HTTP server on 127.0.0.1 in a thread: /status/<code>, /flaky/<n> (500 for the
    first n requests, then 200), /slow/<seconds>."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                _, what, arg = self.path.split("/", 2)
                status = 200
                if what == "status":
                    status = int(arg)
                elif what == "flaky":
                    status = 500 if server.hits[self.path] <= int(arg) else 200
                elif what == "slow":
                    time.sleep(float(arg))
                body = b"pgbeat test\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[HttpTarget]:
    server = HttpTarget()
    yield server
    server.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def a_long_run_in_flight(
    url: str, fleet: Fleet, workers: int
) -> Iterator[tuple[list[Process], int, dict[str, Any]]]:
    """Workers, a scheduler and a task of 60 s runs every second; yields the workers,
    the task and its first run once that run is running. (A 1 s shutdown grace: a
    worker is mid-run when the fleet stops it.)"""
    started = start(fleet, "worker", workers, "--concurrency", "2", env={"PGBEAT_SHUTDOWN_GRACE": "1"})
    task_id = new_task(
        url, {"kind": "sleep", "params": {"seconds": 60}, "timeout": 120, "schedule": {"every": 1}}
    )
    with scheduling(fleet):
        running = wait_for(
            "a running run", lambda: [r for r in runs_of(url, task_id) if r["state"] == "running"]
        )[0]
        yield started, task_id, running


def succeeded_count(url: str) -> int:
    return query(url, "SELECT count(*) AS n FROM pgbeat.runs WHERE state = 'succeeded'")[0]["n"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sleep_3_every_1s_on_three_workers_never_overlaps_and_coalesces(db_url, fleet):
    workers = start(fleet, "worker", 3, "--concurrency", "4")
    task_id = new_task(db_url, {"kind": "sleep", "params": {"seconds": 3}, "schedule": {"every": 1}})
    with scheduling(fleet):
        # 3 s runs back to back: three take about 9 s; waiting for the worker's 15 s safety
        # poll between them (a lost lock release) would not finish within the timeout.
        wait_for(
            "3 runs to succeed",
            lambda: len([r for r in runs_of(db_url, task_id) if r["state"] == "succeeded"]) >= 3,
            timeout=25,
        )
    for w in workers:
        assert w.terminate() == 0  # drains: the running one finishes

    runs = runs_of(db_url, task_id)
    done = [r for r in runs if r["state"] == "succeeded"]
    assert len(done) >= 3
    assert {r["state"] for r in runs} <= {"succeeded", "pending"}
    assert_no_overlap(runs)
    for r in done:
        assert (r["finished_at"] - r["started_at"]).total_seconds() >= 2.9
        assert r["result"]["slept_s"] >= 2.9
    # Slots that fell due while a run was pending were folded into it, and counted:
    # every fired slot is either a run or counted in one.
    fired = query(db_url, "SELECT fired FROM pgbeat.tasks WHERE id = %s", task_id)[0]["fired"]
    assert sum(r["coalesced"] for r in runs) >= len(done)
    assert sum(1 + r["coalesced"] for r in runs) >= fired
    gaps = [(b["started_at"] - a["finished_at"]).total_seconds() for a, b in itertools.pairwise(done)]
    print(
        f"\n{len(done)} runs for {fired} slots ({sum(r['coalesced'] for r in runs)} coalesced),"
        f" on {len({r['daemon_id'] for r in done})} workers,"
        f" gaps {min(gaps) * 1000:.0f}-{max(gaps) * 1000:.0f} ms"
    )
    first = logged_events(next(w for w in workers if logged_events(w, "run_started")), "run_started")[0]
    assert {"task_id", "run_id", "slot", "lateness_ms"} <= set(first)


@pytest.mark.slow
def test_two_tasks_due_at_the_same_moment_run_concurrently(db_url, fleet):
    (worker,) = start(fleet, "worker", 1, "--concurrency", "4")
    spec = {"kind": "sleep", "params": {"seconds": 2}, "schedule": {"every": "1h"}}
    a, b = new_task(db_url, spec), new_task(db_url, spec)
    trigger(db_url, a, b)
    ra, rb = (
        wait_for("both runs", lambda t=t: [r for r in runs_of(db_url, t) if r["finished_at"]]) for t in (a, b)
    )
    ra, rb = ra[0], rb[0]
    assert ra["state"] == rb["state"] == "succeeded"
    assert max(ra["started_at"], rb["started_at"]) < min(ra["finished_at"], rb["finished_at"])
    finished = logged_events(worker, "run_finished")
    assert {e["run_id"] for e in finished} == {ra["id"], rb["id"]}
    assert all(e["state"] == "succeeded" and e["duration_ms"] >= 1900 for e in finished)


@pytest.mark.slow
def test_kill_9_mid_run_is_abandoned_and_the_next_slot_runs_on_another_worker(db_url, fleet):
    with a_long_run_in_flight(db_url, fleet, workers=2) as (workers, task_id, running):
        wait_for(
            "the next slot pending behind the running run",
            lambda: [
                r for r in runs_of(db_url, task_id) if r["id"] > running["id"] and r["state"] == "pending"
            ],
        )
        victim = next(w for w in workers if w.pid == running["worker_pid"])
        survivor = next(w for w in workers if w is not victim)
        killed_at = time.time()
        victim.kill()

        def abandoned() -> dict | None:
            run = next(r for r in runs_of(db_url, task_id) if r["id"] == running["id"])
            return run if run["state"] == "abandoned" else None

        run = wait_for("the killed run to be abandoned", abandoned, timeout=20)
        reap_s = run["finished_at"].timestamp() - killed_at
        nxt = wait_for(
            "the next slot to start",
            lambda: [r for r in runs_of(db_url, task_id) if r["id"] > running["id"] and r["started_at"]],
            timeout=20,
        )[0]
        next_s = nxt["started_at"].timestamp() - killed_at
    print(f"\nkill -9: run abandoned after {reap_s:.2f}s, next slot started after {next_s:.2f}s")
    assert run["error"] == "worker lost its database session"
    assert nxt["worker_pid"] == survivor.pid and nxt["state"] == "running"
    assert survivor.alive()


@pytest.mark.slow
def test_sigterm_drains_the_run_in_flight_and_exits_0(db_url, fleet):
    (worker,) = start(fleet, "worker", 1, "--concurrency", "2")
    spec = {"kind": "sleep", "params": {"seconds": 2}, "schedule": {"every": "1h"}}
    task_id = new_task(db_url, spec)
    trigger(db_url, task_id)
    wait_for("the run to start", lambda: runs_of(db_url, task_id)[0]["state"] == "running")
    worker.proc.send_signal(15)
    wait_for("the worker to drain", lambda: logged_events(worker, "worker_draining"))
    late = new_task(db_url, spec)  # due while draining: must not be claimed
    trigger(db_url, late)
    assert worker.terminate(timeout=20) == 0
    (run,) = runs_of(db_url, task_id)
    assert run["state"] == "succeeded" and run["result"]["slept_s"] >= 1.9
    assert runs_of(db_url, late)[0]["state"] == "pending"
    daemon = query(db_url, "SELECT stopped_at FROM pgbeat.daemons WHERE pid = %s", worker.pid)[0]
    assert daemon["stopped_at"] is not None
    assert query(db_url, "SELECT * FROM pgbeat.task_locks") == []


@pytest.mark.slow
def test_sigterm_cancels_a_run_longer_than_the_grace(db_url, fleet):
    (worker,) = start(fleet, "worker", 1, env={"PGBEAT_SHUTDOWN_GRACE": "3"})
    task_id = new_task(db_url, {"kind": "sleep", "params": {"seconds": 60}, "schedule": {"every": "1h"}})
    trigger(db_url, task_id)
    wait_for("the run to start", lambda: runs_of(db_url, task_id)[0]["state"] == "running")
    signalled_at = db_now(db_url)
    worker.proc.send_signal(15)
    wait_for("the worker to drain", lambda: logged_events(worker, "worker_draining"))
    cpu = [cpu_seconds(worker.pid)]

    def exited() -> bool:
        if worker.proc.poll() is not None:
            return True
        with contextlib.suppress(OSError):  # it exited between the two lines
            cpu.append(cpu_seconds(worker.pid))
        return False

    wait_for("the worker to exit", exited, every=0.05)
    assert worker.proc.returncode == 0
    (run,) = runs_of(db_url, task_id)
    # The drain waited out the grace, idle: a spinning loop would have burnt its 3 s of CPU.
    assert (run["finished_at"] - signalled_at).total_seconds() >= 3
    drain_cpu = cpu[-1] - cpu[0]
    assert drain_cpu < 0.6, f"the draining worker used {drain_cpu:.2f}s of CPU in its 3 s grace: it spins"
    assert run["state"] == "cancelled"
    assert "shutdown grace of 3s" in run["error"]
    # Rule 15, as the worker saw it: the run stopped executing only once the grace was over.
    (finished,) = logged_events(worker, "run_finished")
    assert datetime.fromisoformat(finished["ended_at"]) >= signalled_at + timedelta(seconds=3)
    assert query(db_url, "SELECT * FROM pgbeat.task_locks") == []


@pytest.mark.slow
def test_a_run_over_its_timeout_is_timed_out(db_url, fleet):
    start(fleet, "worker", 1)
    task_id = new_task(
        db_url, {"kind": "sleep", "params": {"seconds": 30}, "timeout": 1, "schedule": {"every": "1h"}}
    )
    trigger(db_url, task_id)
    run = wait_for(
        "the run to end", lambda: runs_of(db_url, task_id)[0]["finished_at"] and runs_of(db_url, task_id)[0]
    )
    assert run["state"] == "timed_out"
    assert run["error"] == "exceeded the task's timeout of 1s"
    assert (run["finished_at"] - run["started_at"]).total_seconds() >= 0.9
    # The lock is released right after the finish commits (a separate statement).
    wait_for("the task lock to be released", lambda: query(db_url, "SELECT * FROM pgbeat.task_locks") == [])


@pytest.mark.slow
def test_http_kind_success_non_2xx_and_unreachable(db_url, fleet, http_server):
    start(fleet, "worker", 1, "--concurrency", "8")
    base = http_server.base

    def http_task(params: dict[str, Any]) -> int:
        return new_task(
            db_url, {"kind": "http", "params": params, "timeout": 20, "schedule": {"every": "1h"}}
        )

    ok = http_task({"url": f"{base}/status/200"})
    server_error = http_task({"url": f"{base}/status/503"})
    expected_404 = http_task({"url": f"{base}/status/404", "expect_status": 404})
    wrong_status = http_task({"url": f"{base}/status/200", "expect_status": 201})
    unreachable = http_task({"url": f"http://127.0.0.1:{closed_port()}/"})
    tasks = [ok, server_error, expected_404, wrong_status, unreachable]
    trigger(db_url, *tasks)

    def all_done() -> dict[int, dict] | None:
        done = {t: runs_of(db_url, t)[0] for t in tasks}
        return done if all(r["finished_at"] for r in done.values()) else None

    runs = wait_for("the http runs", all_done)
    assert runs[ok]["state"] == "succeeded"
    assert runs[ok]["result"]["status"] == 200 and runs[ok]["result"]["response_ms"] > 0
    assert runs[server_error]["state"] == "failed"
    assert runs[server_error]["result"]["status"] == 503
    assert runs[server_error]["error"] == "HTTP 503 (expected 2xx)"
    assert runs[expected_404]["state"] == "succeeded"
    assert runs[wrong_status]["state"] == "failed" and runs[wrong_status]["result"]["status"] == 200
    assert runs[unreachable]["state"] == "failed"
    assert runs[unreachable]["error"].startswith("connect: ClientConnectorError")
    assert runs[unreachable]["result"]["error_class"] == "connect"
    assert "status" not in runs[unreachable]["result"]


@pytest.mark.slow
def test_a_failed_run_is_retried_after_its_backoff(db_url, fleet, http_server):
    start(fleet, "worker", 1, env={"PGBEAT_SHUTDOWN_GRACE": "1"})
    # A run already due but blocked behind its task's running run must not make the
    # worker miss the retry's due time.
    busy = new_task(db_url, {"kind": "sleep", "params": {"seconds": 20}, "schedule": {"every": "1h"}})
    trigger(db_url, busy)
    wait_for("the busy run", lambda: runs_of(db_url, busy)[0]["state"] == "running")
    trigger(db_url, busy)
    task_id = new_task(
        db_url,
        {
            "kind": "http",
            "params": {"url": f"{http_server.base}/flaky/1"},
            "max_retries": 2,
            "retry_backoff": 1,
            "schedule": {"every": "1h"},
        },
    )
    trigger(db_url, task_id)
    runs = wait_for(
        "the retry to succeed",
        lambda: (rs := runs_of(db_url, task_id)) and rs[-1]["state"] == "succeeded" and rs,
        timeout=30,
    )
    first, retry = runs
    assert (first["state"], first["attempt"], first["result"]["status"]) == ("failed", 1, 500)
    assert (retry["attempt"], retry["scheduled_for"]) == (2, first["scheduled_for"])
    # The worker slept until the retry fell due (not until its 15 s safety poll).
    assert retry["due_at"] >= first["finished_at"]
    lateness = (retry["started_at"] - retry["due_at"]).total_seconds()
    print(f"\nretry started {lateness * 1000:.0f} ms after it fell due")
    assert lateness < SAFETY_POLL / 2
    assert [r["state"] for r in runs_of(db_url, busy)] == ["running", "pending"]


@pytest.mark.slow
def test_counter_equals_succeeded_runs_times_step_on_several_workers(db_url, fleet):
    workers = start(fleet, "worker", 3, "--concurrency", "2")
    specs = [
        {"kind": "counter", "params": {"step": 1}},
        {"kind": "counter", "params": {"step": 5}},
        {"kind": "counter", "params": {"counter": "shared", "step": 2}},
        {"kind": "counter", "params": {"counter": "shared", "step": 7}},
    ]
    for spec in specs:
        new_task(db_url, {**spec, "schedule": {"every": 0.2}})
    with scheduling(fleet):
        wait_for("10 runs to succeed", lambda: succeeded_count(db_url) >= 10)
        workers[0].kill()  # chaos: a worker dies at an arbitrary moment
        workers.append(fleet.start("worker", "--concurrency", "2"))
        after_kill = succeeded_count(db_url)
        wait_for("10 more runs to succeed", lambda: succeeded_count(db_url) >= after_kill + 10)
    for w in workers[1:]:
        assert w.terminate() == 0

    expected = query(
        db_url,
        """SELECT coalesce(t.params->>'counter', 'task:' || t.id) AS name,
                  sum((t.params->>'step')::bigint) FILTER (WHERE r.state = 'succeeded') AS value,
                  count(*) FILTER (WHERE r.state = 'succeeded') AS succeeded
             FROM pgbeat.runs r JOIN pgbeat.tasks t ON t.id = r.task_id GROUP BY 1 ORDER BY 1""",
    )
    actual = query(db_url, "SELECT name, value FROM pgbeat.counters ORDER BY name")
    assert [(e["name"], e["value"]) for e in expected] == [(a["name"], a["value"]) for a in actual]
    # Loose: on a loaded machine a 0.2 s task gets far fewer runs than slots (they coalesce).
    assert all(e["succeeded"] >= 2 for e in expected) and sum(e["succeeded"] for e in expected) >= 10, (
        expected
    )
    assert query(db_url, "SELECT count(*) AS n FROM pgbeat.runs WHERE state = 'running'")[0]["n"] == 0


@pytest.mark.slow
def test_lost_session_cancels_runs_in_flight_and_the_worker_reconnects(db_url, fleet):
    with a_long_run_in_flight(db_url, fleet, workers=1) as ((worker,), task_id, running):
        # The session holding the task lock dies under the worker (as on a database restart
        # or a network cut); the process itself lives on.
        query(db_url, "SELECT pg_terminate_backend(%s)", running["backend_pid"])
        cut_at = time.time()
        nxt = wait_for(
            "a run on the new session",
            lambda: [r for r in runs_of(db_url, task_id) if r["id"] > running["id"] and r["started_at"]],
            timeout=20,
        )[0]
    lost = next(r for r in runs_of(db_url, task_id) if r["id"] == running["id"])
    print(f"\nsession lost: next run started {nxt['started_at'].timestamp() - cut_at:.2f}s after the cut")
    assert lost["state"] == "abandoned"
    assert nxt["backend_pid"] != running["backend_pid"] and nxt["worker_pid"] == worker.pid
    # Our copy of the lost run was cancelled at once, not left running beside the new one:
    # as the worker saw it, it stopped before the next run started (Rule 2).
    (cancelled,) = [e for e in logged_events(worker, "runs_cancelled") if running["id"] in e["run_ids"]]
    assert datetime.fromisoformat(cancelled["ended_at"]) < nxt["started_at"]
    assert logged_events(worker, "reconnecting")
    assert worker.alive() and worker.terminate() == 0


async def test_a_run_falling_due_during_a_claim_is_claimed_next_not_left_to_the_safety_poll(db_url):
    """A claim takes the runs due at its transaction's start. A run falling due after
    that, while the claim is still running (a slow host, a run materialised just ahead
    of its slot), must come back as "claim again now", not be left for the 15 s safety
    poll: no notification comes for it again. The claim's transaction is held open
    here to stretch that moment."""
    task_id = new_task(db_url, {"kind": "counter", "schedule": {"every": "1h"}})
    conn = await asyncpg.connect(db_url)
    try:
        async with conn.transaction():  # the claim's `now()` is this transaction's start
            trigger(db_url, task_id)  # due at the trigger's `now()`: after the claim's
            await asyncio.sleep(0.05)
            (row,) = await conn.fetch(CLAIM_RUNS, None, 10, [])
        assert row["run_id"] is None  # nothing claimed: not due at the claim's start
        assert row["wake_in"] is not None and row["wake_in"] <= 0, row["wake_in"]
        (row,) = await conn.fetch(CLAIM_RUNS, None, 10, [])
        assert row["task_id"] == task_id and row["run_id"] is not None
    finally:
        await conn.close()
