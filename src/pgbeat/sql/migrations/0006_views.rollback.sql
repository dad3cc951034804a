DROP VIEW pgbeat.live_daemons, pgbeat.task_locks, pgbeat.task_stats, pgbeat.upcoming_runs,
    pgbeat.run_history, pgbeat.task_status;
DROP FUNCTION pgbeat.schedule_json, pgbeat.format_duration;
