DROP TRIGGER runs_inserted_notify ON pgbeat.runs;
DROP TRIGGER tasks_updated_notify ON pgbeat.tasks;
DROP TRIGGER tasks_inserted_notify ON pgbeat.tasks;
DROP FUNCTION pgbeat.notify_workers, pgbeat.notify_schedulers;
