-- The REST API's calls, usable from psql as well: tasks and runs as the API shows
-- them, keyset-paginated lists, the gauges behind /metrics, and the task
-- operations of 20_tasks.sql wrapped so that one call both writes and returns the
-- row as the API shows it (the re-read runs in a later statement of the same
-- transaction, so it sees the write). "Upcoming" is upcoming_slots (60_views.sql).

-- A task as the API shows it (the request bodies use the same names).
CREATE OR REPLACE VIEW pgbeat.api_tasks AS
SELECT s.id, s.name, s.kind, s.params, s.schedule, s.timeout, s.paused, s.next_run_at,
       s.until, s.max_runs, s.fired, s.overlap_policy AS overlap, s.misfire_policy AS misfire,
       s.misfire_grace, s.max_retries, s.retry_backoff, s.status, s.created_at, s.updated_at, s.deleted_at,
       s.error, s.error_at
  FROM pgbeat.task_status s;

-- A run as the API shows it: durations and lateness in milliseconds.
CREATE OR REPLACE VIEW pgbeat.api_runs AS
SELECT h.id, h.task_id, h.task_name, h.kind, h.scheduled_for, h.due_at, h.started_at, h.finished_at,
       h.state, h.attempt, h.coalesced, h.result, h.error,
       h.duration_ms::double precision AS duration_ms, h.lateness_ms::double precision AS lateness_ms,
       h.worker_host
  FROM pgbeat.run_history h;

-- A task (a deleted one too: its record stays readable) with its last finished
-- (or running) run and its pending run.
CREATE OR REPLACE VIEW pgbeat.api_task_details AS
SELECT t.*,
       (SELECT to_jsonb(r) FROM pgbeat.api_runs r
         WHERE r.task_id = t.id AND r.state <> 'pending' ORDER BY r.id DESC LIMIT 1) AS last_run,
       (SELECT to_jsonb(r) FROM pgbeat.api_runs r
         WHERE r.task_id = t.id AND r.state = 'pending' LIMIT 1) AS pending_run
  FROM pgbeat.api_tasks t;

-- One task as GET /tasks/{id} shows it, deleted ones included (no row: unknown).
CREATE OR REPLACE FUNCTION pgbeat.get_task(p_id integer) RETURNS SETOF pgbeat.api_task_details
LANGUAGE sql STABLE AS $$
    SELECT * FROM pgbeat.api_task_details WHERE id = p_id
$$;

-- One run as GET /runs/{id} shows it.
CREATE OR REPLACE FUNCTION pgbeat.get_run(p_id bigint) RETURNS SETOF pgbeat.api_runs
LANGUAGE sql STABLE AS $$
    SELECT * FROM pgbeat.api_runs WHERE id = p_id
$$;

-- Tasks in id order, p_limit at a time after the cursor p_after_id (keyset:
-- tasks created meanwhile land after the last page, none is seen twice).
-- Without p_status, deleted tasks are left out. Each with its last and pending run.
-- p_name matches part of the name, ignoring case, taken literally (% _ \ included).
-- EXECUTE ... USING: planned at each call with the caller's values, so the filters
-- not given fold away and the others can use their index (a prepared statement's
-- generic plan kept them all and walked every task in id order: over 100 ms at
-- 100,000 tasks). A status uses its partial index through the column conditions
-- task_status gives it (the view still decides); part of the name is looked up in
-- task_names, by its trigram index where there is one (0006_task_names.sql).
CREATE OR REPLACE FUNCTION pgbeat.list_tasks(p_kind text DEFAULT NULL, p_status text DEFAULT NULL,
                                  p_paused boolean DEFAULT NULL, p_name text DEFAULT NULL,
                                  p_after_id integer DEFAULT 0, p_limit integer DEFAULT 100)
