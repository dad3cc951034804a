-- depends: 0006_task_names
--
-- History by day: pgbeat.runs becomes a table partitioned by its slot
-- (scheduled_for), one partition per UTC day, so that retention drops a day of
-- finished runs as a whole table instead of deleting it row by row (a DELETE of
-- 100 million rows bloats the table and its indexes and competes with the claims).
-- Partitions are added ahead and dropped past retention by add_run_partitions and
-- prune_history (50_daemons.sql).
--
--   runs_before_YYYYMMDD  every slot before the day this migration ran
--   runs_YYYYMMDD         one day's slots, [day, day + 1)
--   runs_default          a slot no partition covers (a stray: pruned row by row)
--
-- What the partitioning changes about the rules:
-- * Rule 1: runs_one_per_slot holds the partition key, so it stays one index over
--   every partition. The primary key becomes (id, scheduled_for): ids stay unique
--   (one identity sequence), and it still serves look-ups and pages by id.
-- * Rule 3: a unique index must hold the partition key, so runs_one_pending is
--   each partition's own (named <partition>_one_pending); across partitions every
--   statement that writes a pending run holds the task's row lock and looks for a
--   pending run afresh (30_scheduling.sql, 40_claims.sql, 20_tasks.sql).
--
-- The rows are copied (this migration reads and writes the whole history once).

CREATE TABLE pgbeat.runs_by_day (LIKE pgbeat.runs INCLUDING DEFAULTS INCLUDING IDENTITY)
    PARTITION BY RANGE (scheduled_for);

-- Partitions before the copy, so each row lands where it belongs.
DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date;
BEGIN
    EXECUTE format('CREATE TABLE pgbeat.%I PARTITION OF pgbeat.runs_by_day FOR VALUES FROM (MINVALUE) TO (%L)',
                   'runs_before_' || to_char(today, 'YYYYMMDD'), today::timestamp AT TIME ZONE 'UTC');
    FOR d IN SELECT generate_series(today, today + 2, interval '1 day')::date LOOP
        EXECUTE format('CREATE TABLE pgbeat.%I PARTITION OF pgbeat.runs_by_day FOR VALUES FROM (%L) TO (%L)',
                       'runs_' || to_char(d, 'YYYYMMDD'), d::timestamp AT TIME ZONE 'UTC',
                       (d + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END $$;
CREATE TABLE pgbeat.runs_default PARTITION OF pgbeat.runs_by_day DEFAULT;

INSERT INTO pgbeat.runs_by_day OVERRIDING SYSTEM VALUE SELECT * FROM pgbeat.runs;
DO $$ BEGIN
    PERFORM setval(pg_get_serial_sequence('pgbeat.runs_by_day', 'id'),
                  greatest((SELECT max(id) FROM pgbeat.runs_by_day),
                           (SELECT last_value FROM pgbeat.runs_id_seq)));
END $$;

-- The old table's checks, as they were (those added NOT VALID stay NOT VALID).
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
              WHERE conrelid = 'pgbeat.runs'::regclass AND contype = 'c' ORDER BY conname LOOP
        EXECUTE format('ALTER TABLE pgbeat.runs_by_day ADD CONSTRAINT %I %s', c.conname, c.def);
    END LOOP;
END $$;

-- Its views, functions and triggers go with it; `pgbeat migrate` creates them again
-- from the schema files right after the migrations.
DROP TABLE pgbeat.runs CASCADE;
ALTER TABLE pgbeat.runs_by_day RENAME TO runs;
ALTER SEQUENCE pgbeat.runs_by_day_id_seq RENAME TO runs_id_seq;

ALTER TABLE pgbeat.runs
    ADD CONSTRAINT runs_pkey PRIMARY KEY (id, scheduled_for),
    -- Rule 1: a (task, slot, attempt) becomes at most one run.
    ADD CONSTRAINT runs_one_per_slot UNIQUE (task_id, scheduled_for, attempt),
    ADD CONSTRAINT runs_task_id_fkey FOREIGN KEY (task_id) REFERENCES pgbeat.tasks (id);

-- The indexes the unpartitioned table had, on every partition.
CREATE INDEX runs_pending_due ON pgbeat.runs (due_at, id) WHERE state = 'pending';
CREATE INDEX runs_running ON pgbeat.runs (task_id) WHERE state = 'running';
CREATE INDEX runs_task_history ON pgbeat.runs (task_id, id DESC);
CREATE INDEX runs_finished ON pgbeat.runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_failed ON pgbeat.runs (finished_at, task_id)
    WHERE state IN ('failed', 'timed_out', 'abandoned');

-- Rule 3 within each partition.
DO $$
DECLARE
    p regclass;
BEGIN
    FOR p IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'pgbeat.runs'::regclass LOOP
        EXECUTE format('CREATE UNIQUE INDEX %I ON %s (task_id) WHERE state = ''pending''',
                       (SELECT relname FROM pg_class WHERE oid = p) || '_one_pending', p);
    END LOOP;
END $$;
