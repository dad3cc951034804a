DROP FUNCTION pgbeat.api_create_tasks(jsonb[], timestamptz[]);
