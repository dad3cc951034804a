-- Claims: how a worker takes runs, records them and lets go (Rules 2, 4, 5, 9, 14).
-- The lock protocol, all on the worker's own session:
--   claim_runs          takes pg_try_advisory_lock(task_lock_ns(), task_id) and marks the run running
--   ...the run executes while the session holds the lock...
--   finish_runs         commits the outcome (and a counter's increment, Rule 4)
--   release_task_locks  unlocks, after that commit (Rule 2)
-- A worker that dies loses its session, PostgreSQL frees its locks, and a run
-- still 'running' without its lock is abandoned (Rule 5): by reap_abandoned_runs,
-- or by the next claim of that task, whichever comes first.
--
-- These run for every batch, so they are planned once per session: PL/pgSQL
-- rather than SQL functions that cannot be inlined (planned again at each call),
-- and the hot ones fix their plans (plan_cache_mode = force_generic_plan; index
-- scans and nested loops by primary key only): the queue grows from a few rows to
-- many thousands within seconds, faster than statistics follow, and a plan made
-- while `runs` was small would otherwise keep scanning or merge-joining it.

CREATE OR REPLACE FUNCTION pgbeat.task_lock_ns() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1885823604 $$;  -- 'pgbt'

-- The task locks this session holds now.
CREATE OR REPLACE FUNCTION pgbeat.held_task_locks() RETURNS integer[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(objid::bigint::integer), '{}') FROM pg_locks
             WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
               AND classid = pgbeat.task_lock_ns()::oid AND objsubid = 2);
END $$;

-- Queue the next attempt of a run that failed, timed out or was abandoned, if
-- its task allows retries; backoff doubles each attempt. A task that already
-- has a pending run needs no retry: that run is next. Rule 3 across partitions:
-- the task's row is locked before that pending run is looked for (as every writer
-- of a pending run does), since runs_one_pending is each partition's own.
CREATE OR REPLACE FUNCTION pgbeat.schedule_retry(r pgbeat.runs) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t pgbeat.tasks;
    new_id bigint;
BEGIN
    -- A run whose result says a retry cannot help (an http 4xx, a refused destination,
    -- an oversized body: pgbeat.kinds.http) is not retried.
    IF r.state NOT IN ('failed', 'timed_out', 'abandoned') OR r.result->'retry' = 'false'::jsonb THEN
        RETURN NULL;
    END IF;
    SELECT * INTO t FROM pgbeat.tasks WHERE id = r.task_id AND deleted_at IS NULL AND NOT paused
       FOR NO KEY UPDATE;
    IF NOT FOUND OR r.attempt > t.max_retries
       OR EXISTS (SELECT 1 FROM pgbeat.runs p WHERE p.task_id = r.task_id AND p.state = 'pending') THEN
        RETURN NULL;
    END IF;
    INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at, attempt)
    VALUES (r.task_id, r.kind, r.scheduled_for,
            -- (doubling, but never more than a day: 2^100 backoffs would leave the range of times)
            greatest(r.scheduled_for, now() + make_interval(secs => least(t.retry_backoff * 2 ^ least(r.attempt - 1, 60),
                                                                          86400))),
            r.attempt + 1)
    ON CONFLICT DO NOTHING
    RETURNING id INTO new_id;
    RETURN new_id;
END $$;

