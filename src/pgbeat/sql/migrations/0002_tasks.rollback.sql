DROP FUNCTION pgbeat.trigger_task, pgbeat.delete_task, pgbeat.resume_task, pgbeat.pause_task,
    pgbeat.resume_slot, pgbeat.update_task, pgbeat.cancel_pending_run, pgbeat.lock_task,
    pgbeat.create_task, pgbeat.task_fields, pgbeat.apply_options, pgbeat.apply_schedule,
    pgbeat.canonical_time_zone, pgbeat.grid_slot_after, pgbeat.check_params, pgbeat.reject_unknown_keys, pgbeat.parse_boolean,
    pgbeat.parse_text, pgbeat.parse_number, pgbeat.parse_timestamp, pgbeat.parse_duration,
    pgbeat.raise_not_found, pgbeat.raise_invalid, pgbeat.daemon_lock_ns, pgbeat.task_lock_ns;
