-- The invariants of RULES.md as queries: the chaos checker runs them after its
-- load, and the tests run them on histories they build (pgbeat_lab.invariants
-- loads them).
--
-- Each entry: a `-- name: <name>` line, a one-line description, the statement.
-- An invariant's name starts with the number of the rule it checks
-- (`rule_2_...` checks Rule 2); it returns that rule's violations, one row each
-- (task_id, run_id, violation: a sentence naming the times involved); no row:
-- the rule held. Parameters are psycopg's %(name)s, from
-- pgbeat_lab.invariants.Record.params(); literal percent signs are doubled.
--
-- They measure execution, not bookkeeping. `executions` (made by `setup`) holds
-- every run a worker really executed, from its start as the claim recorded it
-- until the later of its recorded finish and the end its worker observed
-- (`observed_ends`: a run whose row was abandoned while its worker kept
-- executing it is open until that worker says it stopped, or died). A worker's
-- death ends only the runs it had not recorded: it batches its log lines, so a
-- kill -9 can take the line of a run it had finished.


-- name: setup
-- The checker's session tables: what is checked, and the ends the workers observed.
CREATE TEMP TABLE IF NOT EXISTS check_scope (since timestamptz NOT NULL);
CREATE TEMP TABLE IF NOT EXISTS observed_ends (run_id bigint PRIMARY KEY, ended_at timestamptz NOT NULL,
                                               died boolean NOT NULL);
TRUNCATE check_scope, observed_ends;
CREATE OR REPLACE TEMP VIEW checked_tasks AS
    SELECT t.* FROM pgbeat.tasks t WHERE t.created_at >= (SELECT since FROM check_scope);
CREATE OR REPLACE TEMP VIEW executions AS
    SELECT e.*, CASE WHEN e.state = 'running' THEN 'infinity'
                     ELSE greatest(e.finished_at, e.observed_end) END AS ended_at
      FROM (SELECT r.*, CASE WHEN o.died AND r.state NOT IN ('abandoned', 'running') THEN NULL
                             ELSE o.ended_at END AS observed_end
              FROM pgbeat.runs r
              JOIN checked_tasks t ON t.id = r.task_id
              LEFT JOIN observed_ends o ON o.run_id = r.id
             WHERE r.backend_pid IS NOT NULL) e;

-- name: set_scope
-- Check the tasks created from %(since)s on.
INSERT INTO check_scope (since) VALUES (%(since)s);

-- name: observe_end
-- Run %(run_id)s stopped executing at %(ended_at)s: its worker said so, or (died) the worker was killed then.
INSERT INTO observed_ends (run_id, ended_at, died) VALUES (%(run_id)s, %(ended_at)s, %(died)s)
ON CONFLICT (run_id) DO UPDATE SET ended_at = greatest(observed_ends.ended_at, excluded.ended_at),
                                   died = observed_ends.died AND excluded.died;

-- name: rule_1_one_run_per_slot
-- No (task, slot, attempt) has two runs, and no slot was executed twice in one attempt.
SELECT r.task_id, min(r.id) AS run_id,
       format('task %%s: slot %%s attempt %%s has %%s runs (%%s), %%s of them executed',
              r.task_id, r.scheduled_for, r.attempt, count(*), string_agg(r.id::text, ', ' ORDER BY r.id),
              count(*) FILTER (WHERE r.backend_pid IS NOT NULL)) AS violation
  FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
 GROUP BY r.task_id, r.scheduled_for, r.attempt HAVING count(*) > 1
 ORDER BY 1, 2;

