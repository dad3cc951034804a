-- Scheduling: what a due slot becomes. The scheduler materialises due slots
-- (materialize_due_runs for interval and one-shot tasks, due_cron_tasks +
-- fire_cron_slots for cron), and fire_slot fires each slot that is not plain:
-- coalesce, skip, misfire, expiry (Rules 1, 3, 6, 7, 8). Many schedulers may call
-- these at once: each task row is locked (SKIP LOCKED) while its slot fires, and
-- runs_one_per_slot backs that up (Rule 1). A scheduler's own moving on of
-- next_run_at is quiet (pgbeat.quiet): it wakes no other scheduler.

-- First slot on an interval grid strictly after p_after. Computed from the
-- anchor every time, so slots never drift (Rule 7).
CREATE OR REPLACE FUNCTION pgbeat.grid_slot_after(p_anchor timestamptz, p_every interval, p_after timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_anchor + p_every * (floor(
        (extract(epoch FROM p_after - p_anchor) * 1000000)::numeric
        / (extract(epoch FROM p_every) * 1000000)::numeric) + 1)
$$;

-- Whether a run of the task was executing when p_at fell due and has finished since:
-- the newest run that started before p_at (a task's runs execute one at a time)
-- finished after it. Rule 8 judges a slot by the runs at its own time, so a
-- scheduler that reaches a skip-policy slot late, after the run that was executing
-- when it fell due has finished, still skips it, as one on time would have.
CREATE OR REPLACE FUNCTION pgbeat.ran_across(p_task_id integer, p_at timestamptz) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT r.finished_at > p_at FROM pgbeat.runs r
                      WHERE r.task_id = p_task_id AND r.backend_pid IS NOT NULL AND r.started_at < p_at
                      ORDER BY r.id DESC LIMIT 1), false)
$$;

