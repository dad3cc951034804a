DROP INDEX pgbeat.tasks_kind;
DROP INDEX pgbeat.runs_failed;
