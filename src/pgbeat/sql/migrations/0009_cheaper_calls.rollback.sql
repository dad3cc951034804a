-- Back to the 0006 format_duration and the 0008 finish_runs.

CREATE OR REPLACE FUNCTION pgbeat.format_duration(p interval) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    WITH s AS (SELECT extract(epoch FROM p)::numeric AS total)
    SELECT coalesce(nullif(concat(
        CASE WHEN total >= 86400 THEN floor(total / 86400) || 'd' END,
        CASE WHEN floor(mod(total, 86400) / 3600) > 0 THEN floor(mod(total, 86400) / 3600) || 'h' END,
        CASE WHEN floor(mod(total, 3600) / 60) > 0 THEN floor(mod(total, 3600) / 60) || 'm' END,
        CASE WHEN mod(total, 60) > 0 THEN trim_scale(mod(total, 60)) || 's' END), ''), '0s')
    FROM s
$$;

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
