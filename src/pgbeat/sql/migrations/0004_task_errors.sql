-- depends: 0003_kinds
--
-- A task whose own data breaks its scheduling, claim or finish is set aside
-- (Rule 17): paused, with the error and when, until a resume or a valid change
-- clears it. And the limits of Rule 18 as constraints, so that no row, however
-- written, holds a time the readers cannot represent or an interval that would
-- fire thousands of slots a second. They are NOT VALID: rows written before are
-- left as they are (the scheduling pass sets such a task aside), every new write
-- is checked.

ALTER TABLE pgbeat.tasks
    ADD COLUMN error text,
    ADD COLUMN error_at timestamptz,
    ADD CONSTRAINT tasks_error_when CHECK ((error IS NULL) = (error_at IS NULL)),
    ADD CONSTRAINT tasks_every_floor CHECK (every >= interval '100 milliseconds') NOT VALID,
    ADD CONSTRAINT tasks_times_in_range CHECK (
        next_run_at >= '1970-01-01 00:00:00+00' AND next_run_at < '9000-01-01 00:00:00+00'
        AND run_at >= '1970-01-01 00:00:00+00' AND run_at < '9000-01-01 00:00:00+00'
        AND anchor >= '1970-01-01 00:00:00+00' AND anchor < '9000-01-01 00:00:00+00'
        AND until >= '1970-01-01 00:00:00+00' AND until < '9000-01-01 00:00:00+00'
        AND created_at >= '1970-01-01 00:00:00+00' AND created_at < '9000-01-01 00:00:00+00'
        AND updated_at < '9000-01-01 00:00:00+00' AND deleted_at < '9000-01-01 00:00:00+00'
        AND error_at < '9000-01-01 00:00:00+00') NOT VALID,
    ADD CONSTRAINT tasks_every_in_range CHECK (every <= interval '3660 days') NOT VALID,
    ADD CONSTRAINT tasks_cron_length CHECK (length(cron) <= 200) NOT VALID,
    ADD CONSTRAINT tasks_timezone_length CHECK (length(timezone) <= 64) NOT VALID,
    ADD CONSTRAINT tasks_misfire_grace_range CHECK (misfire_grace <= 86400) NOT VALID,
    ADD CONSTRAINT tasks_retry_backoff_range CHECK (retry_backoff <= 86400) NOT VALID;

ALTER TABLE pgbeat.runs
    ADD CONSTRAINT runs_times_in_range CHECK (
        scheduled_for >= '1970-01-01 00:00:00+00' AND scheduled_for < '9000-01-01 00:00:00+00'
        AND due_at < '9000-01-01 00:00:00+00' AND started_at < '9000-01-01 00:00:00+00'
        AND finished_at < '9000-01-01 00:00:00+00') NOT VALID;
