-- depends: 0002_dashboard_indexes
--
-- The list of task kinds in one place. The kinds were listed in two CHECK
-- constraints, in check_params and in finish_runs; now pgbeat.kinds holds them,
-- written by `pgbeat migrate` from the kind modules' declarations (pgbeat.kinds:
-- name, params, finish behaviour), and the SQL reads it.
--   tasks.kind  references it (a task of an unknown kind cannot exist).
--   runs.kind   is copied from the run's task, so it needs no check of its own (and
--               the hot insert of every run pays for no foreign key).

CREATE TABLE pgbeat.kinds (
    name    text    PRIMARY KEY,
    -- The params the kind accepts, in order: [{"name", "type", "minimum"?, "maximum"?,
    -- "max_length"?, "choices"?, "default"?}, ...] (check_params reads it).
    params  jsonb   NOT NULL DEFAULT '[]',
    -- A succeeded run adds params.step to the counter params.counter (Rule 4).
    counts  boolean NOT NULL DEFAULT false,
    CONSTRAINT kinds_name_format CHECK (name ~ '^[a-z][a-z0-9_]*$'),
    CONSTRAINT kinds_params_array CHECK (jsonb_typeof(params) = 'array')
);

-- The kinds existing tasks use, until migrate writes their declarations.
INSERT INTO pgbeat.kinds (name) SELECT DISTINCT kind FROM pgbeat.tasks;

ALTER TABLE pgbeat.tasks DROP CONSTRAINT tasks_kind_known,
    ADD CONSTRAINT tasks_kind_known FOREIGN KEY (kind) REFERENCES pgbeat.kinds (name);
ALTER TABLE pgbeat.runs DROP CONSTRAINT runs_kind_known;
