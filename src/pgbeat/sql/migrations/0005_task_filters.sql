-- depends: 0004_task_errors
--
-- The task list's filters (GET /tasks, the dashboard's task list; list_tasks in
-- 70_api.sql) as index lookups, so that a rare match does not walk every task.

-- A status other than active: its column conditions (those of task_status), so a
-- few paused, failed, finished or deleted tasks among 100,000 are found directly.
-- Keyed (kind, id): with a kind filter too, the index hands over that kind's tasks
-- in id order. Keyed (id), the planner walked all the paused tasks in id order for
-- the paused counters, assuming kinds spread evenly over ids; on the bench's data
-- (kinds created in batches) it read 4,500 others first.
CREATE INDEX tasks_deleted ON pgbeat.tasks (kind, id) WHERE deleted_at IS NOT NULL;
CREATE INDEX tasks_error ON pgbeat.tasks (kind, id) WHERE deleted_at IS NULL AND error IS NOT NULL;
CREATE INDEX tasks_paused ON pgbeat.tasks (kind, id) WHERE deleted_at IS NULL AND paused;
CREATE INDEX tasks_ended ON pgbeat.tasks (kind, id) WHERE deleted_at IS NULL AND next_run_at IS NULL;

-- Part of the name: a trigram index on lower(name), which list_tasks' LIKE uses.
-- pg_trgm ships with PostgreSQL's contrib (the embedded PostgreSQL has it too) and
-- is trusted, so the database owner may create it; where it is missing or may not
-- be created, there is no index and the search scans the tasks table, with the same
-- results. The extension goes in public, never in pgbeat: `pgbeat migrate` drops
-- every function of the pgbeat schema, and an extension's must stay.
DO $$
DECLARE
    trgm_schema name;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        BEGIN
            CREATE EXTENSION pg_trgm SCHEMA public;
        EXCEPTION WHEN insufficient_privilege OR invalid_schema_name THEN
            RAISE NOTICE 'pg_trgm not created (%): the task name search scans the tasks table', SQLERRM;
        END;
    END IF;
    -- Wherever the extension is (it may have been created before, in another schema).
    SELECT e.extnamespace::regnamespace::name INTO trgm_schema FROM pg_extension e WHERE e.extname = 'pg_trgm';
    IF trgm_schema IS NOT NULL THEN
        EXECUTE format('CREATE INDEX tasks_name_trgm ON pgbeat.tasks USING gin (lower(name) %I.gin_trgm_ops)',
                       trgm_schema);
    END IF;
END $$;
