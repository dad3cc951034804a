DROP INDEX pgbeat.tasks_ended;
DROP INDEX pgbeat.tasks_paused;
DROP INDEX pgbeat.tasks_error;
DROP INDEX pgbeat.tasks_deleted;
