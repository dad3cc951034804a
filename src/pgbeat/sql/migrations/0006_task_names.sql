-- depends: 0005_task_filters
--
-- The task list's search for part of a name: task names, lowered, in a table of
-- their own (kept by the triggers in 70_api.sql), with a trigram index where
-- pg_trgm can be created. Not an
-- index on tasks: every scheduling decision updates a task's row (next_run_at), and
-- each such update would add entries to a GIN index there; names rarely change.
-- pg_trgm ships with PostgreSQL's contrib (the embedded PostgreSQL has it too) and
-- is trusted, so the database owner may create it; where it is missing or may not
-- be created, the search scans this narrow table, with the same results. The
-- extension goes in public, never in pgbeat: `pgbeat migrate` drops every function
-- of the pgbeat schema, and an extension's must stay.
CREATE TABLE pgbeat.task_names (
    task_id integer PRIMARY KEY REFERENCES pgbeat.tasks (id) ON DELETE CASCADE,
    name text NOT NULL
);
INSERT INTO pgbeat.task_names (task_id, name) SELECT id, lower(name) FROM pgbeat.tasks;

DO $$
DECLARE
    trgm_schema name;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        BEGIN
            CREATE EXTENSION pg_trgm SCHEMA public;
        EXCEPTION WHEN insufficient_privilege OR invalid_schema_name THEN
            RAISE NOTICE 'pg_trgm not created (%): the task name search scans pgbeat.task_names', SQLERRM;
        END;
    END IF;
    -- Wherever the extension is (it may have been created before, in another schema).
    SELECT e.extnamespace::regnamespace::name INTO trgm_schema FROM pg_extension e WHERE e.extname = 'pg_trgm';
    IF trgm_schema IS NOT NULL THEN
        EXECUTE format('CREATE INDEX task_names_trgm ON pgbeat.task_names USING gin (name %I.gin_trgm_ops)',
                       trgm_schema);
    END IF;
END $$;
