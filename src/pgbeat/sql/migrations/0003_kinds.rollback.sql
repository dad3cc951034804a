ALTER TABLE pgbeat.tasks DROP CONSTRAINT tasks_kind_known,
    ADD CONSTRAINT tasks_kind_known CHECK (kind IN ('sleep', 'counter', 'http'));
ALTER TABLE pgbeat.runs ADD CONSTRAINT runs_kind_known CHECK (kind IN ('sleep', 'counter', 'http'));
DROP TABLE pgbeat.kinds;
