-- depends: 0001_baseline
--
-- Indexes for the dashboard's reads (sql/queries.sql, dashboard_*), so that a page
-- costs the same with 100,000 tasks and millions of runs.

-- The overview's failing tasks: the hour's failures, without reading its successes.
CREATE INDEX runs_failed ON pgbeat.runs (finished_at, task_id)
    WHERE state IN ('failed', 'timed_out', 'abandoned');

-- Tasks of one kind, in id order (the task list filtered by kind, keyset-paged; with
-- a status filter too, which may ask for deleted tasks).
CREATE INDEX tasks_kind ON pgbeat.tasks (kind, id);
