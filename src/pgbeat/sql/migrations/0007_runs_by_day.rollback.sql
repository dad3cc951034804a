-- Back to one unpartitioned table, with the rows copied.
CREATE TABLE pgbeat.runs_flat (LIKE pgbeat.runs INCLUDING DEFAULTS INCLUDING IDENTITY);
INSERT INTO pgbeat.runs_flat OVERRIDING SYSTEM VALUE SELECT * FROM pgbeat.runs;
DO $$ BEGIN
    PERFORM setval(pg_get_serial_sequence('pgbeat.runs_flat', 'id'),
                  greatest((SELECT max(id) FROM pgbeat.runs_flat), (SELECT last_value FROM pgbeat.runs_id_seq)));
END $$;
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
              WHERE conrelid = 'pgbeat.runs'::regclass AND contype = 'c' ORDER BY conname LOOP
        EXECUTE format('ALTER TABLE pgbeat.runs_flat ADD CONSTRAINT %I %s', c.conname, c.def);
    END LOOP;
END $$;
DROP TABLE pgbeat.runs CASCADE;
ALTER TABLE pgbeat.runs_flat RENAME TO runs;
ALTER SEQUENCE pgbeat.runs_flat_id_seq RENAME TO runs_id_seq;
ALTER TABLE pgbeat.runs
    ADD CONSTRAINT runs_pkey PRIMARY KEY (id),
    ADD CONSTRAINT runs_one_per_slot UNIQUE (task_id, scheduled_for, attempt),
    ADD CONSTRAINT runs_task_id_fkey FOREIGN KEY (task_id) REFERENCES pgbeat.tasks (id);
CREATE UNIQUE INDEX runs_one_pending ON pgbeat.runs (task_id) WHERE state = 'pending';
CREATE INDEX runs_pending_due ON pgbeat.runs (due_at, id) WHERE state = 'pending';
CREATE INDEX runs_running ON pgbeat.runs (task_id) WHERE state = 'running';
CREATE INDEX runs_task_history ON pgbeat.runs (task_id, id DESC);
CREATE INDEX runs_finished ON pgbeat.runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_failed ON pgbeat.runs (finished_at, task_id)
    WHERE state IN ('failed', 'timed_out', 'abandoned');
