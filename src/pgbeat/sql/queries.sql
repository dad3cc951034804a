-- Every statement pgbeat sends, by name (pgbeat.queries loads them).
--
-- Each entry: a `-- name: <name>` line, a one-line description, the statement.
-- Parameters are asyncpg's $1, $2... unless the entry says otherwise; rows are
-- read by column name, so a statement names (or aliases) every column it returns.
-- The rules themselves live in the stored functions (sql/schema/); a statement
-- here only calls them and shapes what comes back.


-- ---------------------------------------------------------------- daemons (both)

-- name: register_daemon
-- Register this daemon's own session and take its daemon lock (Rule 12); returns its id.
SELECT pgbeat.register_daemon($1, $2, $3) AS daemon_id;

-- name: stop_daemon
-- Record this daemon as stopped and release its daemon lock.
SELECT pgbeat.stop_daemon($1);

-- name: heartbeat_daemon
-- Record that this daemon is alive (informational: liveness is the lock, Rule 12).
SELECT pgbeat.heartbeat_daemon($1);

-- name: reap
-- Abandon runs whose worker session is gone (Rule 5) and record dead daemons as stopped, in one transaction;
-- and the backlog: due runs waiting for a worker (counted up to 10,001).
SELECT abandoned,
       (SELECT count(*) FROM (SELECT 1 FROM pgbeat.runs WHERE state = 'pending' AND due_at <= now()
                               LIMIT 10001) due) AS due
  FROM pgbeat.reap_abandoned_runs() AS abandoned, pgbeat.reap_dead_daemons();

-- name: add_run_partitions
-- Add the missing day partitions of runs: today and the days after it its default says.
SELECT pgbeat.add_run_partitions() AS added;

-- name: drop_run_partitions
-- One step of dropping the day partitions of runs wholly past $1 seconds of retention, with no live run: 1 while there was one.
SELECT pgbeat.drop_run_partitions(make_interval(secs => $1)) AS dropped;

-- name: prune_history
-- Delete up to $2 finished runs older than $1 seconds (then deleted tasks and stopped daemons left without them).
SELECT pgbeat.prune_history(make_interval(secs => $1), $2) AS pruned;

-- name: ping
-- Prove a session is alive.
SELECT 1 AS alive;


-- ---------------------------------------------------------------- scheduler

-- name: materialize_due_runs
-- Fire the due slots of interval and one-shot tasks (and materialise plain slots up to $2 ahead), $1 tasks at most.
SELECT task_id, run_id, scheduled_for, outcome, missed, error, clock_timestamp() AS fired_at
  FROM pgbeat.materialize_due_runs($1, $2);

-- name: set_task_aside
-- Set a task aside with the error its data caused (Rule 17: croniter refused its cron or time zone).
SELECT pgbeat.set_task_aside($1, $2) AS set_aside;

-- name: due_cron_tasks
-- Cron tasks whose slot is due ($1 at most), with the database's clock for croniter.
SELECT task_id, next_run_at, cron, timezone, db_now FROM pgbeat.due_cron_tasks($1);

-- name: fire_cron_slots
-- Fire the cron slots the scheduler computed with croniter.
SELECT task_id, run_id, scheduled_for, outcome, missed, error, clock_timestamp() AS fired_at
  FROM pgbeat.fire_cron_slots($1);

-- name: next_due_at
-- The earliest slot of an active task, and the database's clock to measure it against.
SELECT pgbeat.next_due_at() AS due_at, clock_timestamp() AS db_now;


-- ---------------------------------------------------------------- worker

-- name: claim_runs
-- Release the locks of recorded runs ($3), claim up to $2 due runs for daemon $1, and say when the next falls due.
-- One row per claimed run in claim order, or one row with a NULL run_id when none
-- was claimed; every row carries wake_in, the seconds until the next pending run
-- falls due (NULL: none; 0 or less: claim again now). The claim takes runs due at
-- its transaction's start, now(); runs due by then that it could not take wait for
-- their task's lock, whose holder's release notifies. Every later run counts, even
-- one that fell due while the claim ran: nothing would announce it again. So the
-- clock is read after the claim: the outer query reads it only once the
-- materialised claim has been counted.
WITH claimed AS MATERIALIZED (
    SELECT * FROM pgbeat.release_and_claim_runs($3, $1, $2) WITH ORDINALITY AS c
), after_claim AS (
    SELECT extract(epoch FROM pgbeat.next_pending_due_at(now()) - clock_timestamp())::float8 AS wake_in
      FROM (SELECT count(*) FROM claimed) AS counted
)
SELECT c.run_id, c.task_id, c.kind, c.params, c.timeout, c.scheduled_for, c.attempt, c.started_at, a.wake_in
  FROM after_claim a LEFT JOIN claimed c ON true
 ORDER BY c.ordinality;

