-- depends: 0010_materialize_ahead
--
-- notify_schedulers stays quiet about slots more than 60 s away. A scheduler asks
-- the database at least every 30 s (its safety poll, SAFETY_POLL in scheduler.py),
-- so it reads such a slot in time anyway; and every transaction that NOTIFYs
-- takes one database-wide lock until its commit is flushed, so concurrent task
-- creations committed one at a time: 2,920 creates/s at 8 clients with the
-- notification, 5,020 without. A change that leaves no active slot (a pause)
-- still notifies, as before.

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

