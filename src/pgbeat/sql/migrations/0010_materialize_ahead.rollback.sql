-- Back to the 0003 materialize_due_runs, with the settings 0008 gave it.

DROP FUNCTION pgbeat.materialize_due_runs(integer, interval);

CREATE FUNCTION pgbeat.materialize_due_runs(p_limit integer DEFAULT 1000)
RETURNS TABLE (task_id integer, run_id bigint, scheduled_for timestamptz, outcome text, missed integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t pgbeat.tasks;
    slow pgbeat.tasks[];
    fast_ids integer[];
    fast_latest timestamptz[];
    fast_next timestamptz[];
    nxt timestamptz;
    latest timestamptz;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        PERFORM pgbeat.raise_invalid('limit', 'must be at least 1');
    END IF;
    WITH due AS (
        SELECT tk AS tk_row, tk.id, tk.next_run_at,
               CASE WHEN tk.every IS NOT NULL THEN pgbeat.grid_slot_after(tk.anchor, tk.every, now()) END AS nxt
          FROM pgbeat.tasks tk
         WHERE tk.next_run_at <= now() AND NOT tk.paused AND tk.cron IS NULL
         ORDER BY tk.next_run_at LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), slot AS (
        SELECT d.*, CASE WHEN (d.tk_row).every IS NOT NULL THEN d.nxt - (d.tk_row).every
                         ELSE d.next_run_at END AS latest
          FROM due d
    ), judged AS (
        SELECT s.*, coalesce(
               (s.latest <= (s.tk_row).until OR (s.tk_row).until IS NULL)
               AND ((s.tk_row).every IS NULL
                    OR round(extract(epoch FROM s.latest - s.next_run_at)
                             / extract(epoch FROM (s.tk_row).every))::integer = 0)
               AND ((s.tk_row).misfire_policy <> 'skip'
                    OR NOT (now() - s.latest > make_interval(secs => (s.tk_row).misfire_grace)))
               AND NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = s.id AND r.state = 'pending')
               AND ((s.tk_row).overlap_policy = 'queue'
                    OR NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = s.id AND r.state = 'running')),
               false) AS plain
          FROM slot s
    )
    SELECT array_agg(j.id) FILTER (WHERE j.plain),
           array_agg(j.latest) FILTER (WHERE j.plain),
           array_agg(j.nxt) FILTER (WHERE j.plain),
           array_agg(j.tk_row ORDER BY j.next_run_at) FILTER (WHERE NOT j.plain)
      INTO fast_ids, fast_latest, fast_next, slow
      FROM judged j;

    IF fast_ids IS NOT NULL THEN
        -- Scheduler updates do not wake the other schedulers (as in fire_slot).
        PERFORM set_config('pgbeat.quiet', 'on', true);
        RETURN QUERY
        WITH f AS (
            SELECT * FROM unnest(fast_ids, fast_latest, fast_next) AS f(id, latest, nxt)
        ), ins AS (
            INSERT INTO pgbeat.runs AS r (task_id, kind, scheduled_for, due_at, coalesced)
            SELECT f.id, tk.kind, f.latest, f.latest, 0
              FROM f JOIN pgbeat.tasks tk ON tk.id = f.id
             ORDER BY f.id
            ON CONFLICT DO NOTHING
            RETURNING r.task_id, r.id
        ), moved AS (
            UPDATE pgbeat.tasks tk
               SET fired = tk.fired + 1,
                   next_run_at = CASE WHEN f.nxt > tk.until OR tk.fired + 1 >= tk.max_runs THEN NULL
                                      ELSE f.nxt END
              FROM f
             WHERE tk.id = f.id
        )
        SELECT f.id, ins.id, f.latest,
               CASE WHEN ins.id IS NULL THEN 'duplicate' ELSE 'queued' END, 0
          FROM f LEFT JOIN ins ON ins.task_id = f.id;
        PERFORM set_config('pgbeat.quiet', 'off', true);
    END IF;

    IF slow IS NOT NULL THEN
        FOREACH t IN ARRAY slow LOOP
            IF t.every IS NOT NULL THEN
                nxt := pgbeat.grid_slot_after(t.anchor, t.every, now());
                latest := nxt - t.every;
                IF latest > t.until THEN
                    latest := greatest(t.next_run_at, pgbeat.grid_slot_after(t.anchor, t.every, t.until) - t.every);
                END IF;
                RETURN QUERY SELECT * FROM pgbeat.fire_slot(t, latest, nxt,
                    round(extract(epoch FROM latest - t.next_run_at) / extract(epoch FROM t.every))::integer);
            ELSE
                RETURN QUERY SELECT * FROM pgbeat.fire_slot(t, t.next_run_at, NULL, 0);
            END IF;
        END LOOP;
    END IF;
END $$;

ALTER FUNCTION pgbeat.materialize_due_runs(integer) SET enable_seqscan = off SET enable_mergejoin = off;