RETURNS SETOF pgbeat.api_task_details
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- The name's condition only when a name is given: behind an OR it could not be
    -- a join, and the list walked every task testing each against the names found.
    RETURN QUERY EXECUTE format($q$
    SELECT * FROM pgbeat.api_task_details t
     WHERE t.id > coalesce($5, 0)
       AND ($1 IS NULL OR t.kind = $1)
       AND CASE WHEN $2 IS NULL THEN t.deleted_at IS NULL ELSE t.status = $2 END
       AND CASE $2 WHEN 'deleted' THEN t.deleted_at IS NOT NULL
                   WHEN 'error' THEN t.deleted_at IS NULL AND t.error IS NOT NULL
                   WHEN 'paused' THEN t.deleted_at IS NULL AND t.error IS NULL AND t.paused
                   WHEN 'complete' THEN t.deleted_at IS NULL AND t.error IS NULL AND NOT t.paused
                                        AND t.next_run_at IS NULL
                   WHEN 'active' THEN t.deleted_at IS NULL AND t.error IS NULL AND NOT t.paused
                   ELSE true END
       AND ($3 IS NULL OR t.paused = $3)
       %s
     ORDER BY t.id
     LIMIT $6
    $q$, CASE WHEN p_name IS NOT NULL THEN
        $n$AND t.id IN (SELECT n.task_id FROM pgbeat.task_names n
                         WHERE n.name LIKE '%' || replace(replace(replace(lower($4), '\', '\\'), '%', '\%'), '_', '\_') || '%')$n$
    ELSE '' END)
    USING p_kind, p_status, p_paused, p_name, p_after_id, p_limit;
END $$;

-- task_names follows the tasks' names (lowered): every inserted task, in one statement
-- however many; a renamed one, row by row (only an UPDATE that sets name fires it).
CREATE OR REPLACE FUNCTION pgbeat.record_task_names() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        INSERT INTO pgbeat.task_names (task_id, name) SELECT n.id, lower(n.name) FROM new_rows n;
    ELSE
        UPDATE pgbeat.task_names SET name = lower(NEW.name) WHERE task_id = NEW.id;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER tasks_inserted_names AFTER INSERT ON pgbeat.tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgbeat.record_task_names();

CREATE OR REPLACE TRIGGER tasks_renamed AFTER UPDATE OF name ON pgbeat.tasks
    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name) EXECUTE FUNCTION pgbeat.record_task_names();

-- Runs newest first, p_limit at a time before the cursor p_before_id; the time
-- range applies to scheduled_for. P0002 for a p_task_id that never existed (a
-- deleted task keeps its history).
CREATE OR REPLACE FUNCTION pgbeat.list_runs(p_task_id integer DEFAULT NULL, p_state text DEFAULT NULL,
                                 p_kind text DEFAULT NULL, p_since timestamptz DEFAULT NULL,
                                 p_until timestamptz DEFAULT NULL, p_before_id bigint DEFAULT NULL,
                                 p_limit integer DEFAULT 100)
RETURNS SETOF pgbeat.api_runs
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_task_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pgbeat.tasks WHERE id = p_task_id) THEN
        PERFORM pgbeat.raise_not_found(p_task_id);
    END IF;
    RETURN QUERY
    SELECT * FROM pgbeat.api_runs r
     WHERE (p_before_id IS NULL OR r.id < p_before_id)
       AND (p_task_id IS NULL OR r.task_id = p_task_id)
       AND (p_state IS NULL OR r.state = p_state)
       AND (p_kind IS NULL OR r.kind = p_kind)
       AND (p_since IS NULL OR r.scheduled_for >= p_since)
       AND (p_until IS NULL OR r.scheduled_for < p_until)
     ORDER BY r.id DESC
     LIMIT p_limit;
END $$;

-- The history of one task (deleted tasks keep theirs); P0002 for an id that never existed.
CREATE OR REPLACE FUNCTION pgbeat.task_runs(p_task_id integer, p_state text DEFAULT NULL,
                                 p_before_id bigint DEFAULT NULL, p_limit integer DEFAULT 100)
RETURNS SETOF pgbeat.api_runs
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgbeat.tasks WHERE id = p_task_id) THEN
        PERFORM pgbeat.raise_not_found(p_task_id);
    END IF;
    RETURN QUERY SELECT * FROM pgbeat.list_runs(p_task_id, p_state, NULL, NULL, NULL, p_before_id, p_limit);
END $$;

CREATE OR REPLACE FUNCTION pgbeat.api_update_task(p_id integer, p_changes jsonb, p_first_slot timestamptz DEFAULT NULL)
RETURNS SETOF pgbeat.api_tasks
LANGUAGE plpgsql AS $$
DECLARE
    t pgbeat.tasks;
BEGIN
    t := pgbeat.update_task(p_id, p_changes, p_first_slot);
    RETURN QUERY SELECT * FROM pgbeat.api_tasks WHERE id = t.id;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.api_pause_task(p_id integer) RETURNS SETOF pgbeat.api_tasks
LANGUAGE plpgsql AS $$
DECLARE
    t pgbeat.tasks;
BEGIN
    t := pgbeat.pause_task(p_id);
    RETURN QUERY SELECT * FROM pgbeat.api_tasks WHERE id = t.id;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.api_resume_task(p_id integer, p_next_cron_slot timestamptz DEFAULT NULL)
RETURNS SETOF pgbeat.api_tasks
LANGUAGE plpgsql AS $$
DECLARE
    t pgbeat.tasks;
BEGIN
    t := pgbeat.resume_task(p_id, p_next_cron_slot);
    RETURN QUERY SELECT * FROM pgbeat.api_tasks WHERE id = t.id;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.api_trigger_task(p_id integer) RETURNS SETOF pgbeat.api_runs
LANGUAGE plpgsql AS $$
DECLARE
    r pgbeat.runs;
BEGIN
    r := pgbeat.trigger_task(p_id);
    RETURN QUERY SELECT * FROM pgbeat.api_runs WHERE id = r.id;
END $$;

-- Several task creations in one call and one transaction. The API sends the
-- creations that arrive while an earlier one is in flight together
-- (pgbeat.api.creations): a transaction's commit, not its inserts, is what a
-- creation costs. Each spec is created exactly as create_task creates it; if any
-- is refused, nothing is written and the caller creates them one at a time, so
-- that each gets its own answer.
CREATE OR REPLACE FUNCTION pgbeat.api_create_tasks(p_specs jsonb[], p_first_slots timestamptz[])
RETURNS SETOF pgbeat.api_tasks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    ids integer[] := '{}';
BEGIN
    IF cardinality(p_specs) IS DISTINCT FROM cardinality(p_first_slots) THEN
        PERFORM pgbeat.raise_invalid('tasks', 'specs and first slots must have the same length');
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_specs), 0) LOOP
        ids := ids || (pgbeat.create_task(p_specs[i], p_first_slots[i])).id;
    END LOOP;
    -- In the order given.
    RETURN QUERY SELECT t.* FROM unnest(ids) WITH ORDINALITY AS u(id, ord)
                   JOIN pgbeat.api_tasks t ON t.id = u.id
                  ORDER BY u.ord;