-- name: rule_2_no_overlap
-- No run of a task started while another run of it was executing, as its worker saw it.
WITH ordered AS (
    SELECT e.*, max(e.ended_at) OVER (PARTITION BY e.task_id ORDER BY e.started_at, e.id
                                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_end
      FROM executions e)
SELECT o.task_id, o.id AS run_id,
       format('task %%s: run %%s started at %%s while run %%s was executing (%%s until %%s%%s)',
              o.task_id, o.id, o.started_at, p.id, p.state, p.ended_at,
              CASE WHEN p.observed_end > p.finished_at
                   THEN format(', although recorded %%s at %%s', p.state, p.finished_at) ELSE '' END) AS violation
  FROM ordered o
  CROSS JOIN LATERAL (SELECT e.* FROM executions e
                       WHERE e.task_id = o.task_id AND e.id <> o.id AND e.started_at <= o.started_at
                         AND e.ended_at > o.started_at
                       ORDER BY e.started_at LIMIT 1) p
 WHERE o.started_at < o.earlier_end
 ORDER BY 1, 2;

-- name: rule_3_one_pending_run
-- No task has two pending runs.
SELECT r.task_id, min(r.id) AS run_id,
       format('task %%s has %%s pending runs (%%s)', r.task_id, count(*), string_agg(r.id::text, ', ')) AS violation
  FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
 WHERE r.state = 'pending'
 GROUP BY r.task_id HAVING count(*) > 1;

-- name: rule_4_counters_exact
-- Every counter equals the sum of its succeeded runs' steps; every succeeded counter run records its increment.
WITH names AS (
    SELECT coalesce(t.params->>'counter', 'task:' || t.id) AS name FROM checked_tasks t WHERE t.kind = 'counter'
    UNION
    SELECT r.result->>'counter' FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
     WHERE r.result ? 'counter'),
expected AS (
    SELECT r.result->>'counter' AS name, sum((r.result->>'step')::bigint) AS value,
           count(*) FILTER (WHERE r.state <> 'succeeded') AS unsucceeded
      FROM pgbeat.runs r
     WHERE r.kind = 'counter' AND r.result ? 'counter' AND r.state = 'succeeded'
     GROUP BY 1)
SELECT NULL::integer AS task_id, NULL::bigint AS run_id,
       format('counter %%s is %%s, its succeeded runs add up to %%s',
              n.name, coalesce(c.value, 0), coalesce(e.value, 0)) AS violation
  FROM names n
  LEFT JOIN pgbeat.counters c ON c.name = n.name
  LEFT JOIN expected e ON e.name = n.name
 WHERE coalesce(c.value, 0) <> coalesce(e.value, 0)
UNION ALL
SELECT r.task_id, r.id, format('task %%s: run %%s %%s but records a counter increment (%%s)',
                               r.task_id, r.id, r.state, r.result)
  FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
 WHERE r.kind = 'counter' AND r.state <> 'succeeded' AND r.result ? 'counter'
UNION ALL
SELECT r.task_id, r.id, format('task %%s: run %%s succeeded but records no counter increment', r.task_id, r.id)
  FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
 WHERE r.kind = 'counter' AND r.state = 'succeeded' AND NOT (r.result ? 'counter' AND r.result ? 'step');

-- name: rule_5_abandoned_only_when_the_worker_is_gone
-- Nothing is left running or pending once the load stopped; abandoned runs belong to killed daemons; none outran its timeout.
SELECT r.task_id, r.id AS run_id,
       format('task %%s: run %%s is still %%s (due %%s)', r.task_id, r.id, r.state, r.due_at) AS violation
  FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
 WHERE r.state = 'running' OR (r.state = 'pending' AND r.due_at <= %(load_stopped_at)s)
UNION ALL
SELECT e.task_id, e.id,
       format('task %%s: run %%s was abandoned at %%s, but its daemon %%s was not killed%%s',
              e.task_id, e.id, e.finished_at, coalesce(e.daemon_id::text, 'none'),
              CASE WHEN e.observed_end > e.finished_at
                   THEN format(' (its worker executed it until %%s)', e.observed_end) ELSE '' END)
  FROM executions e
 WHERE e.state = 'abandoned' AND NOT coalesce(e.daemon_id = ANY (%(killed)s::integer[]), false)
UNION ALL
SELECT e.task_id, e.id,
       format('task %%s: run %%s (%%s) ran %%s s, beyond its timeout of %%s s',
              e.task_id, e.id, e.state, round(extract(epoch FROM e.finished_at - e.started_at), 3), t.timeout)
  FROM executions e JOIN checked_tasks t ON t.id = e.task_id
 WHERE e.state NOT IN ('abandoned', 'cancelled')
   AND e.finished_at > e.started_at + make_interval(secs => t.timeout + %(margin)s);

-- name: rule_6_every_slot_accounted_for
-- Every recurring task kept firing through the faults; each slot of an unbroken grid ran or was folded; due one-shots ran.
WITH windows AS (SELECT s, e FROM unnest(%(window_starts)s::timestamptz[], %(window_ends)s::timestamptz[]) AS w(s, e)),
recurring AS (
    SELECT t.* FROM checked_tasks t
     WHERE t.deleted_at IS NULL AND NOT t.paused AND t.run_at IS NULL AND t.until IS NULL AND t.max_runs IS NULL),
-- Interval tasks never patched, paused, deleted or rewound: their grid is unbroken.
untouched AS (
    SELECT t.* FROM recurring t
     WHERE t.every IS NOT NULL AND t.updated_at = t.created_at AND NOT t.id = ANY (%(touched)s::integer[])),
-- Each slot's own run, and the slots folded into any attempt of it (a retry that is
-- pending takes the slots falling due meanwhile).
per_slot AS (
    SELECT t.id, t.every, r.scheduled_for, count(*) FILTER (WHERE r.attempt = 1) AS own,
           sum(r.coalesced) AS coalesced
      FROM untouched t JOIN pgbeat.runs r ON r.task_id = t.id
     GROUP BY t.id, t.every, r.scheduled_for),
