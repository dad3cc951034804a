"""The soak-and-chaos run (`pgbeat chaos`, `python -m pgbeat.chaos`) and its invariant checker.

The run starts an api, 2 schedulers and 3 workers against one PostgreSQL (a
private embedded server, so it can be restarted), creates a few hundred tasks
through the API, injects faults at random moments (kill -9 and SIGTERM of
daemons, a PostgreSQL restart, task patches, deletes, pauses and resumes), stops
the load, lets it settle, then checks the coordination rules from the database
alone. Each invariant is one SQL query returning its violations, one per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

# ---------------------------------------------------------------------------
# The invariant checker
# ---------------------------------------------------------------------------

# Bounds the checker holds the run to (SOLUTION.md "Proof under failure" states them).
LATENESS_P99_BOUND = 1.0  # s: p99 start delay outside fault windows
LATENESS_MAX_BOUND = 5.0  # s: no single start delay outside fault windows beyond this
RECOVERY_MARGIN = 5.0  # s: a fault window extends this far past the recovery it waits for
SCHEDULE_TOLERANCE = 5.0  # s: how far behind the load stop a task's next slot may be


@dataclass
class ChaosRecord:
    """What the run knows that the database does not: the faults it injected."""

    since: datetime  # tasks created from here on are checked
    load_stopped_at: datetime  # the schedulers were stopped here
    killed_daemon_ids: list[int] = field(default_factory=list)  # kill -9, or sessions ended by a restart
    fault_windows: list[tuple[datetime, datetime]] = field(default_factory=list)  # fault to recovery

    def params(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "load_stopped_at": self.load_stopped_at,
            "killed": self.killed_daemon_ids,
            "window_starts": [w[0] for w in self.fault_windows],
            "window_ends": [w[1] for w in self.fault_windows],
            "margin": RECOVERY_MARGIN,
            "tolerance": SCHEDULE_TOLERANCE,
            "p99_bound": LATENESS_P99_BOUND,
            "max_bound": LATENESS_MAX_BOUND,
        }


# Runs that really executed (claimed by a worker session), as opposed to
# skipped slots and pending runs cancelled before they started.
_SCOPE = """
    scoped AS (SELECT t.* FROM pgbeat.tasks t WHERE t.created_at >= %(since)s),
    executed AS (SELECT r.* FROM pgbeat.runs r JOIN scoped t ON t.id = r.task_id
                  WHERE r.backend_pid IS NOT NULL)
"""

# When each executed run could have started: its due time, or when the task's
# previous run finished (queued behind it), whichever is later; and whether
# that moment falls inside a fault window (or its recovery margin).
_READINESS = """
    readiness AS (
        SELECT e.id, e.task_id, e.started_at,
               greatest(e.due_at, lag(e.finished_at) OVER (PARTITION BY e.task_id
                                                           ORDER BY e.started_at, e.id)) AS ready_at
          FROM executed e),
    outside AS (
        SELECT r.*, extract(epoch FROM r.started_at - r.ready_at)::float8 AS lateness
          FROM readiness r
         WHERE NOT EXISTS (SELECT 1 FROM unnest(%(window_starts)s::timestamptz[],
                                                %(window_ends)s::timestamptz[]) AS w(s, e)
                            WHERE r.ready_at BETWEEN w.s AND w.e + make_interval(secs => %(margin)s)))