-- name: finish_runs
-- Record the outcomes of runs this session claimed, in one transaction (Rule 4: with their counter increments).
SELECT run_id, state, applied FROM pgbeat.finish_runs($1, $2, $3, $4);

-- name: finish_run
-- Record one run's outcome (the fallback when a batch was refused).
SELECT run_id, state, applied FROM pgbeat.finish_run($1, $2, $3, $4);

-- name: release_task_locks
-- Release task locks whose runs' outcomes have committed (Rule 2: finish, then unlock).
SELECT pgbeat.release_task_locks($1) AS released;

-- name: release_stray_task_locks
-- Release the task locks this session holds except $1 (a failed claim's locks survive its rollback).
SELECT pgbeat.release_stray_task_locks($1) AS released;


-- ---------------------------------------------------------------- api

-- name: create_tasks
-- Create several tasks in one transaction ($1 specs, $2 their first cron slots); rows as the API shows them.
SELECT * FROM pgbeat.api_create_tasks($1, $2);

-- name: get_task
-- One live task with its last and pending runs (no row: unknown or deleted).
SELECT * FROM pgbeat.get_task($1);

-- name: list_tasks
-- Tasks in id order after the cursor, filtered by kind, status, paused and part of the name.
SELECT * FROM pgbeat.list_tasks($1, $2, $3, $4, $5, $6);

-- name: lock_task_schedule
-- Lock a live task for this transaction (P0002 when unknown) and read its cron schedule and error,
-- and the transaction's now(), the clock its next cron slot is computed from and checked against.
SELECT cron, timezone, error, now() AS now FROM pgbeat.lock_task($1);

-- name: transaction_now
-- The transaction's now(): first cron slots are computed from the database's clock, as the
-- stored functions check them (Rule 7), whatever the API host's clock says.
SELECT now() AS now;

-- name: update_task
-- Change a task ($2: the fields given; $3: the first slot of a new or resumed cron schedule).
SELECT * FROM pgbeat.api_update_task($1, $2, $3);

-- name: delete_task
-- Delete a task: its pending run is cancelled, its history stays.
SELECT id FROM pgbeat.delete_task($1);

-- name: pause_task
-- Pause a task (its pending run is cancelled).
SELECT * FROM pgbeat.api_pause_task($1);

-- name: resume_task
-- Resume a task at its next slot ($2: the next cron slot, for a cron task).
SELECT * FROM pgbeat.api_resume_task($1, $2);

-- name: trigger_task
-- Run a task now; returns its pending run.
SELECT * FROM pgbeat.api_trigger_task($1);

-- name: task_runs
-- One task's runs, newest first, before the cursor (P0002 for an id that never existed).
SELECT * FROM pgbeat.task_runs($1, $2, $3, $4);

-- name: list_runs
-- All runs newest first before the cursor, filtered by task, state, kind and slot range.
SELECT * FROM pgbeat.list_runs($1, $2, $3, $4, $5, $6, $7);

-- name: get_run
-- One run (no row: unknown).
SELECT * FROM pgbeat.get_run($1);

-- name: upcoming_slots
-- The next slots soonest first: pending runs and each active task's next slot, with what later slots follow from.
SELECT * FROM pgbeat.upcoming_slots($1, $2, $3);

-- name: metric_values
-- The gauges /metrics exports: (metric, label, value) rows.
SELECT metric, label, value FROM pgbeat.metric_values();

-- name: status_report
-- What GET /status shows: tasks by status, the backlog, recent lateness, the live daemons.
SELECT now, tasks, runs_pending, runs_running, runs_due, oldest_due_at, lateness_p50_ms, lateness_p95_ms,
       lateness_max_ms, lateness_runs, daemons
  FROM pgbeat.status_report();


-- ---------------------------------------------------------------- dashboard (/ui)

-- name: dashboard_status_counts
-- Tasks by status, one column each (FILTER, not GROUP BY: the status expression's groups
-- cannot be estimated, and the planner sorted 100,000 rows on disk instead of hashing four).
SELECT count(*) FILTER (WHERE status = 'active') AS active,
       count(*) FILTER (WHERE status = 'paused') AS paused,
       count(*) FILTER (WHERE status = 'complete') AS complete,
       count(*) FILTER (WHERE status = 'deleted') AS deleted,
       count(*) FILTER (WHERE status = 'error') AS error
  FROM pgbeat.task_status;

-- name: dashboard_minutes
-- Finished runs per minute since $1 and their lateness in ms (p50, p99 of first attempts), through runs_finished.
SELECT date_trunc('minute', r.finished_at) AS minute,
       count(*) FILTER (WHERE r.state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE r.state IN ('failed', 'timed_out', 'abandoned')) AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY r.lateness) FILTER (WHERE r.attempt = 1) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY r.lateness) FILTER (WHERE r.attempt = 1) AS p99
  FROM (SELECT finished_at, state, attempt,
               extract(epoch FROM started_at - scheduled_for) * 1000 AS lateness
          FROM pgbeat.runs
         WHERE finished_at >= $1 AND started_at IS NOT NULL) r
 GROUP BY 1 ORDER BY 1;

