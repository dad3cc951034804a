DROP FUNCTION pgbeat.metric_values, pgbeat.api_trigger_task, pgbeat.api_resume_task, pgbeat.api_pause_task,
    pgbeat.api_update_task, pgbeat.api_create_task, pgbeat.upcoming_slots,
    pgbeat.task_runs, pgbeat.list_runs, pgbeat.list_tasks, pgbeat.get_run, pgbeat.get_task;
DROP VIEW pgbeat.api_task_details, pgbeat.api_runs, pgbeat.api_tasks;