-- Fire the due slot of a task the caller has locked.
--   p_latest  the latest slot that is due now (>= t.next_run_at)
--   p_next    the first slot after now (NULL: no more slots)
--   p_missed  due slots before p_latest that were not run (the scheduler was down)
-- Returns the outcome, one row.
CREATE OR REPLACE FUNCTION pgbeat.fire_slot(t pgbeat.tasks, p_latest timestamptz, p_next timestamptz, p_missed integer,
    OUT task_id integer, OUT run_id bigint, OUT scheduled_for timestamptz, OUT outcome text,
    OUT missed integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    pending_id bigint;
    is_running boolean;
    folded integer := p_missed;
BEGIN
    -- Nothing runs after `until`, even when the scheduler was down across it.
    -- (Interval tasks arrive with the last slot before until already computed;
    -- for cron the first missed slot is the one known to be before it.)
    IF p_latest > t.until THEN
        IF t.next_run_at > t.until THEN
            PERFORM set_config('pgbeat.quiet', 'on', true);
            UPDATE pgbeat.tasks SET next_run_at = NULL WHERE id = t.id;
            PERFORM set_config('pgbeat.quiet', 'off', true);
            task_id := t.id; missed := 0; outcome := 'expired';
            RETURN;
        END IF;
        p_latest := t.next_run_at; p_missed := 0; folded := 0;
    END IF;
    task_id := t.id; scheduled_for := p_latest; missed := p_missed;

    -- Rule 6: misfires. 'run_once' folds the missed slots into one run now;
    -- 'skip' records them as one skipped run, and skips the latest slot too when
    -- it is later than the grace period.
    IF t.misfire_policy = 'skip' THEN
        IF now() - p_latest > make_interval(secs => t.misfire_grace) THEN
            INSERT INTO pgbeat.runs AS r (task_id, kind, scheduled_for, due_at, state, coalesced,
                                          started_at, finished_at, error)
            VALUES (t.id, t.kind, p_latest, p_latest, 'skipped', p_missed, now(), now(),
                    format('misfire: %s slot(s) missed, latest by %s', p_missed::bigint + 1, now() - p_latest))
            ON CONFLICT DO NOTHING RETURNING r.id INTO run_id;
            outcome := 'misfire_skipped';
            folded := -1;
        ELSIF p_missed > 0 THEN
            INSERT INTO pgbeat.runs AS r (task_id, kind, scheduled_for, due_at, state, coalesced,
                                          started_at, finished_at, error)
            VALUES (t.id, t.kind, t.next_run_at, t.next_run_at, 'skipped', p_missed - 1, now(), now(),
                    format('misfire: %s slot(s) missed', p_missed))
            ON CONFLICT DO NOTHING;
            folded := 0;
        END IF;
    END IF;

    IF folded >= 0 THEN
        -- Rule 3: at most one pending run; Rule 8: the overlap policy.
        SELECT r.id INTO pending_id FROM pgbeat.runs r
         WHERE r.task_id = t.id AND r.state = 'pending' FOR UPDATE;
        is_running := EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = t.id AND r.state = 'running')
                      OR (t.overlap_policy = 'skip' AND pgbeat.ran_across(t.id, p_latest));
        IF pending_id IS NOT NULL AND t.overlap_policy = 'queue' THEN
            -- Rule 18: counts saturate rather than overflow.
            UPDATE pgbeat.runs r SET coalesced = least(r.coalesced::bigint + 1 + folded, 2147483647)::integer
             WHERE r.id = pending_id;
            run_id := pending_id;
            outcome := 'coalesced';
        ELSIF pending_id IS NOT NULL OR (is_running AND t.overlap_policy = 'skip') THEN
            INSERT INTO pgbeat.runs AS r (task_id, kind, scheduled_for, due_at, state, coalesced,
                                          started_at, finished_at, error)
            VALUES (t.id, t.kind, p_latest, p_latest, 'skipped', folded, now(), now(),
                    'overlap: the previous run was still ' || CASE WHEN is_running THEN 'running' ELSE 'pending' END)
            ON CONFLICT DO NOTHING RETURNING r.id INTO run_id;
            outcome := 'skipped';
        ELSE
            INSERT INTO pgbeat.runs AS r (task_id, kind, scheduled_for, due_at, coalesced)
            VALUES (t.id, t.kind, p_latest, p_latest, folded)
            ON CONFLICT DO NOTHING RETURNING r.id INTO run_id;
            outcome := CASE WHEN run_id IS NULL THEN 'duplicate' ELSE 'queued' END;
        END IF;
    END IF;

    -- Move the task forward. Scheduler updates do not wake the other schedulers.
    PERFORM set_config('pgbeat.quiet', 'on', true);
    UPDATE pgbeat.tasks
       SET fired = least(fired::bigint + 1, 2147483647)::integer,
           next_run_at = CASE WHEN p_next > until OR fired::bigint + 1 >= max_runs THEN NULL ELSE p_next END
     WHERE id = t.id;
    PERFORM set_config('pgbeat.quiet', 'off', true);
END $$;

