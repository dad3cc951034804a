-- Views for psql users (and the API's reads): status, history, what comes next,
-- statistics, locks, live daemons. Durations and lateness in milliseconds;
-- history stays readable after a task is deleted (Rule 11).

-- A compact duration: 90 s -> '1m30s', 3600 s -> '1h', 1.5 s -> '1.5s'. PL/pgSQL:
-- a SQL function with a WITH clause cannot be inlined, so every statement that
-- showed a task planned it again.
CREATE OR REPLACE FUNCTION pgbeat.format_duration(p interval) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    total numeric := extract(epoch FROM p);
BEGIN
    RETURN coalesce(nullif(concat(
        CASE WHEN total >= 86400 THEN floor(total / 86400) || 'd' END,
        CASE WHEN floor(mod(total, 86400) / 3600) > 0 THEN floor(mod(total, 86400) / 3600) || 'h' END,
        CASE WHEN floor(mod(total, 3600) / 60) > 0 THEN floor(mod(total, 3600) / 60) || 'm' END,
        CASE WHEN mod(total, 60) > 0 THEN trim_scale(mod(total, 60)) || 's' END), ''), '0s');
END $$;

-- A task's schedule as the API shows it.
CREATE OR REPLACE FUNCTION pgbeat.schedule_json(t pgbeat.tasks) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN t.every IS NOT NULL THEN jsonb_build_object('every', pgbeat.format_duration(t.every),
                                                         'start', t.anchor)
        WHEN t.run_at IS NOT NULL THEN jsonb_build_object('at', t.run_at)
        ELSE jsonb_build_object('cron', t.cron, 'timezone', t.timezone)
    END
$$;

CREATE OR REPLACE VIEW pgbeat.task_status AS
SELECT t.id, t.name, t.kind, t.params, pgbeat.schedule_json(t) AS schedule,
       t.every, t.run_at, t.cron, t.timezone, t.until, t.max_runs, t.fired, t.timeout, t.paused,
       t.next_run_at, t.overlap_policy, t.misfire_policy, t.misfire_grace, t.max_retries, t.retry_backoff,
       CASE WHEN t.deleted_at IS NOT NULL THEN 'deleted'
            WHEN t.error IS NOT NULL THEN 'error'
            WHEN t.paused THEN 'paused'
            WHEN t.next_run_at IS NULL
                 AND NOT EXISTS (SELECT 1 FROM pgbeat.runs r
                                  WHERE r.task_id = t.id AND r.state IN ('pending', 'running')) THEN 'complete'
            ELSE 'active' END AS status,
       t.created_at, t.updated_at, t.deleted_at, t.error, t.error_at
  FROM pgbeat.tasks t;

CREATE OR REPLACE VIEW pgbeat.run_history AS
SELECT r.id, r.task_id, t.name AS task_name, r.kind, r.state, r.attempt, r.coalesced,
       r.scheduled_for, r.due_at, r.started_at, r.finished_at,
       round(extract(epoch FROM r.finished_at - r.started_at) * 1000, 3) AS duration_ms,
       round(extract(epoch FROM r.started_at - r.scheduled_for) * 1000, 3) AS lateness_ms,
       r.result, r.error, r.daemon_id, d.host AS worker_host, d.pid AS worker_pid,
       t.deleted_at IS NOT NULL AS task_deleted
  FROM pgbeat.runs r
  JOIN pgbeat.tasks t ON t.id = r.task_id
  LEFT JOIN pgbeat.daemons d ON d.id = r.daemon_id;

-- What comes next, soonest first: runs waiting for a worker, and each active
-- task's next slot with what its later slots follow from (the interval in
-- seconds, or the cron expression for croniter) and their bounds (until, how
-- many slots max_runs still allows). At most p_limit of each; the caller
-- expands the schedules and keeps the p_limit soonest. With p_task_id, that
-- task only (P0002 for an id that never existed; a deleted task has none).
CREATE OR REPLACE FUNCTION pgbeat.upcoming_slots(p_limit integer, p_until timestamptz DEFAULT NULL,
                                      p_task_id integer DEFAULT NULL)
