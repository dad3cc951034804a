"""Riding through a primary failover, as far as one machine can show it.

In a CloudNativePG failover (k8s/overlays/cnpg) the primary's sessions end, the
read-write Service moves to the promoted replica, and a demoted primary refuses
writes until it is restarted as a replica. From pgbeat's side that is: the server
at its address goes away, hard or cleanly, and comes back; or it stays but takes no
writes for a while. These tests do exactly that to a private PostgreSQL under a
scheduler and two workers with runs in flight, then hold the result to the chaos
run's invariants (pgbeat_lab.chaos): nothing lost, no slot run twice, no run stuck,
counters exact, lateness bounded outside the fault.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fleetsupport import create_task, runs_of, start
from sqlsupport import query, wait_for

from pgbeat import migrations
from pgbeat_lab import chaos, invariants
from pgbeat_lab.fleet import Fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def private_pg() -> Iterator[chaos.PrivatePostgres]:
    """A private embedded PostgreSQL (as a non-root user), migrated; deleted afterwards.
    The tests share it: each checks only the tasks it created (ChaosRecord.since), and
    leaves no daemon running."""
    parent = Path(tempfile.mkdtemp(prefix="pgbeat-failover-"))
    parent.chmod(0o755)  # the server's own user must reach its directory
    pg = chaos.PrivatePostgres(parent / "pgdata", keep=False)
    migrations.apply(pg.url)
    yield pg
    pg.close()
    shutil.rmtree(parent, ignore_errors=True)


def db_now(url: str):
    return query(url, "SELECT clock_timestamp() AS now")[0]["now"]


def answers(url: str, sql: str) -> list[dict]:
    """The query's rows, or [] while the server refuses sessions."""
    try:
        return query(url, sql)
    except psycopg.OperationalError:
        return []


