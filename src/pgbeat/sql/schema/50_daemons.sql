-- Daemons: the registry and liveness (Rule 12), retention, and the wake-ups.
-- A daemon registers on the session it keeps for its life and holds the advisory
-- lock (daemon_lock_ns(), id) there: alive = lock held. Every daemon heartbeats,
-- reaps and prunes (Rule 13, pgbeat.maintenance).
--
-- Wake-ups are statement-level triggers, so a bulk insert sends one notification,
-- and PostgreSQL folds identical notifications within a transaction into one:
--   pgbeat_scheduler  a task's slot or pause state changed: payload {"next_run_at": earliest or null}
--   pgbeat_worker     a pending run appeared: empty payload (trigger_task,
--                     release_task_locks and abandon_runs also send it)

CREATE OR REPLACE FUNCTION pgbeat.daemon_lock_ns() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1885823588 $$;  -- 'pgbd'

-- Register the calling session's daemon and take its daemon lock (Rule 12).
CREATE OR REPLACE FUNCTION pgbeat.register_daemon(p_role text, p_host text, p_pid integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    new_id integer;
BEGIN
    IF p_role IS NULL OR p_role NOT IN ('scheduler', 'worker', 'api') THEN
        PERFORM pgbeat.raise_invalid('role', 'must be scheduler, worker or api');
    END IF;
    INSERT INTO pgbeat.daemons (role, host, pid, backend_pid)
    VALUES (p_role, coalesce(p_host, ''), coalesce(p_pid, 0), pg_backend_pid())
    RETURNING id INTO new_id;
    PERFORM pg_advisory_lock(pgbeat.daemon_lock_ns(), new_id);
    RETURN new_id;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.heartbeat_daemon(p_id integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgbeat.daemons SET heartbeat_at = now() WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'daemon % not found', p_id USING ERRCODE = 'no_data_found';
    END IF;
END $$;

-- Stopping twice is harmless; the lock is released only if this session holds it.
CREATE OR REPLACE FUNCTION pgbeat.stop_daemon(p_id integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM pgbeat.daemons WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'daemon % not found', p_id USING ERRCODE = 'no_data_found';
    END IF;
    UPDATE pgbeat.daemons SET stopped_at = now() WHERE id = p_id AND stopped_at IS NULL;
    IF EXISTS (SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted AND l.pid = pg_backend_pid()
                  AND l.classid = pgbeat.daemon_lock_ns()::oid AND l.objsubid = 2 AND l.objid = p_id::oid) THEN
        PERFORM pg_advisory_unlock(pgbeat.daemon_lock_ns(), p_id);
    END IF;
END $$;

-- Record as stopped the daemons whose lock nobody holds (killed, or lost their session).
-- Every daemon reaps, all at once after a restart, when every old registration is
-- dead: rows another reaper holds are skipped, so reapers never deadlock.
CREATE OR REPLACE FUNCTION pgbeat.reap_dead_daemons() RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (
        SELECT d.id FROM pgbeat.daemons d
         WHERE d.stopped_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM pg_locks l
                            WHERE l.locktype = 'advisory' AND l.granted
                              AND l.classid = pgbeat.daemon_lock_ns()::oid AND l.objsubid = 2
                              AND l.objid = d.id::oid
                              -- pg_locks spans the server: another database's daemon 1 is not ours
                              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
         ORDER BY d.id
           FOR UPDATE OF d SKIP LOCKED
    ), dead AS (
        UPDATE pgbeat.daemons d SET stopped_at = now() FROM gone WHERE d.id = gone.id
        RETURNING 1)
    SELECT count(*)::integer FROM dead
$$;

-- History by day (migration 0007): each UTC day's slots have a partition of
-- pgbeat.runs, named runs_YYYYMMDD. Add the partitions of today and the p_days
-- after it that are missing (from p_from instead of today: days of history to
-- load); returns how many were added. A day another partition covers is left
-- alone (runs_before_YYYYMMDD holds every slot before migration 0007). Two days
-- ahead by default: two days of hourly turns to make each one. A partition is created
-- apart and then attached, which locks pgbeat.runs only against other schema
-- changes (claims go on) and runs_default for a scan of its few rows; a day whose
-- slots already sit in runs_default keeps them there. Waiting for a lock is
-- bounded, so claims never queue behind this for long; the next turn tries again.
CREATE OR REPLACE FUNCTION pgbeat.add_run_partitions(p_days integer DEFAULT 2, p_from date DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SET lock_timeout = '20ms' AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date;
    part text;
    added integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'pgbeat.runs'::regclass) THEN
        RETURN 0;
    END IF;
    FOR d IN SELECT generate_series(coalesce(p_from, today), today + p_days, interval '1 day')::date LOOP
        part := 'runs_' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass('pgbeat.' || part) IS NOT NULL;
        BEGIN
            EXECUTE format('CREATE TABLE pgbeat.%I (LIKE pgbeat.runs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            -- Rule 3 within the partition (migration 0007).
            EXECUTE format('CREATE UNIQUE INDEX %I ON pgbeat.%I (task_id) WHERE state = ''pending''',
                           part || '_one_pending', part);
            EXECUTE format('ALTER TABLE pgbeat.runs ATTACH PARTITION pgbeat.%I FOR VALUES FROM (%L) TO (%L)',
                           part, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
            added := added + 1;
        EXCEPTION WHEN lock_not_available OR check_violation OR invalid_object_definition THEN
            -- Busy (the next turn tries again), runs_default holds slots of that day
            -- (they stay there), or another partition covers it.
            NULL;
        END;
    END LOOP;
    RETURN added;
END $$;

-- The partitions of pgbeat.runs: each with the end of its slots (NULL for
-- runs_default) and whether it holds whole days (runs_YYYYMMDD), which retention
-- drops whole; runs_before_YYYYMMDD and runs_default are pruned row by row.
CREATE OR REPLACE FUNCTION pgbeat.run_partitions()
RETURNS TABLE (part regclass, upper_bound timestamptz, whole_days boolean)
LANGUAGE sql STABLE AS $$
    SELECT c.oid::regclass, substring(b.bound FROM 'TO \(''([^'']+)''\)')::timestamptz,
           b.bound NOT LIKE '%MINVALUE%' AND b.bound <> 'DEFAULT'
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,
           LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
     WHERE i.inhparent = 'pgbeat.runs'::regclass
$$;

-- Retention by whole days (Rule 13), one step per call: call again while it
-- returns 1. A partition whose slots all lie before the cutoff leaves in three
-- steps, each a transaction of its own that holds its locks for a moment:
--   1. it is detached from pgbeat.runs (locks runs and runs_default), when none of
--      its runs is pending or running (checked again once detached, when no
--      insert can reach it any more: live runs are never dropped) and none
--      finished after the cutoff;
--   2. its foreign key to tasks is dropped (locks tasks);
--   3. the table is dropped: its files are unlinked while nobody waits for it (a
--      partition dropped while attached held runs locked through that unlink,
--      tens of ms per GB).
-- Each lock is waited for a few times 5 ms at most, and claims queue behind each
-- wait; a step still busy is taken at the next turn.
CREATE OR REPLACE FUNCTION pgbeat.drop_run_partitions(p_retention interval DEFAULT interval '30 days')
RETURNS integer
LANGUAGE plpgsql SET lock_timeout = '5ms' AS $$
DECLARE
    cutoff timestamptz := now() - p_retention;
    p regclass;
    step text;
    live text;
    busy boolean;
BEGIN
    IF p_retention IS NULL OR p_retention < interval '0' THEN
        PERFORM pgbeat.raise_invalid('retention', 'must be zero or positive');
    END IF;
    -- Steps 2 and 3 for a partition an earlier call detached.
    SELECT c.oid::regclass,
           coalesce((SELECT format('ALTER TABLE %s DROP CONSTRAINT %I', c.oid::regclass, k.conname)
                       FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f' LIMIT 1),
                    format('DROP TABLE %s', c.oid::regclass))
      INTO p, step
      FROM pg_class c
     WHERE c.relnamespace = 'pgbeat'::regnamespace AND c.relkind = 'r' AND NOT c.relispartition
       AND c.relname ~ '^runs_(before_)?[0-9]{8}$'
     LIMIT 1;
    IF p IS NOT NULL THEN
        FOR attempt IN 1..5 LOOP
            BEGIN
                EXECUTE step;
                RETURN 1;
            EXCEPTION WHEN lock_not_available THEN
                PERFORM pg_sleep(0.05);
            END;
        END LOOP;
        RETURN 0;
    END IF;
    -- Step 1.
    FOR p IN SELECT part FROM pgbeat.run_partitions() WHERE upper_bound <= cutoff ORDER BY upper_bound LOOP
        live := format('SELECT EXISTS (SELECT 1 FROM %1$s WHERE state = ''pending'')
                            OR EXISTS (SELECT 1 FROM %1$s WHERE state = ''running'')
                            OR EXISTS (SELECT 1 FROM %1$s WHERE finished_at >= $1)', p);
        EXECUTE live INTO busy USING cutoff;
        CONTINUE WHEN busy;
        FOR attempt IN 1..5 LOOP
            BEGIN
                EXECUTE format('ALTER TABLE pgbeat.runs DETACH PARTITION %s', p);
                EXECUTE live INTO busy USING cutoff;
                IF busy THEN  -- a run written meanwhile: it stays attached
                    RAISE EXCEPTION USING ERRCODE = 'object_in_use';
                END IF;
                RETURN 1;
            EXCEPTION
                WHEN lock_not_available THEN
                    PERFORM pg_sleep(0.05);
                WHEN object_in_use THEN
                    EXIT;
            END;
        END LOOP;
    END LOOP;
    RETURN 0;
END $$;

-- Retention row by row: delete up to p_batch finished runs older than
-- p_retention (oldest first, through runs_finished) where whole days cannot be
-- dropped: in runs_default, in runs_before_YYYYMMDD, in a day partition past the
-- cutoff that drop_run_partitions kept for a live run, or in an unpartitioned
-- pgbeat.runs. A day partition the cutoff falls in is left whole: its runs go with
-- it once the whole day is past. Then deleted tasks and stopped daemons with
-- nothing left that refers to them. Call repeatedly until it returns less than
-- p_batch.
CREATE OR REPLACE FUNCTION pgbeat.prune_history(p_retention interval DEFAULT interval '30 days',
                                     p_batch integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := now() - p_retention;
    p regclass;
    n integer := 0;
    k integer;
BEGIN
    IF p_retention IS NULL OR p_retention < interval '0' THEN
        PERFORM pgbeat.raise_invalid('retention', 'must be zero or positive');
    END IF;
    IF p_batch IS NULL OR p_batch < 1 THEN
        PERFORM pgbeat.raise_invalid('batch', 'must be at least 1');
    END IF;
    FOR p IN SELECT 'pgbeat.runs'::regclass
              WHERE NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'pgbeat.runs'::regclass)
             UNION ALL
             SELECT part FROM pgbeat.run_partitions() WHERE NOT whole_days OR upper_bound <= cutoff LOOP
        EXECUTE format('DELETE FROM %1$s WHERE id IN (
                            SELECT id FROM %1$s WHERE finished_at < $1 AND state NOT IN (''pending'', ''running'')
                             ORDER BY finished_at LIMIT $2)', p)
          USING cutoff, p_batch - n;
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
        EXIT WHEN n >= p_batch;
    END LOOP;
    DELETE FROM pgbeat.tasks t
     WHERE t.deleted_at < cutoff
       AND NOT EXISTS (SELECT 1 FROM pgbeat.runs r WHERE r.task_id = t.id);
    DELETE FROM pgbeat.daemons WHERE stopped_at < cutoff;
    RETURN n;
END $$;

-- Wake the schedulers when a task's slot or pause state changes, unless the
-- change is a scheduler's own (pgbeat.quiet) or the slot is more than 60 s away:
-- a scheduler asks the database at least every 30 s (its safety poll), so it
-- reads such a slot in time anyway, and every transaction that NOTIFYs takes one
-- database-wide lock until its commit is flushed (concurrent task creations then
-- commit one at a time). A change that leaves no active slot (a pause) notifies.
CREATE OR REPLACE FUNCTION pgbeat.notify_schedulers() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    earliest timestamptz;
    changed boolean;
BEGIN
    IF current_setting('pgbeat.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        SELECT bool_or(true), min(n.next_run_at) FILTER (WHERE NOT n.paused) INTO changed, earliest
          FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.next_run_at IS DISTINCT FROM o.next_run_at OR n.paused IS DISTINCT FROM o.paused;
    ELSE
        SELECT bool_or(true), min(n.next_run_at) FILTER (WHERE NOT n.paused) INTO changed, earliest
          FROM new_rows n;
    END IF;
    IF changed AND (earliest IS NULL OR earliest < now() + interval '60 seconds') THEN
        PERFORM pg_notify('pgbeat_scheduler', json_build_object('next_run_at', earliest)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER tasks_inserted_notify AFTER INSERT ON pgbeat.tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgbeat.notify_schedulers();

CREATE OR REPLACE TRIGGER tasks_updated_notify AFTER UPDATE ON pgbeat.tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgbeat.notify_schedulers();

-- Wake the workers when a pending run appears.
CREATE OR REPLACE FUNCTION pgbeat.notify_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE state = 'pending') THEN
        PERFORM pg_notify('pgbeat_worker', '');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER runs_inserted_notify AFTER INSERT ON pgbeat.runs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgbeat.notify_workers();
