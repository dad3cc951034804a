"""Rule 13: the maintenance every scheduler and worker runs beside its main loop
(pgbeat.maintenance): heartbeat, reap and prune (history's day partitions made
ahead, then what is past retention), on their timers, each at its first turn as soon
as the daemon starts."""

from __future__ import annotations

import asyncio

import psycopg
from sqlsupport import connect, create_task, wait_for

from pgbeat import maintenance


async def test_maintenance_heartbeats_reaps_and_prunes_at_its_first_turn(db_url):
    """The side tasks a daemon runs: its heartbeat moves, a daemon whose session is gone
    is recorded stopped, finished runs and deleted tasks older than the retention are
    pruned; what is recent, pending, or a live daemon stays."""
    conn = connect(db_url)
    old = create_task(conn, {"kind": "sleep", "schedule": {"every": "1h"}})["id"]
    gone = create_task(conn, {"kind": "sleep", "schedule": {"every": "1h"}})["id"]
    conn.execute("SELECT pgbeat.delete_task(%s)", [gone])
    conn.execute(
        "UPDATE pgbeat.tasks SET created_at = now() - interval '3 days',"
        " updated_at = now() - interval '3 days', deleted_at = now() - interval '2 days' WHERE id = %s",
        [gone],
    )
    conn.execute(
        """INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at, state, started_at, finished_at)
           SELECT %(id)s, 'sleep', at, at, state, at, CASE WHEN state <> 'pending' THEN at END
             FROM (VALUES ('succeeded', interval '2 days'), ('failed', interval '3 days'),
                          ('succeeded', interval '1 hour')) AS v(state, ago),
                  LATERAL (SELECT now() - ago AS at) a
           UNION ALL
           SELECT %(id)s, 'sleep', now() - interval '49 h', now() - interval '49 h', 'pending', NULL, NULL""",
        {"id": old},
    )
    # The day after tomorrow's partition is missing (a database migrated two days ago).
    ahead = conn.execute(
        "SELECT 'pgbeat.runs_' || to_char((now() AT TIME ZONE 'UTC')::date + 2, 'YYYYMMDD') AS name"
    ).fetchone()["name"]
    conn.execute(f"DROP TABLE {ahead}")
    with psycopg.connect(db_url, autocommit=True) as session:  # registers, then its session ends
        dead = session.execute("SELECT pgbeat.register_daemon('worker', 'h', 1)").fetchone()[0]
    with psycopg.connect(db_url, autocommit=True) as own:  # the daemon's own session, kept
        me = own.execute("SELECT pgbeat.register_daemon('worker', 'h', 2)").fetchone()[0]
        conn.execute("UPDATE pgbeat.daemons SET heartbeat_at = now() - interval '1 h' WHERE id = %s", [me])

        def state() -> dict:
            return conn.execute(
                """SELECT (SELECT array_agg(state ORDER BY state) FROM pgbeat.runs
                            WHERE task_id = %(old)s) AS runs,
                          (SELECT count(*) FROM pgbeat.tasks WHERE id = %(gone)s) AS gone,
                          (SELECT stopped_at IS NOT NULL FROM pgbeat.daemons
                            WHERE id = %(dead)s) AS dead_stopped,
                          (SELECT stopped_at IS NOT NULL FROM pgbeat.daemons
                            WHERE id = %(me)s) AS me_stopped,
                          (SELECT heartbeat_at > now() - interval '1 min' FROM pgbeat.daemons
                            WHERE id = %(me)s) AS beat,
                          to_regclass(%(ahead)s) IS NOT NULL AS ahead""",
                {"old": old, "gone": gone, "dead": dead, "me": me, "ahead": ahead},
            ).fetchone()

        until = asyncio.Event()
        async with maintenance.Maintenance(db_url, me, role="worker", retention_days=1.0) as upkeep:
            side = asyncio.gather(*upkeep.side_tasks(until))
            done = await asyncio.to_thread(
                wait_for,
                "the first heartbeat, reap and prune",
                lambda: (
                    (s := state())["beat"]
                    and s["dead_stopped"]
                    and s["gone"] == 0
                    and len(s["runs"]) == 2
                    and s["ahead"]
                    and s
                ),
            )
            until.set()
            await asyncio.wait_for(side, timeout=30)
    assert done == {
        "runs": ["pending", "succeeded"],
        "gone": 0,
        "dead_stopped": True,
        "me_stopped": False,
        "beat": True,
        "ahead": True,
    }