-- Materialise the due slots of interval and one-shot tasks, at most p_limit
-- tasks per call (call again while it returns p_limit rows). Cron tasks go
-- through due_cron_tasks + fire_cron_slots, because croniter does their maths.
--
-- The common case is set-based: a locked task whose slot fire_slot would take
-- down its plain path (no missed slot, not past until, within the skip policy's
-- grace, no pending run, not a running skip-policy task) gets its run from one
-- INSERT and moves forward in one UPDATE, with the same result row and the same
-- next_run_at / fired as fire_slot would give. Every other task goes through
-- fire_slot, one at a time, once its slot is due.
--
-- Plain slots falling due within p_ahead from now (at most 1 s; the scheduler
-- passes 20 ms) are materialised early: the run is pending with due_at = its slot,
-- so a worker claims it at the slot, on its own clock, instead of waiting for this
-- transaction, its commit and the notification that follows; claim_runs takes
-- only runs whose due_at has come, so no run starts before its slot (Rule 9).
-- For at most p_ahead before a slot its run is already pending: pausing, changing
-- or deleting the task then cancels it, and a trigger finds it as the pending run.
-- A task moves on only once its run is written: an insert that collides with a
-- run committed after this statement's snapshot goes through fire_slot instead.
--
-- Never a seq scan (a plan that hash-joined every task to fire two of them) or a
-- merge join. The statement that picks and locks the due tasks is planned at each
-- call (EXECUTE): a generic plan, which cannot know how many tasks fall before the
-- horizon, made a pass over 100,000 tasks ten times slower. The others are planned
-- once per session: planned at each call, their look-ups into every day partition
-- of runs cost 10-20 ms of planning a pass, and a slot was fired late, not ahead.
CREATE OR REPLACE FUNCTION pgbeat.materialize_due_slots(p_limit integer, p_ahead interval, p_only integer)
RETURNS TABLE (task_id integer, run_id bigint, scheduled_for timestamptz, outcome text, missed integer)
LANGUAGE plpgsql SET enable_seqscan = off SET enable_mergejoin = off SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    t pgbeat.tasks;
    locked pgbeat.tasks[];
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
    EXECUTE 'SELECT array_agg(d.tk) FROM (
                 SELECT tk FROM pgbeat.tasks tk
                  WHERE tk.next_run_at <= $1 AND NOT tk.paused AND tk.cron IS NULL
                    AND ($2::integer IS NULL OR tk.id = $2)
                  ORDER BY tk.next_run_at LIMIT $3
                    FOR UPDATE SKIP LOCKED) d'
       INTO locked USING horizon, p_only, p_limit;
    IF locked IS NULL THEN
        RETURN;
    END IF;
    -- Judged in a statement of its own, once the locks are held: a pending run that
    -- another writer committed before this pass got a task's lock (a trigger) is
    -- seen, in whichever partition it is (Rule 3; runs_one_pending is per partition).
    WITH due AS (
        SELECT tk AS tk_row, tk.id, tk.next_run_at,
               CASE WHEN tk.every IS NOT NULL THEN pgbeat.grid_slot_after(tk.anchor, tk.every, horizon) END AS nxt
          FROM unnest(locked) tk
    ), slot AS (
        SELECT d.*, CASE WHEN (d.tk_row).every IS NOT NULL THEN d.nxt - (d.tk_row).every
                         ELSE d.next_run_at END AS latest
          FROM due d
    ), judged AS (
        SELECT s.*, coalesce(
               (s.latest <= (s.tk_row).until OR (s.tk_row).until IS NULL)
               AND ((s.tk_row).every IS NULL
                    OR round(extract(epoch FROM s.latest - s.next_run_at)
                             / extract(epoch FROM (s.tk_row).every)) = 0)
               AND ((s.tk_row).misfire_policy <> 'skip'
                    OR NOT (now() - s.latest > make_interval(secs => (s.tk_row).misfire_grace)))
               AND NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = s.id AND r.state = 'pending')
               AND ((s.tk_row).overlap_policy = 'queue'
                    OR NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = s.id AND r.state = 'running')
                       AND NOT pgbeat.ran_across(s.id, s.latest)),
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
               SET fired = least(tk.fired::bigint + 1, 2147483647)::integer,
                   next_run_at = CASE WHEN f.nxt > tk.until OR tk.fired::bigint + 1 >= tk.max_runs THEN NULL
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
                    least(round(extract(epoch FROM latest - t.next_run_at) / extract(epoch FROM t.every)),
                          2147483647)::integer);
            ELSE
                RETURN QUERY SELECT * FROM pgbeat.fire_slot(t, t.next_run_at, NULL, 0);
            END IF;
        END LOOP;
    END IF;
END $$;