-- name: dashboard_failing
-- The 20 tasks that failed last whose last executed run failed, among the hour's last 5,000
-- failures (runs_failed: bounded, whatever the history's size or the hour's successes),
-- and how many tasks failed in that window.
WITH failures AS (
    SELECT r.task_id, r.finished_at FROM pgbeat.runs r
     WHERE r.state IN ('failed', 'timed_out', 'abandoned') AND r.finished_at > now() - interval '1 hour'
     ORDER BY r.finished_at DESC LIMIT 5000),
by_task AS (SELECT task_id, max(finished_at) AS failed_at FROM failures GROUP BY task_id)
SELECT t.id, t.name, t.kind, last.id AS run_id, last.state, last.error, last.finished_at,
       last.result ->> 'error_class' AS recorded_class, (SELECT count(*) FROM by_task) AS failing
  FROM (SELECT * FROM by_task ORDER BY failed_at DESC) f
 CROSS JOIN LATERAL (
       SELECT r.id, r.state, r.error, r.result, r.finished_at FROM pgbeat.runs r
        WHERE r.task_id = f.task_id AND r.state IN ('succeeded', 'failed', 'timed_out', 'abandoned')
        ORDER BY r.id DESC LIMIT 1) last
  JOIN pgbeat.tasks t ON t.id = f.task_id AND t.deleted_at IS NULL
 WHERE last.state IN ('failed', 'timed_out', 'abandoned')
 ORDER BY f.failed_at DESC
 LIMIT 20;

-- name: dashboard_daemons
-- Live daemons (their daemon lock is held, Rule 12) and the runs each worker has in hand.
SELECT d.id, d.role, d.host, d.pid, d.started_at, d.heartbeat_at, w.running, w.tasks
  FROM pgbeat.live_daemons d
  LEFT JOIN LATERAL (
       SELECT count(*) AS running, (array_agg(t.name ORDER BY r.started_at))[1:3] AS tasks
         FROM pgbeat.runs r JOIN pgbeat.tasks t ON t.id = r.task_id
        WHERE r.state = 'running' AND r.daemon_id = d.id) w ON true
 ORDER BY d.role, d.started_at;

-- name: dashboard_backlog
-- Due runs waiting for a worker (counted up to 10,001), the oldest due time, and runs executing now.
SELECT (SELECT count(*) FROM (SELECT 1 FROM pgbeat.runs WHERE state = 'pending' AND due_at <= now()
                               ORDER BY due_at LIMIT 10001) due) AS due,
       (SELECT min(due_at) FROM pgbeat.runs WHERE state = 'pending') AS oldest_due,
       (SELECT count(*) FROM pgbeat.runs WHERE state = 'running') AS running;

