-- depends: 0004_workers
--
-- Wake-ups. Statement-level triggers, so a bulk insert sends one notification,
-- and PostgreSQL folds identical notifications within a transaction into one.
--   pgbeat_scheduler  a task's slot or pause state changed: payload {"next_run_at": earliest or null}
--   pgbeat_worker     a pending run appeared: empty payload (trigger_task and
--                     release_task_locks also send it)
-- The scheduler's own advancing of next_run_at is quiet (fire_slot sets
-- pgbeat.quiet): it already knows, and other schedulers learn at their next wake.

CREATE FUNCTION pgbeat.notify_schedulers() RETURNS trigger
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
    IF changed THEN
        PERFORM pg_notify('pgbeat_scheduler', json_build_object('next_run_at', earliest)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER tasks_inserted_notify AFTER INSERT ON pgbeat.tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgbeat.notify_schedulers();
CREATE TRIGGER tasks_updated_notify AFTER UPDATE ON pgbeat.tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgbeat.notify_schedulers();

CREATE FUNCTION pgbeat.notify_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE state = 'pending') THEN
        PERFORM pg_notify('pgbeat_worker', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_inserted_notify AFTER INSERT ON pgbeat.runs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgbeat.notify_workers();