slots AS (
    SELECT p.id, p.every, sum(p.own) AS rows, sum(p.coalesced) AS coalesced,
           min(p.scheduled_for) AS first_slot, max(p.scheduled_for) AS last_slot,
           (array_agg(p.coalesced ORDER BY p.scheduled_for))[1] AS first_coalesced,
           (array_agg(p.coalesced ORDER BY p.scheduled_for DESC))[1] AS last_coalesced
      FROM per_slot p
     GROUP BY p.id, p.every),
slot_counts AS (
    SELECT s.*, round(extract(epoch FROM s.last_slot - s.first_slot) / extract(epoch FROM s.every))::bigint + 1
                AS grid_slots
      FROM slots s)
-- The scheduler kept firing every recurring task up to the load stop.
SELECT t.id AS task_id, NULL::bigint AS run_id,
       format('task %%s: next slot %%s is behind the load stop %%s (slots stopped firing)',
              t.id, coalesce(t.next_run_at::text, 'none'), %(load_stopped_at)s::timestamptz) AS violation
  FROM recurring t
 WHERE t.created_at < %(load_stopped_at)s - make_interval(secs => %(tolerance)s)
   AND coalesce(t.next_run_at < %(load_stopped_at)s - make_interval(secs => %(tolerance)s), true)
UNION ALL
-- After each fault, each untouched interval task started a run again within its
-- interval (plus a sleep task's own duration) and the recovery margin.
SELECT t.id, NULL,
       format('task %%s: no run started within %%s s after the fault window ending %%s',
              t.id, round((extract(epoch FROM t.every) + coalesce((t.params->>'seconds')::numeric, 0)
                           + %(margin)s)::numeric, 1), w.e)
  FROM untouched t CROSS JOIN windows w
 WHERE t.created_at < w.s
   AND w.e + t.every + make_interval(secs => coalesce((t.params->>'seconds')::float8, 0) + %(margin)s)
       < %(load_stopped_at)s
   AND NOT EXISTS (
       SELECT 1 FROM executions e
        WHERE e.task_id = t.id AND e.started_at > w.e
          AND e.started_at <= w.e + t.every + make_interval(
                  secs => coalesce((t.params->>'seconds')::float8, 0) + %(margin)s))
UNION ALL
-- Every slot of an unbroken grid is accounted for: a run of its own, or coalesced
-- into a neighbour (queued behind a run, or folded as a misfire).
SELECT id, NULL, format('task %%s: %%s grid slots from %%s to %%s, but runs account for %%s',
                        id, grid_slots, first_slot, last_slot, rows + coalesced)
  FROM slot_counts
 WHERE rows + coalesced < grid_slots OR rows + coalesced > grid_slots + first_coalesced + last_coalesced
UNION ALL
-- One-shots whose time came (and were left alone) ran.
SELECT t.id, NULL, format('task %%s: one-shot at %%s never ran', t.id, t.run_at)
  FROM checked_tasks t
 WHERE t.run_at IS NOT NULL AND t.updated_at = t.created_at
   AND t.run_at < %(load_stopped_at)s - make_interval(secs => %(tolerance)s)
   AND NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = t.id);

