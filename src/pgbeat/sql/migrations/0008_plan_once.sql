-- depends: 0007_api
--
-- The functions called for every batch, cheaper per call. A SQL-language function
-- that is not inlined is planned again at every call, and a PL/pgSQL statement
-- may be too (custom plans); at a thousand calls a second planning cost more than
-- the work. So:
--   held_task_locks, next_pending_due_at, next_due_at
--                become PL/pgSQL: their query is planned once per session;
--   claim_runs   returns its runs in claim order, (due_at, id), by sorting them
--                (array_position per row was a scan of the array), and no longer
--                re-checks each candidate against the locks it took in the same
--                loop (one pending run per task: none can repeat).
--   finish_runs  checks the outcomes in one pass over the arrays (p_results[i]
--                walks a variable-length array from its start each time), and
--                keeps only the failed runs for schedule_retry, not every row.
--   both         plan their statements once per session (plan_cache_mode): the
--                plans never depend on the arrays' contents, and re-planning the
--                finish statement cost more than running it for a handful of runs.
--                They join by primary key only (nested loops: no merge or hash
--                join), because a plan made while `runs` was small would otherwise
--                keep merge-joining a handful of ids against the whole table.
--   release_and_claim_runs
--                (new) the locks of runs whose outcomes committed earlier, then a
--                claim, in one call: a worker's cycle is finish, then release and
--                claim, two round trips instead of three.
--   materialize_due_runs
--                never scans all tasks (its fast path hash-joined a seq scan of
--                every task to fire two of them): no seq scan, no merge join. Hash
--                joins stay: its result joins two CTEs, which have no index.
-- Same arguments, results and rules as in 0003_scheduling.sql and 0004_workers.sql.

CREATE OR REPLACE FUNCTION pgbeat.claim_runs(p_daemon_id integer, p_limit integer DEFAULT 1)
RETURNS TABLE (run_id bigint, task_id integer, kind text, params jsonb, timeout double precision,
               scheduled_for timestamptz, attempt integer, started_at timestamptz)
LANGUAGE plpgsql SET enable_sort = off SET enable_seqscan = off SET jit = off
    SET enable_mergejoin = off SET enable_hashjoin = off SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    held integer[] := pgbeat.held_task_locks();
    c record;
    run_ids bigint[] := '{}';
    task_ids integer[] := '{}';
    orphans bigint[];
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        PERFORM pgbeat.raise_invalid('limit', 'must be at least 1');
    END IF;
    FOR c IN SELECT r.id, r.task_id FROM pgbeat.runs r
              WHERE r.state = 'pending' AND r.due_at <= now()
              ORDER BY r.due_at, r.id
              FOR UPDATE SKIP LOCKED
    LOOP
        -- (A task has one pending run at most, so held need not grow in the loop.)
        CONTINUE WHEN c.task_id = ANY (held);
        CONTINUE WHEN NOT pg_try_advisory_lock(pgbeat.task_lock_ns(), c.task_id);
        run_ids := run_ids || c.id;
        task_ids := task_ids || c.task_id;
        EXIT WHEN cardinality(run_ids) = p_limit;
    END LOOP;
    IF cardinality(run_ids) = 0 THEN
        RETURN;
    END IF;
    -- Holding the locks proves that any run of these tasks still marked
    -- running lost its worker (rule 5).
    orphans := ARRAY(SELECT r.id FROM pgbeat.runs r WHERE r.task_id = ANY (task_ids) AND r.state = 'running');
    IF cardinality(orphans) > 0 THEN
        PERFORM pgbeat.abandon_runs(orphans, 'worker lost its database session');
    END IF;
    -- The rows are still pending: the loop's FOR UPDATE locked each one as pending
    -- and holds it to the end of this transaction. Return them in claim order.
    RETURN QUERY
    WITH started AS (
        UPDATE pgbeat.runs r
           SET state = 'running', started_at = clock_timestamp(), daemon_id = p_daemon_id,
               backend_pid = pg_backend_pid()
          FROM pgbeat.tasks t
         WHERE r.id = ANY (run_ids) AND t.id = r.task_id
        RETURNING r.id, r.task_id, r.kind, t.params, t.timeout, r.scheduled_for, r.attempt, r.started_at,
                  r.due_at)
    SELECT s.id, s.task_id, s.kind, s.params, s.timeout, s.scheduled_for, s.attempt, s.started_at
      FROM started s ORDER BY s.due_at, s.id;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.finish_runs(p_run_ids bigint[], p_states text[], p_results jsonb[], p_errors text[])
RETURNS TABLE (run_id bigint, task_id integer, state text, result jsonb, applied boolean)
-- (runs by id, whatever the statistics say)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET enable_mergejoin = off SET enable_hashjoin = off SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    bad integer;
    done_ids bigint[];
    done pgbeat.runs[];
    r pgbeat.runs;
