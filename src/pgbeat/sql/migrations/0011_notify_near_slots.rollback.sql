-- Back to the 0005 notify_schedulers.

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
    IF changed THEN
        PERFORM pg_notify('pgbeat_scheduler', json_build_object('next_run_at', earliest)::text);
    END IF;
    RETURN NULL;
END $$;