-- name: rule_7_slots_on_the_grid
-- Every executed run of an interval task, and every interval task's next slot, lies on its grid.
SELECT e.task_id, e.id AS run_id,
       format('task %%s: run %%s executed slot %%s, %%s intervals of %%s from the anchor %%s',
              e.task_id, e.id, e.scheduled_for,
              trim_scale(round(extract(epoch FROM e.scheduled_for - t.anchor) / extract(epoch FROM t.every), 6)),
              pgbeat.format_duration(t.every), t.anchor) AS violation
  FROM executions e JOIN checked_tasks t ON t.id = e.task_id
 WHERE t.every IS NOT NULL AND e.scheduled_for > t.updated_at
   AND mod((extract(epoch FROM e.scheduled_for - t.anchor) * 1000000)::numeric,
           (extract(epoch FROM t.every) * 1000000)::numeric) <> 0
UNION ALL
SELECT t.id, NULL,
       format('task %%s: next slot %%s is %%s intervals of %%s from the anchor %%s',
              t.id, t.next_run_at, trim_scale(round(extract(epoch FROM t.next_run_at - t.anchor) / extract(epoch FROM t.every), 6)),
              pgbeat.format_duration(t.every), t.anchor)
  FROM checked_tasks t
 WHERE t.every IS NOT NULL AND t.next_run_at IS NOT NULL
   AND mod((extract(epoch FROM t.next_run_at - t.anchor) * 1000000)::numeric,
           (extract(epoch FROM t.every) * 1000000)::numeric) <> 0;

-- name: rule_8_skip_never_runs_an_overlapping_slot
-- A skip-policy task never executed a slot that fell due while another run of it was executing, as its worker saw it.
SELECT e.task_id, e.id AS run_id,
       format('task %%s (overlap skip): run %%s executed slot %%s, which fell due while run %%s was executing (%%s to %%s)',
              e.task_id, e.id, e.scheduled_for, p.id, p.started_at,
              coalesce(p.observed_end, p.finished_at, 'infinity')) AS violation
  FROM executions e
  JOIN checked_tasks t ON t.id = e.task_id AND t.overlap_policy = 'skip'
  JOIN executions p ON p.task_id = e.task_id AND p.id <> e.id AND p.started_at < e.scheduled_for
   AND coalesce(p.observed_end, p.finished_at, 'infinity') > e.scheduled_for
 WHERE e.attempt = 1
 ORDER BY 1, 2;

-- name: rule_9_no_run_before_its_slot_and_lateness_bounded
-- Every executed run started at or after its due time; outside fault windows, start delays stay within the bounds.
WITH readiness AS (
    -- When each run could have started: its due time, the end of the task's
    -- previous run (queued behind it), or the task's last resume before it started
    -- (a one-shot paused across its slot fires at its resume), whichever is latest.
    SELECT e.id, e.task_id, e.started_at, e.due_at,
           greatest(e.due_at,
                    lag(e.finished_at) OVER (PARTITION BY e.task_id ORDER BY e.started_at, e.id),
                    (SELECT max(rs.at) FROM unnest(%(resumed_tasks)s::integer[], %(resumed_ats)s::timestamptz[])
                                            AS rs(task_id, at)
                      WHERE rs.task_id = e.task_id AND rs.at <= e.started_at)) AS ready_at
      FROM executions e),
outside AS (
    SELECT r.*, extract(epoch FROM r.started_at - r.ready_at)::float8 AS lateness
      FROM readiness r
     WHERE NOT EXISTS (SELECT 1 FROM unnest(%(window_starts)s::timestamptz[], %(window_ends)s::timestamptz[]) AS w(s, e)
                        WHERE r.ready_at BETWEEN w.s AND w.e + make_interval(secs => %(margin)s))),
