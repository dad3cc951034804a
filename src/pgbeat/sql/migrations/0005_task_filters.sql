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

-- Part of the name is not indexed: a trigram index (pg_trgm) would make the search an
-- index lookup, but every scheduling decision moves the task's next_run_at, so each
-- would also add a GIN entry (no task update is HOT); the search scans instead.