-- name: dashboard_recent_runs
-- The last $2 runs of each task in $1 (runs_task_history).
SELECT s.task_id, r.id, r.state, r.scheduled_for,
       extract(epoch FROM r.started_at - r.scheduled_for) * 1000 AS lateness_ms
  FROM unnest($1::integer[]) AS s(task_id)
 CROSS JOIN LATERAL (SELECT * FROM pgbeat.runs r WHERE r.task_id = s.task_id
                      ORDER BY r.id DESC LIMIT $2) r;

-- ---------------------------------------------------------------- pgbeat migrate (psycopg)

-- name: try_migration_lock
-- Take the migration lock (Rule 16) on this session if it is free; returns whether it was taken.
SELECT pg_try_advisory_lock(1885823597, 0) AS taken;

-- name: migration_lock
-- Wait for the migration lock (Rule 16) on this session: another migrate holds it.
SELECT pg_advisory_lock(1885823597, 0);

-- name: yoyo_lock_holders
-- How many rows yoyo's lock table holds (under the migration lock: each is a killed migrate's).
SELECT count(*) AS holders FROM yoyo_lock;

-- name: schema_kept_routines
-- pgbeat's functions a table depends on (CHECK constraint, column default, index), with their row versions.
-- They cannot be dropped with the others: they are kept, and a schema file must
-- replace them (CREATE OR REPLACE gives the row a new version).
SELECT p.oid::regprocedure::text AS routine, p.xmin::text AS version
  FROM pg_proc p
 WHERE p.pronamespace = 'pgbeat'::regnamespace
   AND EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
                  AND d.classid IN ('pg_constraint'::regclass, 'pg_attrdef'::regclass, 'pg_class'::regclass))
 ORDER BY 1;

-- name: schema_drop_objects
-- Before the schema files run: drop pgbeat's triggers, views and functions, but those a table depends on.
-- The files then create every one of them again, so the database holds exactly what
-- they define.
DO $$
DECLARE
    obj text;
BEGIN
    FOR obj IN SELECT format('%I ON %s', t.tgname, t.tgrelid::regclass)
                 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                WHERE c.relnamespace = 'pgbeat'::regnamespace AND NOT t.tgisinternal
    LOOP
        EXECUTE 'DROP TRIGGER ' || obj;
    END LOOP;
    -- CASCADE: views on views, and functions returning a view's rows (recreated too).
    FOR obj IN SELECT format('pgbeat.%I', c.relname) FROM pg_class c
                WHERE c.relnamespace = 'pgbeat'::regnamespace AND c.relkind IN ('v', 'm')
    LOOP
        EXECUTE 'DROP VIEW IF EXISTS ' || obj || ' CASCADE';
    END LOOP;
    FOR obj IN SELECT p.oid::regprocedure::text FROM pg_proc p
                WHERE p.pronamespace = 'pgbeat'::regnamespace
                  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                   WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
                                     AND d.classid IN ('pg_constraint'::regclass, 'pg_attrdef'::regclass,
                                                       'pg_class'::regclass))
    LOOP
        EXECUTE 'DROP ROUTINE ' || obj;
    END LOOP;
END $$;

-- name: register_kinds
-- Write the kind modules' declarations (%s: [{"name", "params", "counts"}, ...], psycopg) to pgbeat.kinds; delete the rest.
-- A kind no module declares any more cannot be deleted while tasks use it (their
-- foreign key): migrate then refuses.
WITH declared AS (
    SELECT d.name, d.params, d.counts FROM jsonb_to_recordset(%s::jsonb) AS d(name text, params jsonb, counts boolean)
), written AS (
    INSERT INTO pgbeat.kinds AS k (name, params, counts) SELECT * FROM declared
    ON CONFLICT (name) DO UPDATE SET params = excluded.params, counts = excluded.counts
)
DELETE FROM pgbeat.kinds k WHERE NOT EXISTS (SELECT 1 FROM declared d WHERE d.name = k.name);

-- name: schema_record_digest
-- Record which schema files the database now holds. A utility statement takes no parameters: {digest} is a literal composed by psycopg.sql.
COMMENT ON SCHEMA pgbeat IS {digest};

-- name: schema_digest
-- Which schema files the database holds (no row: no pgbeat schema; NULL: none recorded).
SELECT obj_description(n.oid, 'pg_namespace') AS digest FROM pg_namespace n WHERE n.nspname = 'pgbeat';