stats AS (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness) AS p99 FROM outside)
SELECT r.task_id, r.id AS run_id,
       format('task %%s: run %%s started at %%s, before it was due at %%s', r.task_id, r.id, r.started_at, r.due_at)
  FROM readiness r
 WHERE r.started_at < r.due_at
UNION ALL
SELECT o.task_id, o.id,
       format('task %%s: run %%s started %%s s after it was ready (%%s)%%s',
              o.task_id, o.id, round(o.lateness::numeric, 3), o.ready_at,
              CASE WHEN o.lateness > %(max_bound)s THEN ' beyond the max bound'
                   ELSE format(' while p99 is %%s s', round(s.p99::numeric, 3)) END)
  FROM outside o CROSS JOIN stats s
 WHERE o.lateness > %(max_bound)s OR (s.p99 > %(p99_bound)s AND o.lateness > %(p99_bound)s);

-- name: lateness_stats
-- (runs, p50, p99, max) start delay in seconds outside the fault windows (the report's line, not an invariant).
WITH readiness AS (
    SELECT e.id, e.task_id, e.started_at,
           greatest(e.due_at,
                    lag(e.finished_at) OVER (PARTITION BY e.task_id ORDER BY e.started_at, e.id),
                    (SELECT max(rs.at) FROM unnest(%(resumed_tasks)s::integer[], %(resumed_ats)s::timestamptz[])
                                            AS rs(task_id, at)
                      WHERE rs.task_id = e.task_id AND rs.at <= e.started_at)) AS ready_at
      FROM executions e),
outside AS (
    SELECT extract(epoch FROM r.started_at - r.ready_at)::float8 AS lateness
      FROM readiness r
     WHERE NOT EXISTS (SELECT 1 FROM unnest(%(window_starts)s::timestamptz[], %(window_ends)s::timestamptz[]) AS w(s, e)
                        WHERE r.ready_at BETWEEN w.s AND w.e + make_interval(secs => %(margin)s)))
SELECT count(*) AS runs, percentile_cont(0.5) WITHIN GROUP (ORDER BY lateness) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness) AS p99, max(lateness) AS worst
  FROM outside;

-- name: rule_10_refused_input_writes_nothing
-- No task carries the name of a request the API refused: a refused creation created nothing, a refused change changed nothing.
SELECT t.id AS task_id, NULL::bigint AS run_id,
       format('task %%s is named %%s, a name only a refused request used (%%s)',
              t.id, t.name, CASE WHEN t.created_at = t.updated_at AND t.name LIKE '%%-create-%%'
                                 THEN 'a refused creation wrote it' ELSE 'a refused change wrote it' END) AS violation
  FROM pgbeat.tasks t
 WHERE t.name = ANY (%(refused_names)s::text[])
 ORDER BY 1;

-- name: rule_11_paused_and_deleted_tasks_stop
-- No run of a deleted task, or of a task paused at the end, started for a slot after the delete or pause.
SELECT t.id AS task_id, e.id AS run_id,
       format('task %%s: run %%s (slot %%s) started at %%s, after the task was %%s at %%s',
              t.id, e.id, e.scheduled_for, e.started_at,
              CASE WHEN t.deleted_at IS NOT NULL THEN 'deleted' ELSE 'paused' END,
              coalesce(t.deleted_at, t.updated_at)) AS violation
  FROM checked_tasks t JOIN executions e ON e.task_id = t.id
 WHERE (t.deleted_at IS NOT NULL OR t.paused)
   AND e.started_at > coalesce(t.deleted_at, t.updated_at)
   AND e.scheduled_for > coalesce(t.deleted_at, t.updated_at);

-- name: rule_12_no_daemon_outlives_its_session
-- Once every process stopped, no daemon is still live, and each that exited on SIGTERM recorded its stop.
SELECT NULL::integer AS task_id, NULL::bigint AS run_id,
       format('daemon %%s (%%s, pid %%s) is still live after every process stopped', d.id, d.role, d.pid) AS violation
  FROM pgbeat.live_daemons d
 WHERE d.started_at >= (SELECT since FROM check_scope)