"""

INVARIANTS: dict[str, tuple[str, str]] = {
    "1 no self-overlap": (
        "no two runs of one task overlap in [started_at, finished_at) (running = open-ended)",
        f"""
        WITH {_SCOPE},
        ordered AS (
            SELECT e.*, max(coalesce(e.finished_at, 'infinity')) OVER (
                       PARTITION BY e.task_id ORDER BY e.started_at, e.id
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_end
              FROM executed e)
        SELECT format('task %%s: run %%s started at %%s before an earlier run of the task ended (%%s)',
                      task_id, id, started_at, earlier_end)
          FROM ordered WHERE started_at < earlier_end ORDER BY task_id, id
        """,
    ),
    "2 one run per slot": (
        "no (task, slot, attempt) has more than one run",
        f"""
        WITH {_SCOPE}
        SELECT format('task %%s: slot %%s attempt %%s has %%s runs (%%s)',
                      r.task_id, r.scheduled_for, r.attempt, count(*), string_agg(r.id::text, ', '))
          FROM pgbeat.runs r JOIN scoped t ON t.id = r.task_id
         GROUP BY r.task_id, r.scheduled_for, r.attempt HAVING count(*) > 1
         ORDER BY r.task_id, r.scheduled_for
        """,
    ),
    "3 counters exact": (
        "every counter equals the sum of its succeeded runs' steps",
        f"""
        WITH {_SCOPE},
        names AS (
            SELECT coalesce(t.params->>'counter', 'task:' || t.id) AS name
              FROM scoped t WHERE t.kind = 'counter'
            UNION
            SELECT r.result->>'counter' FROM pgbeat.runs r JOIN scoped t ON t.id = r.task_id
             WHERE r.result ? 'counter'),
        expected AS (
            SELECT r.result->>'counter' AS name, sum((r.result->>'step')::bigint) AS value
              FROM pgbeat.runs r
             WHERE r.kind = 'counter' AND r.state = 'succeeded' AND r.result ? 'counter'
             GROUP BY 1)
        SELECT format('counter %%s is %%s, its succeeded runs add up to %%s',
                      n.name, coalesce(c.value, 0), coalesce(e.value, 0))
          FROM names n
          LEFT JOIN pgbeat.counters c ON c.name = n.name
          LEFT JOIN expected e ON e.name = n.name
         WHERE coalesce(c.value, 0) <> coalesce(e.value, 0)
        UNION ALL
        SELECT format('task %%s: run %%s succeeded but records no counter increment', r.task_id, r.id)
          FROM pgbeat.runs r JOIN scoped t ON t.id = r.task_id
         WHERE r.kind = 'counter' AND r.state = 'succeeded'
           AND NOT (r.result ? 'counter' AND r.result ? 'step')
        """,
    ),
    "4 nothing stuck, abandoned only by the killed": (
        "no run left running or pending past the settle time; abandoned runs belong to killed daemons",
        f"""
        WITH {_SCOPE}
        SELECT format('task %%s: run %%s is still %%s (due %%s)', r.task_id, r.id, r.state, r.due_at)
          FROM pgbeat.runs r JOIN scoped t ON t.id = r.task_id
         WHERE r.state = 'running' OR (r.state = 'pending' AND r.due_at <= %(load_stopped_at)s)
        UNION ALL
        SELECT format('task %%s: run %%s was abandoned by daemon %%s, which was not killed',
                      r.task_id, r.id, coalesce(r.daemon_id::text, 'none'))
          FROM pgbeat.runs r JOIN scoped t ON t.id = r.task_id
         WHERE r.state = 'abandoned' AND NOT coalesce(r.daemon_id = ANY (%(killed)s::integer[]), false)
        """,
    ),
    "5 no schedule lost": (
        "every active task kept firing and running after every fault; deleted and paused tasks stopped",
        f"""
        WITH {_SCOPE},
        windows AS (SELECT s, e FROM unnest(%(window_starts)s::timestamptz[],
                                            %(window_ends)s::timestamptz[]) AS w(s, e)),
        recurring AS (
            SELECT t.* FROM scoped t
             WHERE t.deleted_at IS NULL AND NOT t.paused AND t.run_at IS NULL
               AND t.until IS NULL AND t.max_runs IS NULL),
        -- Interval tasks never patched, paused or deleted: their grid is unbroken.
        untouched AS (
            SELECT t.* FROM recurring t WHERE t.every IS NOT NULL AND t.updated_at = t.created_at),
        slots AS (
            SELECT t.id, t.every, count(*) AS rows, sum(r.coalesced) AS coalesced,
                   min(r.scheduled_for) AS first_slot, max(r.scheduled_for) AS last_slot,
                   (array_agg(r.coalesced ORDER BY r.scheduled_for))[1] AS first_coalesced,
                   (array_agg(r.coalesced ORDER BY r.scheduled_for DESC))[1] AS last_coalesced
              FROM untouched t JOIN pgbeat.runs r ON r.task_id = t.id AND r.attempt = 1
             GROUP BY t.id, t.every),
        slot_counts AS (
            SELECT s.*, round(extract(epoch FROM s.last_slot - s.first_slot)
                              / extract(epoch FROM s.every))::bigint + 1 AS grid_slots
              FROM slots s)
        -- The scheduler kept firing every recurring task up to the load stop.
        SELECT format('task %%s: next slot %%s is behind the load stop %%s (slots stopped firing)',
                      t.id, coalesce(t.next_run_at::text, 'none'), %(load_stopped_at)s::timestamptz)
          FROM recurring t
         WHERE t.created_at < %(load_stopped_at)s - make_interval(secs => %(tolerance)s)
           AND coalesce(t.next_run_at < %(load_stopped_at)s - make_interval(secs => %(tolerance)s), true)
        UNION ALL
        -- After each fault, each untouched interval task started a run again within
        -- its interval (plus a sleep task's own duration) and the recovery margin.
        SELECT format('task %%s: no run started within %%s s after the fault window ending %%s',
                      t.id, round((extract(epoch FROM t.every) + coalesce((t.params->>'seconds')::numeric, 0)
                                   + %(margin)s)::numeric, 1), w.e)
          FROM untouched t CROSS JOIN windows w
         WHERE t.created_at < w.s
           AND w.e + t.every + make_interval(secs => coalesce((t.params->>'seconds')::float8, 0)
                                                    + %(margin)s) < %(load_stopped_at)s
           AND NOT EXISTS (
               SELECT 1 FROM executed e
                WHERE e.task_id = t.id AND e.started_at > w.e
                  AND e.started_at <= w.e + t.every + make_interval(
                          secs => coalesce((t.params->>'seconds')::float8, 0) + %(margin)s))
        UNION ALL
        -- Every slot of an unbroken grid is accounted for: a run of its own, or
        -- coalesced into a neighbour (queued behind a run, or folded as a misfire).
        SELECT format('task %%s: %%s grid slots from %%s to %%s, but runs account for %%s',
                      id, grid_slots, first_slot, last_slot, rows + coalesced)
          FROM slot_counts
         WHERE rows + coalesced < grid_slots
            OR rows + coalesced > grid_slots + first_coalesced + last_coalesced
        UNION ALL
        -- One-shots whose time came (and were left alone) ran.
        SELECT format('task %%s: one-shot at %%s never ran', t.id, t.run_at)
          FROM scoped t
         WHERE t.run_at IS NOT NULL AND t.updated_at = t.created_at
           AND t.run_at < %(load_stopped_at)s - make_interval(secs => %(tolerance)s)
           AND NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = t.id)
        UNION ALL
        -- Deleted tasks, and tasks paused at the end, ran no new slot afterwards.
        SELECT format('task %%s: run %%s (slot %%s) started at %%s, after the task was %%s at %%s',
                      t.id, e.id, e.scheduled_for, e.started_at,
                      CASE WHEN t.deleted_at IS NOT NULL THEN 'deleted' ELSE 'paused' END,
                      coalesce(t.deleted_at, t.updated_at))
          FROM scoped t JOIN executed e ON e.task_id = t.id
         WHERE (t.deleted_at IS NOT NULL OR t.paused)
           AND e.started_at > coalesce(t.deleted_at, t.updated_at)
           AND e.scheduled_for > coalesce(t.deleted_at, t.updated_at)
        """,
    ),
    "6 lateness bounded outside faults": (
        f"start delay (from due, or from the previous run's end) outside fault windows: "
        f"p99 <= {LATENESS_P99_BOUND:g} s, max <= {LATENESS_MAX_BOUND:g} s",
        f"""
        WITH {_SCOPE}, {_READINESS},
        stats AS (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness) AS p99 FROM outside)
        SELECT format('task %%s: run %%s started %%s s after it was ready (%%s)%%s',
                      o.task_id, o.id, round(o.lateness::numeric, 3), o.ready_at,
                      CASE WHEN o.lateness > %(max_bound)s THEN ' beyond the max bound'
                           ELSE format(' while p99 is %%s s', round(s.p99::numeric, 3)) END)
          FROM outside o CROSS JOIN stats s
         WHERE o.lateness > %(max_bound)s OR (s.p99 > %(p99_bound)s AND o.lateness > %(p99_bound)s)
         ORDER BY o.lateness DESC
        """,
    ),
}

LATENESS_STATS = f"""
    WITH {_SCOPE}, {_READINESS}
    SELECT count(*),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY lateness),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness),
           max(lateness)
      FROM outside
"""


def check(conn: psycopg.Connection, record: ChaosRecord) -> dict[str, list[str]]:
    """Run every invariant query; returns each invariant's violations (empty: it held)."""
    params = record.params()
    return {
        name: [row[0] for row in conn.execute(sql, params).fetchall()]
        for name, (_, sql) in INVARIANTS.items()
    }


def lateness_stats(conn: psycopg.Connection, record: ChaosRecord) -> tuple[int, float, float, float]:
    """(runs, p50, p99, max) start delay in seconds outside the fault windows."""
    n, p50, p99, worst = conn.execute(LATENESS_STATS, record.params()).fetchone()
    return n, p50 or 0.0, p99 or 0.0, worst or 0.0
