DROP VIEW IF EXISTS pgbeat.api_task_details, pgbeat.api_tasks, pgbeat.task_status CASCADE;
ALTER TABLE pgbeat.runs DROP CONSTRAINT runs_times_in_range;
ALTER TABLE pgbeat.tasks
    DROP CONSTRAINT tasks_retry_backoff_range,
    DROP CONSTRAINT tasks_misfire_grace_range,
    DROP CONSTRAINT tasks_timezone_length,
    DROP CONSTRAINT tasks_cron_length,
    DROP CONSTRAINT tasks_every_in_range,
    DROP CONSTRAINT tasks_times_in_range,
    DROP CONSTRAINT tasks_every_floor,
    DROP CONSTRAINT tasks_error_when,
    DROP COLUMN error_at,
    DROP COLUMN error;
