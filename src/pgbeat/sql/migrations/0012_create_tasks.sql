-- depends: 0011_notify_near_slots
--
-- api_create_tasks: several task creations in one call and one transaction. The
-- API sends the creations that arrive while an earlier one is in flight together
-- (pgbeat.api.creations): a transaction's commit, not its inserts, is what a
-- creation costs. One create per transaction ran 2,240 creates/s at 8 clients;
-- ten per transaction, 22,200/s. Each spec is created exactly as api_create_task
-- creates it; if any is refused, nothing is written and the caller creates them
-- one at a time, so that each gets its own answer.

CREATE FUNCTION pgbeat.api_create_tasks(p_specs jsonb[], p_first_slots timestamptz[])
RETURNS SETOF pgbeat.api_tasks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    ids integer[] := '{}';
BEGIN
    IF cardinality(p_specs) IS DISTINCT FROM cardinality(p_first_slots) THEN
        PERFORM pgbeat.raise_invalid('tasks', 'specs and first slots must have the same length');
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_specs), 0) LOOP
        ids := ids || (pgbeat.create_task(p_specs[i], p_first_slots[i])).id;
    END LOOP;
    -- In the order given.
    RETURN QUERY SELECT t.* FROM unnest(ids) WITH ORDINALITY AS u(id, ord)
                   JOIN pgbeat.api_tasks t ON t.id = u.id
                  ORDER BY u.ord;
END $$;