UNION ALL
SELECT NULL, NULL, format('daemon %%s (%%s, pid %%s) was SIGTERMed at %%s but never recorded its stop',
                          d.id, d.role, d.pid, s.at)
  FROM pgbeat.daemons d
  JOIN unnest(%(sigterm_daemons)s::integer[], %(sigterm_ats)s::timestamptz[]) AS s(daemon_id, at) ON s.daemon_id = d.id
 WHERE d.stopped_at IS NULL AND NOT d.id = ANY (%(killed)s::integer[]);

-- name: rule_13_maintenance_prunes_and_reaps
-- No finished run (but in a day whose end is not past the retention) or deleted task older than the retention survived the daemons' pruning; no dead daemon planted before the load is still registered.
SELECT r.task_id, r.id AS run_id,
       format('task %%s: run %%s (%%s) finished at %%s, older than the retention of %%s days, was not pruned',
              r.task_id, r.id, r.state, r.finished_at, %(retention_days)s) AS violation
  FROM pgbeat.runs r
 WHERE r.finished_at < now() - make_interval(secs => %(retention_days)s * 86400)
   AND r.state NOT IN ('pending', 'running')
   AND NOT EXISTS (SELECT 1 FROM pgbeat.run_partitions() p
                    WHERE p.part = r.tableoid AND p.whole_days
                      AND p.upper_bound > now() - make_interval(secs => %(retention_days)s * 86400))
UNION ALL
SELECT t.id, NULL,
       format('task %%s was deleted at %%s, older than the retention of %%s days, and has no runs, but was not pruned',
              t.id, t.deleted_at, %(retention_days)s)
  FROM pgbeat.tasks t
 WHERE t.deleted_at < now() - make_interval(secs => %(retention_days)s * 86400)
   AND NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = t.id)
UNION ALL
SELECT NULL, NULL,
       format('daemon %%s (%%s, pid %%s) was dead before the load but is still registered (never reaped)',
              d.id, d.role, d.pid)
  FROM pgbeat.daemons d
 WHERE d.id = ANY (%(dead_daemons)s::integer[]) AND d.stopped_at IS NULL;

-- name: rule_14_retries_follow_failures
-- Each attempt after a slot's first follows an attempt of it that failed, timed out or was abandoned, within max_retries.
SELECT r.task_id, r.id AS run_id,
       format('task %%s: run %%s is attempt %%s of slot %%s, %%s', r.task_id, r.id, r.attempt, r.scheduled_for,
              CASE WHEN r.attempt > t.max_retries + 1
                   THEN format('beyond the task''s max_retries of %%s', t.max_retries)
                   ELSE 'but no earlier attempt of the slot failed, timed out or was abandoned' END) AS violation
  FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
 WHERE r.attempt > 1
   AND (r.attempt > t.max_retries + 1
        OR NOT EXISTS (SELECT 1 FROM pgbeat.runs p
                        WHERE p.task_id = r.task_id AND p.scheduled_for = r.scheduled_for
                          AND p.attempt = r.attempt - 1 AND p.state IN ('failed', 'timed_out', 'abandoned')));

-- name: rule_15_sigterm_drains_within_the_grace
-- A run is cancelled only by a SIGTERMed worker, and only once the shutdown grace after the SIGTERM is over.
SELECT e.task_id, e.id AS run_id,
       format('task %%s: run %%s was cancelled at %%s, %%s', e.task_id, e.id, coalesce(e.observed_end, e.finished_at),
              CASE WHEN s.at IS NULL THEN format('but its daemon %%s was never SIGTERMed', e.daemon_id)
                   ELSE format('%%s s after its worker was SIGTERMed (the grace is %%s s)',
                               round(extract(epoch FROM coalesce(e.observed_end, e.finished_at) - s.at)::numeric, 3),
                               %(grace)s) END) AS violation
  FROM executions e
  LEFT JOIN unnest(%(sigterm_daemons)s::integer[], %(sigterm_ats)s::timestamptz[]) AS s(daemon_id, at)
         ON s.daemon_id = e.daemon_id
 WHERE e.state = 'cancelled'
   AND (s.at IS NULL OR coalesce(e.observed_end, e.finished_at) < s.at + make_interval(secs => %(grace)s));