END $$;

-- The gauges /metrics reads at scrape time: (metric, label, value) rows, every
-- label present (zero when nothing matches). "Recent" is the last p_window.
CREATE OR REPLACE FUNCTION pgbeat.metric_values(p_window interval DEFAULT interval '5 minutes')
RETURNS TABLE (metric text, label text, value double precision)
LANGUAGE sql STABLE AS $$
    SELECT 'tasks', s.status, count(t.id)::double precision
      FROM unnest(ARRAY['active', 'paused', 'complete', 'deleted', 'error']) AS s(status)
      LEFT JOIN pgbeat.task_status t ON t.status = s.status
     GROUP BY s.status
    UNION ALL
    SELECT 'runs_pending', '', count(*) FROM pgbeat.runs WHERE state = 'pending'
    UNION ALL
    SELECT 'runs_running', '', count(*) FROM pgbeat.runs WHERE state = 'running'
    UNION ALL
    SELECT 'runs_finished_recent', s.state, count(r.id)
      FROM unnest(ARRAY['succeeded', 'failed', 'timed_out', 'abandoned', 'cancelled', 'skipped']) AS s(state)
      LEFT JOIN pgbeat.runs r ON r.state = s.state AND r.finished_at > now() - p_window
     GROUP BY s.state
    UNION ALL
    SELECT 'run_start_delay_seconds', q.quantile, coalesce(q.seconds, 0)
      FROM (SELECT percentile_cont(ARRAY[0.5, 0.95, 1.0]) WITHIN GROUP
                   (ORDER BY extract(epoch FROM r.started_at - r.due_at)) AS p
              FROM pgbeat.runs r
             WHERE r.finished_at > now() - p_window
               AND r.state IN ('succeeded', 'failed', 'timed_out', 'abandoned')) d,
           LATERAL (VALUES ('0.5', d.p[1]), ('0.95', d.p[2]), ('1', d.p[3])) AS q(quantile, seconds)
    UNION ALL
    SELECT 'daemons_live', s.role, count(d.id)
      FROM unnest(ARRAY['scheduler', 'worker']) AS s(role)
      LEFT JOIN pgbeat.live_daemons d ON d.role = s.role
     GROUP BY s.role
$$;

-- What GET /status (and `pgbeat status`) shows, in one row: tasks by status (the
-- statuses that have tasks); the
-- runs waiting (pending), executing (running) and the backlog (pending and due,
-- with the oldest due time); the lateness (started - scheduled, ms) of runs
-- started within p_window; and the live daemons (Rule 12: holding their lock).
CREATE OR REPLACE FUNCTION pgbeat.status_report(p_window interval DEFAULT interval '5 minutes')
RETURNS TABLE (now timestamptz, tasks jsonb, runs_pending bigint, runs_running bigint, runs_due bigint,
               oldest_due_at timestamptz, lateness_p50_ms double precision,
               lateness_p95_ms double precision, lateness_max_ms double precision, lateness_runs bigint,
               daemons jsonb)
LANGUAGE sql STABLE AS $$
    SELECT now(),
           (SELECT coalesce(jsonb_object_agg(c.status, c.n), '{}')
              FROM (SELECT t.status, count(*) AS n FROM pgbeat.task_status t GROUP BY t.status) c),
           (SELECT count(*) FROM pgbeat.runs WHERE state = 'pending'),
           (SELECT count(*) FROM pgbeat.runs WHERE state = 'running'),
           (SELECT count(*) FROM pgbeat.runs WHERE state = 'pending' AND due_at <= now()),
           (SELECT min(due_at) FROM pgbeat.runs WHERE state = 'pending' AND due_at <= now()),
           l.p[1], l.p[2], l.p[3], l.n,
           (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'id', d.id, 'role', d.role, 'host', d.host, 'pid', d.pid, 'started_at', d.started_at,
                       'since_heartbeat_s', extract(epoch FROM d.since_heartbeat)) ORDER BY d.id), '[]')
              FROM pgbeat.live_daemons d)
      FROM (SELECT percentile_cont(ARRAY[0.5, 0.95, 1.0]) WITHIN GROUP
                   (ORDER BY extract(epoch FROM r.started_at - r.scheduled_for) * 1000) AS p,
                   count(*) AS n
              FROM pgbeat.runs r
             WHERE r.started_at > now() - p_window) l
$$;