def ride_through(url: str, logs: Path, fault: Callable[[], None], every_session_ends: bool) -> dict:
    """A scheduler and two workers run an every-second counter and a sleep task whose runs
    are in flight when `fault` strikes; after it the daemons whose sessions it ended (all of
    them, if every_session_ends) must be back on new sessions, and all carry on. Returns
    what the test checks beyond the invariants."""
    since = db_now(url)
    with Fleet(url, logs, env={"PGBEAT_SHUTDOWN_GRACE": "5"}) as fleet:
        (scheduler,) = start(fleet, "scheduler")
        workers = start(fleet, "worker", 2)
        counter = create_task(url, {"kind": "counter", "schedule": {"every": "1s"}})
        sleeper = create_task(url, {"kind": "sleep", "params": {"seconds": 0.8}, "schedule": {"every": "1s"}})
        wait_for("counter runs", lambda: len(runs_of(url, counter["id"])) >= 2, timeout=30)
        wait_for(
            "a sleep run in flight",
            lambda: query(
                url, "SELECT 1 FROM pgbeat.runs WHERE task_id = %s AND state = 'running'", sleeper["id"]
            ),
            timeout=30,
            every=0.02,
        )
        before = {d["id"] for d in query(url, "SELECT id FROM pgbeat.daemons")}
        fault_at = db_now(url)

        fault()

        def reconnected() -> list[dict]:
            live = answers(url, "SELECT id, role FROM pgbeat.live_daemons")
            new = [d for d in live if d["id"] not in before]
            complete = sorted(d["role"] for d in live) == ["scheduler", "worker", "worker"]
            return live if complete and len(new) >= (3 if every_session_ends else 1) else []

        live = wait_for("the daemons to register again", reconnected, timeout=60, every=0.1)
        recovered_at = db_now(url)
        ended = sorted(before - {d["id"] for d in live})
        wait_for(
            "counter runs after the fault",
            lambda: (
                len(
                    [
                        r
                        for r in runs_of(url, counter["id"])
                        if r["started_at"] and r["started_at"] > recovered_at
                    ]
                )
                >= 3
            ),
            timeout=30,
        )
        for p in (scheduler, *workers):
            assert p.alive(), f"{p.role} exited:\n{p.log()}"  # they reconnected; they did not crash
        assert scheduler.terminate() == 0
        load_stopped_at = db_now(url)
        wait_for(
            "the workers to finish what is due",
            lambda: (
                not query(
                    url,
                    "SELECT 1 FROM pgbeat.runs WHERE state = 'running'"
                    " OR (state = 'pending' AND due_at <= %s)",
                    load_stopped_at,
                )
            ),
            timeout=30,
        )
        for worker in workers:
            assert worker.terminate() == 0
        reconnects = sum(len(p.events("reconnecting")) for p in (scheduler, *workers))

    record = invariants.Record(
        since=since,
        load_stopped_at=load_stopped_at,
        killed_daemon_ids=ended,  # the sessions the fault ended
        fault_windows=[(fault_at, recovered_at)],
    )
    with psycopg.connect(url) as conn:
        violations = invariants.check(conn, record)
    assert violations == {name: [] for name in invariants.INVARIANTS}
    counted = query(url, "SELECT value FROM pgbeat.counters WHERE name = %s", f"task:{counter['id']}")
    succeeded = [r for r in runs_of(url, counter["id"]) if r["state"] == "succeeded"]
    assert counted[0]["value"] == len(succeeded)
    return {
        "reconnects": reconnects,
        "ended": ended,
        "sleeper": runs_of(url, sleeper["id"]),
        "fault_at": fault_at,
    }


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_stopped_hard_and_started_again_at_the_same_address(private_pg, tmp_path, mode):
    """fast: a switchover's clean stop (sessions ended, checkpoint). immediate: a crash
    (a lost node), recovered from WAL on the next start."""
    seen = ride_through(private_pg.url, tmp_path / "logs", lambda: private_pg.restart(1.5, mode=mode), True)
    assert seen["reconnects"] >= 3  # every daemon lost its session and made a new one
    # The sleep run in flight at the stop died with its worker's session: abandoned, never
    # run again (invariant 2 above: one run per slot).
    cut = [
        r
        for r in seen["sleeper"]
        if r["started_at"] and r["started_at"] < seen["fault_at"] < (r["finished_at"] or seen["fault_at"])
    ]
    assert cut and all(r["state"] == "abandoned" for r in cut), cut


def test_primary_refusing_writes_for_a_while(private_pg, tmp_path):
    """A demoted primary keeps its sessions but refuses writes: the daemons treat that as
    a lost session, reconnect with backoff until writes are taken again, and carry on."""
    admin = private_pg.url

    def read_only(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True, options="-c default_transaction_read_only=off") as conn:
            if on:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            else:
                conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")

    def create_task_via_api() -> tuple[int, dict]:
        request = urllib.request.Request(
            api_base + "/tasks",
            data=json.dumps({"kind": "counter", "schedule": {"every": "1h"}}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def refuse_writes() -> None:
        read_only(True)
        try:
            # Writes are refused (a new session sees it at once), and the API says to
            # retry later: nothing was written.
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                query(admin, "UPDATE pgbeat.tasks SET name = name")
            status, body = create_task_via_api()
            assert status == 503, body
            time.sleep(3)
        finally:
            read_only(False)

    with Fleet(admin, tmp_path / "api-logs") as api_fleet:
        _, api_base = api_fleet.start_api()
        tasks_before = query(admin, "SELECT count(*) AS n FROM pgbeat.tasks")[0]["n"]
        seen = ride_through(admin, tmp_path / "logs", refuse_writes, every_session_ends=False)
        status, body = create_task_via_api()  # the API's pooled sessions carry on
        assert status == 201, body
    # The refused creation wrote nothing: the two tasks of ride_through and the last one.
    assert query(admin, "SELECT count(*) AS n FROM pgbeat.tasks")[0]["n"] == tasks_before + 3
    # A daemon that wrote while writes were refused left its session for a new one (an
    # idle one may not have noticed, and need not).
    assert seen["reconnects"] >= 1 and seen["ended"]