-- Mark the task's running runs abandoned. Only called when the caller knows no
-- session holds the task's lock for them.
CREATE OR REPLACE FUNCTION pgbeat.abandon_runs(p_run_ids bigint[], p_reason text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r pgbeat.runs;
    n integer := 0;
    task_ids integer[] := '{}';
BEGIN
    FOR r IN UPDATE pgbeat.runs
                SET state = 'abandoned', finished_at = greatest(now(), started_at), error = p_reason
              WHERE id = ANY (p_run_ids) AND state = 'running'
             RETURNING *
    LOOP
        PERFORM pgbeat.schedule_retry(r);
        task_ids := task_ids || r.task_id;
        n := n + 1;
    END LOOP;
    -- A run that waited behind an abandoned one (coalesced slots send no
    -- notification) can start now: wake the workers, as release_task_locks does.
    IF EXISTS (SELECT 1 FROM pgbeat.runs WHERE runs.task_id = ANY (task_ids) AND state = 'pending'
                                          AND due_at <= now()) THEN
        PERFORM pg_notify('pgbeat_worker', '');
    END IF;
    RETURN n;
END $$;

-- Claim up to p_limit due pending runs for the calling session's worker.
-- For each candidate row (locked FOR UPDATE SKIP LOCKED, so two claimers never
-- look at the same row at once) the task lock is tried in the loop body, never
-- in a WHERE clause, so a lock is only ever taken for a run this call returns.
-- Tasks whose lock this session already holds are skipped: locks stack, and a
-- second claim would let one task overlap itself on one worker (Rule 2).
-- The loop only takes locks; the runs are then marked running in one statement,
-- and returned in claim order, (due_at, id). No sort, no seq scan, no JIT: the
-- candidates come from runs_pending_due in order, and JIT never pays for itself
-- on statements this small.
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
    run_slots timestamptz[] := '{}';
    task_ids integer[] := '{}';
    orphans bigint[];
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        PERFORM pgbeat.raise_invalid('limit', 'must be at least 1');
    END IF;
    FOR c IN SELECT r.id, r.task_id, r.scheduled_for FROM pgbeat.runs r
              WHERE r.state = 'pending' AND r.due_at <= now()
              ORDER BY r.due_at, r.id
              FOR UPDATE SKIP LOCKED
    LOOP
        -- (A task has one pending run at most, so held need not grow in the loop.)
        CONTINUE WHEN c.task_id = ANY (held);
        CONTINUE WHEN NOT pg_try_advisory_lock(pgbeat.task_lock_ns(), c.task_id);
        run_ids := run_ids || c.id;
        run_slots := run_slots || c.scheduled_for;
        task_ids := task_ids || c.task_id;
        EXIT WHEN cardinality(run_ids) = p_limit;
    END LOOP;
    IF cardinality(run_ids) = 0 THEN
        RETURN;
    END IF;
    -- Holding the locks proves that any run of these tasks still marked
    -- running lost its worker (Rule 5).
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
          FROM unnest(run_ids, run_slots) AS u(id, slot), pgbeat.tasks t
         WHERE r.id = u.id AND r.scheduled_for = u.slot AND t.id = r.task_id  -- one partition per run
        RETURNING r.id, r.task_id, r.kind, t.params, t.timeout, r.scheduled_for, r.attempt, r.started_at,
                  r.due_at)
    SELECT s.id, s.task_id, s.kind, s.params, s.timeout, s.scheduled_for, s.attempt, s.started_at
      FROM started s ORDER BY s.due_at, s.id;
END $$;

