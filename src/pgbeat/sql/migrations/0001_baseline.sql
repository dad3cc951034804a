-- v1 baseline: the tables, their constraints and indexes, as pgbeat 0.1 shipped them.
--
-- Frozen: a released migration is never edited. A table change is a new numbered
-- migration (0002_..., 0003_...). Functions, views and triggers are not here: each
-- is defined once, in its current form, in sql/schema/, which `pgbeat migrate`
-- applies after the migrations (see CONTRIBUTING.md, "Database code").
--
-- Advisory lock keys (two-int4 form, kept apart from single-bigint users):
--   (1885823604 = 'pgbt', task_id)    held by the worker session running the task (Rule 2)
--   (1885823588 = 'pgbd', daemon_id)  held by each live daemon on its own session (Rule 12)

CREATE SCHEMA pgbeat;

CREATE TABLE pgbeat.tasks (
    id              integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text        NOT NULL,
    kind            text        NOT NULL,
    params          jsonb       NOT NULL DEFAULT '{}',
    -- the schedule: exactly one of every / run_at / cron
    every           interval,
    run_at          timestamptz,
    cron            text,
    timezone        text        NOT NULL DEFAULT 'UTC',
    anchor          timestamptz,          -- origin of the interval grid
    until           timestamptz,
    max_runs        integer,
    fired           integer     NOT NULL DEFAULT 0,  -- slots materialised so far
    timeout         double precision NOT NULL DEFAULT 60,
    paused          boolean     NOT NULL DEFAULT false,
    next_run_at     timestamptz,          -- NULL: nothing more to run (complete or deleted)
    overlap_policy  text        NOT NULL DEFAULT 'queue',
    misfire_policy  text        NOT NULL DEFAULT 'run_once',
    misfire_grace   double precision NOT NULL DEFAULT 60,
    max_retries     integer     NOT NULL DEFAULT 0,
    retry_backoff   double precision NOT NULL DEFAULT 10,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    CONSTRAINT tasks_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT tasks_kind_known CHECK (kind IN ('sleep', 'counter', 'http')),
    CONSTRAINT tasks_params_object CHECK (jsonb_typeof(params) = 'object'),
    CONSTRAINT tasks_one_schedule CHECK (num_nonnulls(every, run_at, cron) = 1),
    CONSTRAINT tasks_every_positive CHECK (every > interval '0'),
    CONSTRAINT tasks_every_has_anchor CHECK ((every IS NULL) = (anchor IS NULL)),
    CONSTRAINT tasks_cron_not_blank CHECK (length(btrim(cron)) > 0),
    CONSTRAINT tasks_max_runs_positive CHECK (max_runs > 0),
    CONSTRAINT tasks_fired_bounded CHECK (fired >= 0 AND (max_runs IS NULL OR fired <= max_runs)),
    CONSTRAINT tasks_timeout_positive CHECK (timeout > 0 AND timeout <= 86400),
    CONSTRAINT tasks_overlap_policy CHECK (overlap_policy IN ('queue', 'skip')),
    CONSTRAINT tasks_misfire_policy CHECK (misfire_policy IN ('run_once', 'skip')),
    CONSTRAINT tasks_misfire_grace CHECK (misfire_grace >= 0),
    CONSTRAINT tasks_retries CHECK (max_retries BETWEEN 0 AND 100),
    CONSTRAINT tasks_retry_backoff CHECK (retry_backoff >= 0),
    CONSTRAINT tasks_deleted_inactive CHECK (deleted_at IS NULL OR next_run_at IS NULL),
    CONSTRAINT tasks_updated_after_created CHECK (updated_at >= created_at)
);

-- The scheduler's question: which active task is due next?
CREATE INDEX tasks_due ON pgbeat.tasks (next_run_at)
    WHERE NOT paused AND next_run_at IS NOT NULL;
-- Listing live tasks newest id first (keyset pagination).
CREATE INDEX tasks_live ON pgbeat.tasks (id) WHERE deleted_at IS NULL;

CREATE TABLE pgbeat.runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         integer     NOT NULL REFERENCES pgbeat.tasks (id),
    kind            text        NOT NULL,
    scheduled_for   timestamptz NOT NULL,   -- the slot
    due_at          timestamptz NOT NULL,   -- when it may start (later for a retry)
    state           text        NOT NULL DEFAULT 'pending',
    attempt         integer     NOT NULL DEFAULT 1,
    coalesced       integer     NOT NULL DEFAULT 0,  -- further slots folded into this run
    daemon_id       integer,                -- the worker that ran it
    backend_pid     integer,                -- that worker's session, holder of the task lock
    started_at      timestamptz,
    finished_at     timestamptz,
    result          jsonb,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT runs_state_known CHECK (state IN
        ('pending', 'running', 'succeeded', 'failed', 'timed_out', 'abandoned', 'cancelled', 'skipped')),
    CONSTRAINT runs_kind_known CHECK (kind IN ('sleep', 'counter', 'http')),
    CONSTRAINT runs_attempt_positive CHECK (attempt >= 1),
    CONSTRAINT runs_coalesced CHECK (coalesced >= 0),
    CONSTRAINT runs_due_after_slot CHECK (due_at >= scheduled_for),
    CONSTRAINT runs_pending_unstarted CHECK (state <> 'pending' OR (started_at IS NULL AND finished_at IS NULL)),
    CONSTRAINT runs_running_started CHECK (state <> 'running'
        OR (started_at IS NOT NULL AND finished_at IS NULL AND backend_pid IS NOT NULL)),
    CONSTRAINT runs_done_finished CHECK (state IN ('pending', 'running') OR finished_at IS NOT NULL),
    CONSTRAINT runs_finished_after_started CHECK (finished_at >= started_at),
    CONSTRAINT runs_result_object CHECK (result IS NULL OR jsonb_typeof(result) = 'object'),
    -- Rule 1: a (task, slot, attempt) becomes at most one run.
    CONSTRAINT runs_one_per_slot UNIQUE (task_id, scheduled_for, attempt)
);

-- Rule 3: at most one pending run per task.
CREATE UNIQUE INDEX runs_one_pending ON pgbeat.runs (task_id) WHERE state = 'pending';
-- Workers: pending runs by the time they may start.
CREATE INDEX runs_pending_due ON pgbeat.runs (due_at, id) WHERE state = 'pending';
-- Reaper and "is it running": the few running runs.
CREATE INDEX runs_running ON pgbeat.runs (task_id) WHERE state = 'running';
-- A task's history newest first (all history newest first is the primary key).
CREATE INDEX runs_task_history ON pgbeat.runs (task_id, id DESC);
-- Retention: finished runs by age.
CREATE INDEX runs_finished ON pgbeat.runs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE pgbeat.counters (
    name        text        PRIMARY KEY,
    value       bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT counters_name_length CHECK (length(name) BETWEEN 1 AND 200)
);

CREATE TABLE pgbeat.daemons (
    id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    role          text        NOT NULL,
    host          text        NOT NULL,
    pid           integer     NOT NULL,
    backend_pid   integer     NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz,
    CONSTRAINT daemons_role_known CHECK (role IN ('scheduler', 'worker', 'api'))
);
CREATE INDEX daemons_unstopped ON pgbeat.daemons (id) WHERE stopped_at IS NULL;