BEGIN
    IF cardinality(p_run_ids) IS DISTINCT FROM cardinality(p_states)
       OR cardinality(p_run_ids) IS DISTINCT FROM cardinality(p_results)
       OR cardinality(p_run_ids) IS DISTINCT FROM cardinality(p_errors) THEN
        PERFORM pgbeat.raise_invalid('runs', 'ids, states, results and errors must have the same length');
    END IF;
    -- Every outcome is checked before anything is written; the first bad one is reported.
    SELECT u.ord INTO bad FROM unnest(p_states, p_results) WITH ORDINALITY AS u(state, result, ord)
     WHERE u.state IS NULL OR u.state NOT IN ('succeeded', 'failed', 'timed_out', 'cancelled')
        OR (u.result IS NOT NULL AND jsonb_typeof(u.result) <> 'object')
     ORDER BY u.ord LIMIT 1;
    IF bad IS NOT NULL THEN
        IF p_states[bad] IS NULL OR p_states[bad] NOT IN ('succeeded', 'failed', 'timed_out', 'cancelled') THEN
            PERFORM pgbeat.raise_invalid('state', format('%s is not a finished state (succeeded, failed, timed_out, cancelled)',
                                                          coalesce(p_states[bad], 'null')));
        END IF;
        PERFORM pgbeat.raise_invalid('result', 'must be a JSON object');
    END IF;
    -- Lock the runs in id order (finishers never deadlock), then finish in one
    -- statement those still running on this session. A repeated id is finished by
    -- its first occurrence. Counters are incremented in name order, once per
    -- counter, and each run's result shows the value its own increment reached.
    PERFORM 1 FROM pgbeat.runs WHERE id = ANY (p_run_ids) ORDER BY id FOR UPDATE;
    WITH mine AS (
        SELECT DISTINCT ON (u.id) u.id, u.state, coalesce(u.result, '{}') AS result, u.error, u.ord,
               CASE WHEN rn.kind = 'counter' AND u.state = 'succeeded'
                    THEN coalesce(t.params->>'counter', 'task:' || rn.task_id) END AS counter_name,
               (t.params->>'step')::bigint AS step
          FROM unnest(p_run_ids, p_states, p_results, p_errors) WITH ORDINALITY AS u(id, state, result, error, ord)
          CROSS JOIN LATERAL (SELECT * FROM pgbeat.runs WHERE id = u.id OFFSET 0) rn  -- by primary key, one per id
          JOIN pgbeat.tasks t ON t.id = rn.task_id
         WHERE rn.state = 'running' AND rn.backend_pid = pg_backend_pid()
         ORDER BY u.id, u.ord
    ), counted AS (
        INSERT INTO pgbeat.counters AS c (name, value)
        SELECT m.counter_name, sum(m.step)::bigint FROM mine m
         WHERE m.counter_name IS NOT NULL GROUP BY m.counter_name ORDER BY m.counter_name
        ON CONFLICT (name) DO UPDATE SET value = c.value + excluded.value, updated_at = now()
        RETURNING c.name, c.value
    ), outcomes AS (
        SELECT m.*, CASE WHEN m.counter_name IS NULL THEN m.result
                         ELSE m.result || jsonb_build_object('counter', m.counter_name, 'step', m.step,
                             'value', k.value - coalesce(sum(m.step) OVER (PARTITION BY m.counter_name ORDER BY m.ord
                                                 ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)) END AS final
          FROM mine m LEFT JOIN counted k ON k.name = m.counter_name
    ), finished AS (
        UPDATE pgbeat.runs rn
           SET state = o.state, finished_at = greatest(clock_timestamp(), rn.started_at),
               result = o.final, error = o.error
          FROM outcomes o
         WHERE rn.id = o.id
        RETURNING rn.id, rn
    )
    SELECT array_agg(f.id), array_agg(f.rn) FILTER (WHERE (f.rn).state IN ('failed', 'timed_out'))
      INTO done_ids, done FROM finished f;
    FOREACH r IN ARRAY coalesce(done, '{}') LOOP
        PERFORM pgbeat.schedule_retry(r);
    END LOOP;
    RETURN QUERY
    SELECT u.id, rn.task_id, rn.state, rn.result,
           coalesce(u.id = ANY (done_ids) AND u.ord = min(u.ord) OVER (PARTITION BY u.id), false)
      FROM unnest(p_run_ids) WITH ORDINALITY AS u(id, ord)
      LEFT JOIN LATERAL (SELECT * FROM pgbeat.runs WHERE id = u.id OFFSET 0) rn ON true
     ORDER BY u.ord;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.held_task_locks() RETURNS integer[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(objid::bigint::integer), '{}') FROM pg_locks
             WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
               AND classid = pgbeat.task_lock_ns()::oid AND objsubid = 2);
END $$;

-- (Two statements, so that each is planned as an index range scan on runs_pending_due.)
CREATE OR REPLACE FUNCTION pgbeat.next_pending_due_at(p_after timestamptz DEFAULT NULL) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_after IS NULL THEN
        RETURN (SELECT min(due_at) FROM pgbeat.runs WHERE state = 'pending');
    END IF;
    RETURN (SELECT min(due_at) FROM pgbeat.runs WHERE state = 'pending' AND due_at > p_after);
END $$;

CREATE OR REPLACE FUNCTION pgbeat.next_due_at() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT min(next_run_at) FROM pgbeat.tasks WHERE NOT paused AND next_run_at IS NOT NULL);
END $$;

-- release_task_locks(p_release), then claim_runs(p_daemon_id, p_limit). The caller
-- passes only tasks whose runs' outcomes have committed (rule 2's order is kept:
-- finish commits, then the unlock). An unlock is not undone if the claim fails.
CREATE FUNCTION pgbeat.release_and_claim_runs(p_release integer[], p_daemon_id integer, p_limit integer)
RETURNS TABLE (run_id bigint, task_id integer, kind text, params jsonb, timeout double precision,
               scheduled_for timestamptz, attempt integer, started_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_release) > 0 THEN
        PERFORM pgbeat.release_task_locks(p_release);
    END IF;
    RETURN QUERY SELECT * FROM pgbeat.claim_runs(p_daemon_id, p_limit);
END $$;

ALTER FUNCTION pgbeat.materialize_due_runs(integer) SET enable_seqscan = off SET enable_mergejoin = off;