-- Release task locks after their runs' outcomes committed, and wake the workers
-- if one of those tasks has a run waiting (it could not be claimed while locked).
-- Returns how many locks were released.
CREATE OR REPLACE FUNCTION pgbeat.release_task_locks(p_task_ids integer[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer := 0;
    tid integer;
BEGIN
    FOREACH tid IN ARRAY coalesce(p_task_ids, '{}') LOOP
        IF pg_advisory_unlock(pgbeat.task_lock_ns(), tid) THEN
            n := n + 1;
        END IF;
    END LOOP;
    -- One look-up per task in runs_one_pending, never a walk through all due runs.
    IF EXISTS (SELECT 1 FROM unnest(p_task_ids) AS released(id)
                CROSS JOIN LATERAL (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = released.id
                                       AND r.state = 'pending' AND r.due_at <= now() OFFSET 0) AS waiting) THEN
        PERFORM pg_notify('pgbeat_worker', '');
    END IF;
    RETURN n;
END $$;

-- release_task_locks(p_release), then claim_runs(p_daemon_id, p_limit). The caller
-- passes only tasks whose runs' outcomes have committed (Rule 2's order is kept:
-- finish commits, then the unlock). An unlock is not undone if the claim fails.
CREATE OR REPLACE FUNCTION pgbeat.release_and_claim_runs(p_release integer[], p_daemon_id integer, p_limit integer)
RETURNS TABLE (run_id bigint, task_id integer, kind text, params jsonb, timeout double precision,
               scheduled_for timestamptz, attempt integer, started_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_release) > 0 THEN
        PERFORM pgbeat.release_task_locks(p_release);
    END IF;
    RETURN QUERY SELECT * FROM pgbeat.claim_runs(p_daemon_id, p_limit);
END $$;

-- Why a counter task's params cannot be counted (NULL: they can): a step that is
-- not an integer within +-1e9, a counter name that is not 1 to 200 characters.
CREATE OR REPLACE FUNCTION pgbeat.counter_problem(p_params jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_params ? 'step' AND NOT (jsonb_typeof(p_params->'step') = 'number'
                                        AND (p_params->>'step')::numeric BETWEEN -1e9 AND 1e9
                                        AND (p_params->>'step')::numeric = trunc((p_params->>'step')::numeric))
            THEN format('params.step: %s is not an integer between -1e9 and 1e9', p_params->'step')
        WHEN p_params ? 'counter' AND NOT (jsonb_typeof(p_params->'counter') = 'string'
                                           AND length(p_params->>'counter') BETWEEN 1 AND 200)
            THEN format('params.counter: %s is not a name of 1 to 200 characters', left((p_params->'counter')::text, 100))
    END
$$;

-- Finish runs this session claimed, in one transaction: state, result, error,
-- and for a succeeded run of a counting kind the counter increment (Rule 4); a failed or
-- timed-out run gets its retry (Rule 14). A run that is no longer this session's
-- (reaped, or claimed elsewhere) is left alone and reported with applied = false.
-- Release the task locks only after this commits (Rule 2). Runs are found by id,
-- whatever the statistics say; each counter's new value is looked up in one jsonb
-- object built from the upsert's RETURNING (a join there was a nested loop over a
-- CTE, quadratic in the batch).
CREATE OR REPLACE FUNCTION pgbeat.finish_runs(p_run_ids bigint[], p_states text[], p_results jsonb[], p_errors text[])
RETURNS TABLE (run_id bigint, task_id integer, state text, result jsonb, applied boolean)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET enable_mergejoin = off SET enable_hashjoin = off SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    bad integer;
    run_ids bigint[];
    run_slots timestamptz[];
    done_ids bigint[];
    done pgbeat.runs[];
    r pgbeat.runs;
    aside_ids integer[];
    aside_errors text[];
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
    -- Each run's slot is read here, once: the statements below find the run by id
    -- and slot, in its own day partition only (migration 0007).
    SELECT array_agg(l.id), array_agg(l.scheduled_for) INTO run_ids, run_slots
      FROM (SELECT id, scheduled_for FROM pgbeat.runs WHERE id = ANY (p_run_ids) ORDER BY id FOR UPDATE) l;
    -- A succeeded counting run whose task's params cannot be counted (written by
    -- hand in psql) fails with the reason instead, and its task is set aside
    -- (Rule 17): the other runs of the batch are recorded as given.
    WITH given AS (
        SELECT DISTINCT ON (u.id) u.id, l.slot, u.state, coalesce(u.result, '{}') AS result, u.error, u.ord,
               rn.task_id, t.params,
               CASE WHEN k.counts AND u.state = 'succeeded' THEN pgbeat.counter_problem(t.params) END AS problem,
               k.counts AND u.state = 'succeeded' AS counts
          FROM unnest(p_run_ids, p_states, p_results, p_errors) WITH ORDINALITY AS u(id, state, result, error, ord)
          CROSS JOIN LATERAL (SELECT run_slots[array_position(run_ids, u.id)] AS slot) l
          CROSS JOIN LATERAL (SELECT * FROM pgbeat.runs WHERE id = u.id AND scheduled_for = l.slot OFFSET 0) rn
          JOIN pgbeat.tasks t ON t.id = rn.task_id
          JOIN pgbeat.kinds k ON k.name = t.kind  -- its finish behaviour (a counting kind: Rule 4)
         WHERE rn.state = 'running' AND rn.backend_pid = pg_backend_pid()
         ORDER BY u.id, u.ord
    ), mine AS (
        SELECT g.id, g.slot, g.ord, g.task_id, g.result, g.problem,
               CASE WHEN g.problem IS NOT NULL THEN 'failed' ELSE g.state END AS state,
               CASE WHEN g.problem IS NOT NULL THEN g.problem || ' (the task is set aside)' ELSE g.error END AS error,
               CASE WHEN g.counts AND g.problem IS NULL
                    THEN coalesce(g.params->>'counter', 'task:' || g.task_id) END AS counter_name,
               CASE WHEN g.counts AND g.problem IS NULL
                    THEN coalesce((g.params->>'step')::numeric, 1)::bigint END AS step
          FROM given g
    ), counted AS (
        INSERT INTO pgbeat.counters AS c (name, value)
        SELECT m.counter_name, sum(m.step)::bigint FROM mine m
         WHERE m.counter_name IS NOT NULL GROUP BY m.counter_name ORDER BY m.counter_name
        ON CONFLICT (name) DO UPDATE SET value = c.value + excluded.value, updated_at = now()
        RETURNING c.name, c.value
    ), reached AS (
        SELECT jsonb_object_agg(k.name, k.value) AS value FROM counted k
    ), outcomes AS (
        SELECT m.*, CASE WHEN m.counter_name IS NULL THEN m.result
                         ELSE m.result || jsonb_build_object('counter', m.counter_name, 'step', m.step,
                             'value', ((SELECT r.value FROM reached r) ->> m.counter_name)::bigint
                                      - coalesce(sum(m.step) OVER (PARTITION BY m.counter_name ORDER BY m.ord
                                                 ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0)) END AS final
          FROM mine m
    ), finished AS (
        UPDATE pgbeat.runs rn
           SET state = o.state, finished_at = greatest(clock_timestamp(), rn.started_at),
               result = o.final, error = o.error
          FROM outcomes o
         WHERE rn.id = o.id AND rn.scheduled_for = o.slot
        RETURNING rn.id, rn
    )
    SELECT array_agg(f.id), array_agg(f.rn) FILTER (WHERE (f.rn).state IN ('failed', 'timed_out')),
           (SELECT array_agg(m.task_id) FROM mine m WHERE m.problem IS NOT NULL),
           (SELECT array_agg(m.problem) FROM mine m WHERE m.problem IS NOT NULL)
      INTO done_ids, done, aside_ids, aside_errors FROM finished f;
    FOR i IN 1 .. coalesce(cardinality(aside_ids), 0) LOOP
        PERFORM pgbeat.set_task_aside(aside_ids[i], 'finishing a run failed: ' || aside_errors[i]);
    END LOOP;
    FOREACH r IN ARRAY coalesce(done, '{}') LOOP
        PERFORM pgbeat.schedule_retry(r);
    END LOOP;
    RETURN QUERY
    SELECT u.id, rn.task_id, rn.state, rn.result,
           coalesce(u.id = ANY (done_ids) AND u.ord = min(u.ord) OVER (PARTITION BY u.id), false)
      FROM unnest(p_run_ids) WITH ORDINALITY AS u(id, ord)
      CROSS JOIN LATERAL (SELECT run_slots[array_position(run_ids, u.id)] AS slot) l
      LEFT JOIN LATERAL (SELECT * FROM pgbeat.runs WHERE id = u.id AND scheduled_for = l.slot OFFSET 0) rn ON true
     ORDER BY u.ord;
END $$;

-- One run's outcome (the worker's fallback when a batch was refused).
CREATE OR REPLACE FUNCTION pgbeat.finish_run(p_run_id bigint, p_state text, p_result jsonb DEFAULT NULL,
                                  p_error text DEFAULT NULL)