RETURNS TABLE (task_id integer, task_name text, kind text, source text, run_id bigint,
               scheduled_for timestamptz, every_seconds double precision, cron text, timezone text,
               until timestamptz, remaining integer)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    IF p_task_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pgbeat.tasks t WHERE t.id = p_task_id) THEN
        PERFORM pgbeat.raise_not_found(p_task_id);
    END IF;
    RETURN QUERY
    (SELECT r.task_id, t.name, r.kind, 'pending'::text, r.id, r.due_at, NULL::double precision, NULL::text,
            NULL::text, NULL::timestamptz, 1
       FROM pgbeat.runs r JOIN pgbeat.tasks t ON t.id = r.task_id
      WHERE r.state = 'pending' AND (p_task_id IS NULL OR r.task_id = p_task_id)
        AND (p_until IS NULL OR r.due_at <= p_until)
      ORDER BY r.due_at, r.id
      LIMIT p_limit)
    UNION ALL
    (SELECT t.id, t.name, t.kind, 'scheduled'::text, NULL::bigint, t.next_run_at,
            extract(epoch FROM t.every)::double precision, t.cron, t.timezone, t.until, t.max_runs - t.fired
       FROM pgbeat.tasks t
      WHERE NOT t.paused AND t.next_run_at IS NOT NULL AND (p_task_id IS NULL OR t.id = p_task_id)
        AND (p_until IS NULL OR t.next_run_at <= p_until)
      ORDER BY t.next_run_at, t.id
      LIMIT p_limit);
END $$;

-- What runs next: runs waiting for a worker, then each active task's next slot
-- (upcoming_slots, the one place that says so; the API expands later slots).
CREATE OR REPLACE VIEW pgbeat.upcoming_runs AS
SELECT u.task_id, u.task_name, u.kind, u.scheduled_for AS run_at, u.source, u.run_id
  FROM pgbeat.upcoming_slots(NULL) u;

CREATE OR REPLACE VIEW pgbeat.task_stats AS
SELECT t.id AS task_id, t.name AS task_name, t.kind,
       count(r.id) AS runs,
       count(r.id) FILTER (WHERE r.state = 'succeeded') AS succeeded,
       count(r.id) FILTER (WHERE r.state = 'failed') AS failed,
       count(r.id) FILTER (WHERE r.state = 'timed_out') AS timed_out,
       count(r.id) FILTER (WHERE r.state = 'abandoned') AS abandoned,
       count(r.id) FILTER (WHERE r.state = 'cancelled') AS cancelled,
       count(r.id) FILTER (WHERE r.state = 'skipped') AS skipped,
       count(r.id) FILTER (WHERE r.state = 'pending') AS pending,
       count(r.id) FILTER (WHERE r.state = 'running') AS running,
       coalesce(sum(r.coalesced), 0) AS coalesced_slots,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM r.finished_at - r.started_at))
              FILTER (WHERE r.state = 'succeeded'))::numeric * 1000, 3) AS p50_duration_ms,
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM r.finished_at - r.started_at))
              FILTER (WHERE r.state = 'succeeded'))::numeric * 1000, 3) AS p95_duration_ms,
       max(r.started_at) AS last_started_at,
       (SELECT l.state FROM pgbeat.runs l WHERE l.task_id = t.id AND l.started_at IS NOT NULL
         ORDER BY l.id DESC LIMIT 1) AS last_state
  FROM pgbeat.tasks t
  LEFT JOIN pgbeat.runs r ON r.task_id = t.id
 GROUP BY t.id;

-- Who holds which task lock now, and what it is running.
CREATE OR REPLACE VIEW pgbeat.task_locks AS
SELECT l.objid::bigint::integer AS task_id, t.name AS task_name, l.pid AS backend_pid,
       d.id AS daemon_id, d.host, d.pid AS worker_pid,
       r.id AS run_id, r.started_at, now() - r.started_at AS running_for
  FROM pg_locks l
  LEFT JOIN pgbeat.tasks t ON t.id = l.objid::bigint::integer
  -- the daemon living on that session now (a dead one may have had the same pid)
  LEFT JOIN pgbeat.daemons d ON d.backend_pid = l.pid AND d.stopped_at IS NULL
       AND EXISTS (SELECT 1 FROM pg_locks dl
                    WHERE dl.locktype = 'advisory' AND dl.granted AND dl.pid = l.pid
                      AND dl.classid = pgbeat.daemon_lock_ns()::oid AND dl.objsubid = 2
                      AND dl.objid = d.id::oid)
  LEFT JOIN pgbeat.runs r ON r.task_id = t.id AND r.state = 'running' AND r.backend_pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted
   AND l.classid = pgbeat.task_lock_ns()::oid AND l.objsubid = 2
   -- pg_locks spans the server: another database's task 1 is not ours
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());

-- Daemons alive now: those whose lock is held (not guessed from a heartbeat).
CREATE OR REPLACE VIEW pgbeat.live_daemons AS
SELECT d.id, d.role, d.host, d.pid, d.backend_pid, d.started_at, d.heartbeat_at,
       now() - d.heartbeat_at AS since_heartbeat
  FROM pgbeat.daemons d
 WHERE EXISTS (SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted
                  AND l.classid = pgbeat.daemon_lock_ns()::oid AND l.objsubid = 2
                  AND l.objid = d.id::oid
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()));
