DROP FUNCTION pgbeat.next_due_at, pgbeat.fire_cron_slots, pgbeat.due_cron_tasks,
    pgbeat.materialize_due_runs, pgbeat.fire_slot;