RETURNS TABLE (run_id bigint, task_id integer, state text, result jsonb, applied boolean)
LANGUAGE sql AS $$
    SELECT * FROM pgbeat.finish_runs(ARRAY[p_run_id], ARRAY[p_state], ARRAY[p_result], ARRAY[p_error])
$$;

-- Release the task locks this session holds that are not in p_keep: locks left
-- behind by a claim whose transaction failed (session locks survive rollback).
CREATE OR REPLACE FUNCTION pgbeat.release_stray_task_locks(p_keep integer[]) RETURNS integer
LANGUAGE sql AS $$
    SELECT pgbeat.release_task_locks(ARRAY(
        SELECT unnest(pgbeat.held_task_locks()) EXCEPT SELECT unnest(coalesce(p_keep, '{}'))))
$$;

-- Abandon every running run whose task lock is not held by the session that
-- claimed it: that session is gone (Rule 5). Safe to call from any number of
-- daemons at once, and never touches a run whose worker session is alive: a
-- finish that commits meanwhile changes the row, and the update re-checks it.
CREATE OR REPLACE FUNCTION pgbeat.reap_abandoned_runs() RETURNS integer
LANGUAGE sql AS $$
    SELECT pgbeat.abandon_runs(ARRAY(
        SELECT r.id FROM pgbeat.runs r
         WHERE r.state = 'running'
           AND NOT EXISTS (SELECT 1 FROM pg_locks l
                            WHERE l.locktype = 'advisory' AND l.granted
                              AND l.classid = pgbeat.task_lock_ns()::oid AND l.objsubid = 2
                              AND l.objid = r.task_id::oid AND l.pid = r.backend_pid
                              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))),
        'worker lost its database session')
$$;

-- When the earliest pending run becomes due (a worker sleeps until then).
-- p_after: only runs due after it. A worker passes now: a run already due that
-- it could not claim waits for its task's lock, whose release notifies.
-- (Two statements, so that each is planned as an index range scan on runs_pending_due.)
CREATE OR REPLACE FUNCTION pgbeat.next_pending_due_at(p_after timestamptz DEFAULT NULL) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_after IS NULL THEN
        RETURN (SELECT min(due_at) FROM pgbeat.runs WHERE state = 'pending');
    END IF;
    RETURN (SELECT min(due_at) FROM pgbeat.runs WHERE state = 'pending' AND due_at > p_after);
END $$;