-- name: rule_16_one_migrate_at_a_time
-- Each migration applied once, no migration lock or yoyo lock row left, the schema current, every migrate that was not killed exited 0.
SELECT NULL::integer AS task_id, NULL::bigint AS run_id,
       format('migration %%s was applied %%s times (rolled back %%s times)', l.migration_id,
              count(*) FILTER (WHERE l.operation = 'apply'), count(*) FILTER (WHERE l.operation = 'rollback'))
       AS violation
  FROM public._yoyo_log l
 GROUP BY l.migration_id
HAVING count(*) FILTER (WHERE l.operation = 'apply') - count(*) FILTER (WHERE l.operation = 'rollback') > 1
UNION ALL
SELECT NULL, NULL, format('the migration lock is %%s by backend %%s after every migrate ended',
                          CASE WHEN l.granted THEN 'held' ELSE 'awaited' END, l.pid)
  FROM pg_locks l
 WHERE l.locktype = 'advisory' AND l.classid = 1885823597 AND l.objid = 0 AND l.objsubid = 2
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
UNION ALL
SELECT NULL, NULL, format('yoyo''s lock row of pid %%s was left after every migrate ended', y.pid)
  FROM public.yoyo_lock y
UNION ALL
SELECT NULL, NULL, format('migration %%s was never applied', m.id)
  FROM unnest(%(migration_ids)s::text[]) AS m(id)
 WHERE NOT EXISTS (SELECT 1 FROM public._yoyo_migration y WHERE y.migration_id = m.id)
UNION ALL
SELECT NULL, NULL, format('the schema files recorded are %%s, not the current %%s',
                          coalesce(obj_description(n.oid, 'pg_namespace'), 'none'), %(schema_digest)s::text)
  FROM pg_namespace n
 WHERE n.nspname = 'pgbeat' AND obj_description(n.oid, 'pg_namespace') IS DISTINCT FROM %(schema_digest)s::text
UNION ALL
SELECT NULL, NULL, f FROM unnest(%(migrate_failures)s::text[]) AS f;

-- name: rule_17_one_tasks_data_stops_no_other_task
-- Every poison task was set aside; every other untouched interval task started a run near each of its slots after the poison, outside fault windows.
WITH windows AS (SELECT s, e FROM unnest(%(window_starts)s::timestamptz[], %(window_ends)s::timestamptz[]) AS w(s, e)),
others AS (
    -- Interval tasks left alone (never patched, paused, deleted or rewound) beside the poison.
    SELECT t.*, t.every + make_interval(secs => least(coalesce((t.params->>'seconds')::float8,
                                                               CASE WHEN t.kind = 'http' THEN t.timeout ELSE 0 END),
                                                      t.timeout) + %(max_bound)s) AS gap
      FROM checked_tasks t
     WHERE t.every IS NOT NULL AND t.deleted_at IS NULL AND NOT t.paused AND t.until IS NULL
       AND t.max_runs IS NULL AND t.updated_at = t.created_at
       AND NOT t.id = ANY (%(touched)s::integer[]) AND NOT t.id = ANY (%(poison)s::integer[])),
slots AS (
    SELECT o.id, o.gap, s.at
      FROM others o
     CROSS JOIN LATERAL generate_series(
               o.anchor + o.every * ceil(greatest(0, extract(epoch FROM greatest(o.created_at, %(poison_from)s::timestamptz)
                                                                       - o.anchor) / extract(epoch FROM o.every))),
               %(load_stopped_at)s::timestamptz - o.gap, o.every) AS s(at))
SELECT t.id AS task_id, NULL::bigint AS run_id,
       format('poison task %%s is not set aside (%%s)', t.id,
              concat_ws(', ', CASE WHEN t.error IS NULL THEN 'no error' END,
                        CASE WHEN NOT t.paused THEN 'not paused' END,
                        CASE WHEN EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = t.id AND r.state = 'pending')
                             THEN 'a run pending' END)) AS violation
  FROM pgbeat.tasks t
 WHERE t.id = ANY (%(poison)s::integer[]) AND t.deleted_at IS NULL
   AND (t.error IS NULL OR NOT t.paused
        OR EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = t.id AND r.state = 'pending'))
