-- depends: 0009_cheaper_calls
--
-- Slots are materialised a moment ahead, so that a run is pending before its
-- slot and a worker claims it at the slot, on its own clock, instead of waiting
-- for the scheduler's transaction, its commit and the notification that follows
-- (1.7 ms at the median on 2 cores; the claim alone is a fraction of that).
--
--   materialize_due_runs(p_limit, p_ahead) also materialises the plain slots
--                falling due within p_ahead from now (at most 1 s; the scheduler
--                passes 20 ms). Such a run is pending with due_at = its slot, and
--                claim_runs takes only runs whose due_at has come: no run starts
--                before its slot. Every other case (a missed slot, a skip-policy
--                task with a run in progress, a slot past until...) is still decided
--                by fire_slot once the slot is due, as before. p_ahead defaults
--                to 0: the 0003 behaviour.
--                Its plans stay custom (chosen per call): a generic plan, which
--                cannot know how many tasks fall before the horizon, made a pass
--                over 100,000 tasks ten times slower (2.5 -> 24 ms).
--                A task moves on only once its run is written. (The 0003 fast
--                path moved it even when the insert collided with a run committed
--                after the statement's snapshot was taken, and that slot was lost.)
--
-- What a user can see: for at most p_ahead before a slot, its run is already
-- pending. Pausing, changing or deleting the task then cancels that run (recorded
-- `cancelled`, as for any pending run), and a trigger finds it as the task's
-- pending run, due at its slot.

DROP FUNCTION pgbeat.materialize_due_runs(integer);

CREATE FUNCTION pgbeat.materialize_due_runs(p_limit integer DEFAULT 1000, p_ahead interval DEFAULT '0')
RETURNS TABLE (task_id integer, run_id bigint, scheduled_for timestamptz, outcome text, missed integer)
LANGUAGE plpgsql SET enable_seqscan = off SET enable_mergejoin = off AS $$
#variable_conflict use_column
DECLARE
    t pgbeat.tasks;
    slow pgbeat.tasks[];
    fast_ids integer[];
    fast_latest timestamptz[];
    fast_next timestamptz[];
    nxt timestamptz;
    latest timestamptz;
    horizon timestamptz := now() + p_ahead;
    written_ids integer[];
    written_runs bigint[];
    written_slots timestamptz[];
    c record;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        PERFORM pgbeat.raise_invalid('limit', 'must be at least 1');
    END IF;
    IF p_ahead IS NULL OR p_ahead < interval '0' OR p_ahead > interval '1 second' THEN
        PERFORM pgbeat.raise_invalid('ahead', 'must be between 0 and 1 second');
    END IF;
    WITH due AS (
        SELECT tk AS tk_row, tk.id, tk.next_run_at,
               CASE WHEN tk.every IS NOT NULL THEN pgbeat.grid_slot_after(tk.anchor, tk.every, horizon) END AS nxt
          FROM pgbeat.tasks tk
         WHERE tk.next_run_at <= horizon AND NOT tk.paused AND tk.cron IS NULL
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
           array_agg(j.tk_row ORDER BY j.next_run_at) FILTER (WHERE NOT j.plain AND j.next_run_at <= now())
      INTO fast_ids, fast_latest, fast_next, slow
      FROM judged j;

    IF fast_ids IS NOT NULL THEN
        -- Scheduler updates do not wake the other schedulers (as in fire_slot).
        PERFORM set_config('pgbeat.quiet', 'on', true);
        -- Only a task whose run was written moves on to its next slot.
        WITH f AS (
            SELECT * FROM unnest(fast_ids, fast_latest, fast_next) AS f(id, latest, nxt)
        ), ins AS (
            INSERT INTO pgbeat.runs AS r (task_id, kind, scheduled_for, due_at, coalesced)
            SELECT f.id, tk.kind, f.latest, f.latest, 0
              FROM f JOIN pgbeat.tasks tk ON tk.id = f.id
             ORDER BY f.id
            ON CONFLICT DO NOTHING
            RETURNING r.task_id, r.id, r.scheduled_for
        ), moved AS (
            UPDATE pgbeat.tasks tk
               SET fired = tk.fired + 1,
                   next_run_at = CASE WHEN f.nxt > tk.until OR tk.fired + 1 >= tk.max_runs THEN NULL
                                      ELSE f.nxt END
              FROM f JOIN ins ON ins.task_id = f.id
             WHERE tk.id = f.id
        )
        SELECT array_agg(ins.task_id), array_agg(ins.id), array_agg(ins.scheduled_for)
          INTO written_ids, written_runs, written_slots FROM ins;
        PERFORM set_config('pgbeat.quiet', 'off', true);
        RETURN QUERY
        SELECT w.id, w.run_id, w.slot, 'queued', 0
          FROM unnest(written_ids, written_runs, written_slots) AS w(id, run_id, slot);
        -- The insert collided: a run this statement's snapshot did not show was
        -- committed before the task's row was locked (a trigger, or a scheduler
        -- whose commit was slow). fire_slot reads the runs afresh and folds the
        -- slot into that run, or records it; the slot is never dropped.
        IF cardinality(fast_ids) > coalesce(cardinality(written_ids), 0) THEN
            FOR c IN SELECT tk AS task, f.latest, f.nxt
                       FROM unnest(fast_ids, fast_latest, fast_next) AS f(id, latest, nxt)
                       JOIN pgbeat.tasks tk ON tk.id = f.id
                      WHERE NOT EXISTS (SELECT 1 FROM unnest(written_ids) AS w(id) WHERE w.id = f.id)
                      ORDER BY f.id LOOP
                RETURN QUERY SELECT * FROM pgbeat.fire_slot(c.task, c.latest, c.nxt, 0);
            END LOOP;
        END IF;
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
