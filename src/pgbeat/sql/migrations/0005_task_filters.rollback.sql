-- pg_trgm stays: other schemas of the database may use it.
DROP INDEX IF EXISTS pgbeat.tasks_name_trgm;
DROP INDEX pgbeat.tasks_ended;
DROP INDEX pgbeat.tasks_paused;
DROP INDEX pgbeat.tasks_error;
DROP INDEX pgbeat.tasks_deleted;