UNION ALL
SELECT s.id, NULL,
       format('task %%s: no run started within %%s s of its slot %%s (outside fault windows)',
              s.id, round(extract(epoch FROM s.gap)::numeric, 1), s.at)
  FROM slots s
 WHERE NOT EXISTS (SELECT 1 FROM windows w WHERE w.s <= s.at + s.gap AND w.e + make_interval(secs => %(margin)s) >= s.at)
   AND NOT EXISTS (SELECT 1 FROM executions e
                    WHERE e.task_id = s.id AND e.started_at >= s.at AND e.started_at <= s.at + s.gap)
 ORDER BY 1, 3;

-- name: rule_18_limits_hold
-- No task or run holds a time outside [1970, 9000), an interval under the minimum or a name over 200 characters; counts saturated instead of overflowing.
SELECT t.id AS task_id, NULL::bigint AS run_id,
       format('task %%s: %%s', t.id, concat_ws('; ',
           CASE WHEN NOT c.times_in_range
                THEN format('a time outside [1970, 9000) (next %%s, at %%s, anchor %%s, until %%s)',
                            coalesce(t.next_run_at::text, 'none'), coalesce(t.run_at::text, 'none'),
                            coalesce(t.anchor::text, 'none'), coalesce(t.until::text, 'none')) END,
           CASE WHEN c.every_too_short
                THEN format('every %%s is under the minimum of %%s s', t.every, %(min_interval)s) END,
           CASE WHEN c.name_too_long THEN format('a name of %%s characters', length(t.name)) END,
           CASE WHEN c.overflowed
                THEN format('set aside by a value out of range instead of saturating: %%s', t.error) END,
           CASE WHEN c.unsaturated
                THEN format('fired is %%s after firing past 2^31 - 1 (it saturates there)', t.fired) END)) AS violation
  FROM checked_tasks t
 CROSS JOIN LATERAL (
       SELECT coalesce(t.next_run_at, 'epoch') >= 'epoch' AND coalesce(t.next_run_at, 'epoch') < '9000-01-01+00'
              AND coalesce(t.run_at, 'epoch') >= 'epoch' AND coalesce(t.run_at, 'epoch') < '9000-01-01+00'
              AND coalesce(t.anchor, 'epoch') >= 'epoch' AND coalesce(t.anchor, 'epoch') < '9000-01-01+00'
              AND coalesce(t.until, 'epoch') >= 'epoch' AND coalesce(t.until, 'epoch') < '9000-01-01+00'
              AND t.created_at >= 'epoch' AND t.updated_at < '9000-01-01+00'
              AND coalesce(t.deleted_at, 'epoch') < '9000-01-01+00'
              AND coalesce(t.error_at, 'epoch') < '9000-01-01+00' AS times_in_range,
              coalesce(t.every < make_interval(secs => %(min_interval)s), false) AS every_too_short,
              length(t.name) > 200 AS name_too_long,
              coalesce(t.error ~* '(smallint|integer|bigint|value) out of range|field overflow'
                       AND NOT t.id = ANY (%(poison)s::integer[]), false) AS overflowed,
              t.id = ANY (%(saturated)s::integer[]) AND t.fired <> 2147483647 AS unsaturated) c
 WHERE NOT c.times_in_range OR c.every_too_short OR c.name_too_long OR c.overflowed OR c.unsaturated
UNION ALL
SELECT r.task_id, r.id,
       format('task %%s: run %%s holds a time outside [1970, 9000) (slot %%s, due %%s, started %%s, finished %%s)',
              r.task_id, r.id, r.scheduled_for, r.due_at, r.started_at, r.finished_at)
  FROM pgbeat.runs r JOIN checked_tasks t ON t.id = r.task_id
 WHERE NOT (r.scheduled_for >= 'epoch' AND r.scheduled_for < '9000-01-01+00' AND r.due_at < '9000-01-01+00'
            AND coalesce(r.started_at, 'epoch') < '9000-01-01+00' AND coalesce(r.finished_at, 'epoch') < '9000-01-01+00')
 ORDER BY 1, 2;