-- Rule 17: an error raised by one task's data (a data exception, a constraint,
-- an exception raised in PL/pgSQL, a program limit) is that task's; any other
-- (a lost lock, a deadlock, a cancel, the server going down) is the pass's.
CREATE OR REPLACE FUNCTION pgbeat.is_task_error(p_sqlstate text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT left(p_sqlstate, 2) IN ('22', '23', '54', 'P0') AND p_sqlstate <> 'P0002'
$$;

-- Materialise the due slots of interval and one-shot tasks (materialize_due_slots,
-- above), setting aside any task whose data makes that fail (Rule 17): the pass
-- is one call, all or nothing, so when it fails on a task's error it is redone
-- task by task, each in its own subtransaction, and a task that fails alone is
-- set aside (outcome 'error', its error in `error`) while the others fire.
CREATE OR REPLACE FUNCTION pgbeat.materialize_due_runs(p_limit integer DEFAULT 1000, p_ahead interval DEFAULT '0')
RETURNS TABLE (task_id integer, run_id bigint, scheduled_for timestamptz, outcome text, missed integer,
               error text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    ids integer[]; runs bigint[]; slots timestamptz[]; outcomes text[]; misses integer[]; errors text[];
    tid integer;
    state text;
    message text;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        PERFORM pgbeat.raise_invalid('limit', 'must be at least 1');
    END IF;
    IF p_ahead IS NULL OR p_ahead < interval '0' OR p_ahead > interval '1 second' THEN
        PERFORM pgbeat.raise_invalid('ahead', 'must be between 0 and 1 second');
    END IF;
    BEGIN
        SELECT array_agg(m.task_id), array_agg(m.run_id), array_agg(m.scheduled_for), array_agg(m.outcome),
               array_agg(m.missed), array_agg(NULL::text)
          INTO ids, runs, slots, outcomes, misses, errors
          FROM pgbeat.materialize_due_slots(p_limit, p_ahead, NULL) m;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
        IF NOT pgbeat.is_task_error(state) THEN
            RAISE;
        END IF;
        ids := '{}'; runs := '{}'; slots := '{}'; outcomes := '{}'; misses := '{}'; errors := '{}';
        FOR tid IN SELECT tk.id FROM pgbeat.tasks tk
                    WHERE tk.next_run_at <= now() + p_ahead AND NOT tk.paused AND tk.cron IS NULL
                    ORDER BY tk.next_run_at LIMIT p_limit LOOP
            BEGIN
                SELECT ids || array_agg(m.task_id), runs || array_agg(m.run_id),
                       slots || array_agg(m.scheduled_for), outcomes || array_agg(m.outcome),
                       misses || array_agg(m.missed), errors || array_agg(NULL::text)
                  INTO ids, runs, slots, outcomes, misses, errors
                  FROM pgbeat.materialize_due_slots(p_limit, p_ahead, tid) m;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
                IF NOT pgbeat.is_task_error(state) THEN
                    RAISE;
                END IF;
                message := format('scheduling failed: %s (SQLSTATE %s)', message, state);
                IF pgbeat.set_task_aside(tid, message) THEN
                    ids := ids || tid; runs := runs || NULL::bigint; slots := slots || NULL::timestamptz;
                    outcomes := outcomes || 'error'::text; misses := misses || 0; errors := errors || message;
                END IF;
            END;
        END LOOP;
    END;
    RETURN QUERY SELECT * FROM unnest(ids, runs, slots, outcomes, misses, errors);
END $$;

-- Cron tasks that are due: the caller computes their slots with croniter.
CREATE OR REPLACE FUNCTION pgbeat.due_cron_tasks(p_limit integer DEFAULT 1000)
-- db_now is the database's clock, which the caller's cron maths must use.
RETURNS TABLE (task_id integer, next_run_at timestamptz, cron text, timezone text, db_now timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        PERFORM pgbeat.raise_invalid('limit', 'must be at least 1');
    END IF;
    RETURN QUERY
    SELECT tk.id, tk.next_run_at, tk.cron, tk.timezone, now() FROM pgbeat.tasks tk
     WHERE tk.next_run_at <= now() AND NOT tk.paused AND tk.cron IS NOT NULL
     ORDER BY tk.next_run_at LIMIT p_limit;
END $$;

-- Fire cron slots computed by the caller:
--   p_slots = [{"task_id": 7, "slot": <next_run_at it saw>, "latest": ..., "next": ..., "missed": 0}, ...]
-- A task whose next_run_at moved meanwhile (another scheduler fired it, or the
-- user changed it) is left alone: its slot has already been handled.
-- A slot that fails on its task's data sets that task aside (Rule 17): outcome
-- 'error', the error in `error`; the other slots fire.
CREATE OR REPLACE FUNCTION pgbeat.fire_cron_slots(p_slots jsonb)
RETURNS TABLE (task_id integer, run_id bigint, scheduled_for timestamptz, outcome text, missed integer,
               error text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s jsonb;
    t pgbeat.tasks;
    i integer := -1;
    f text;
    tid integer;
    slot timestamptz;
    latest timestamptz;
    nxt timestamptz;
    n_missed integer;
    decided record;
    state text;
    message text;
BEGIN
    IF p_slots IS NULL OR jsonb_typeof(p_slots) <> 'array' THEN
        PERFORM pgbeat.raise_invalid('slots', 'must be a JSON array');
    END IF;
    FOR s IN SELECT * FROM jsonb_array_elements(p_slots) LOOP
        i := i + 1;
        f := format('slots[%s]', i);
        IF jsonb_typeof(s) <> 'object' THEN
            PERFORM pgbeat.raise_invalid(f, 'must be an object');
        END IF;
        PERFORM pgbeat.reject_unknown_keys(f, s, ARRAY['task_id', 'slot', 'latest', 'next', 'missed']);
        tid := pgbeat.parse_number(f || '.task_id', s->'task_id', 1, 2147483647, true);
        slot := pgbeat.parse_timestamp(f || '.slot', s->'slot');
        latest := pgbeat.parse_timestamp(f || '.latest', s->'latest');
        nxt := pgbeat.parse_timestamp(f || '.next', s->'next');
        n_missed := pgbeat.parse_number(f || '.missed', coalesce(s->'missed', '0'), 0, 2147483647, true);
        IF slot IS NULL OR latest IS NULL THEN
            PERFORM pgbeat.raise_invalid(f || CASE WHEN slot IS NULL THEN '.slot' ELSE '.latest' END, 'is required');
        ELSIF latest < slot OR latest > now() THEN
            PERFORM pgbeat.raise_invalid(f || '.latest', 'must be between the slot and now');
        ELSIF nxt <= latest THEN
            PERFORM pgbeat.raise_invalid(f || '.next', 'must be after latest (or null: no more slots)');
        END IF;
        SELECT * INTO t FROM pgbeat.tasks tk
         WHERE tk.id = tid AND tk.next_run_at = slot
           AND tk.next_run_at <= now() AND NOT tk.paused AND tk.cron IS NOT NULL
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        BEGIN
            SELECT * INTO decided FROM pgbeat.fire_slot(t, latest, nxt, n_missed);
            task_id := decided.task_id; run_id := decided.run_id; scheduled_for := decided.scheduled_for;
            outcome := decided.outcome; missed := decided.missed; error := NULL;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
            IF NOT pgbeat.is_task_error(state) THEN
                RAISE;
            END IF;
            error := format('scheduling failed: %s (SQLSTATE %s)', message, state);
            CONTINUE WHEN NOT pgbeat.set_task_aside(t.id, error);
            task_id := t.id; run_id := NULL; scheduled_for := NULL; outcome := 'error'; missed := 0;
        END;
        RETURN NEXT;
    END LOOP;
END $$;

-- When the scheduler should wake next: the earliest slot of an active task.
CREATE OR REPLACE FUNCTION pgbeat.next_due_at() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT min(next_run_at) FROM pgbeat.tasks WHERE NOT paused AND next_run_at IS NOT NULL);
END $$;
