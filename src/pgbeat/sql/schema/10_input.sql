-- Input: how every task operation reads its JSON input and refuses bad input
-- (Rule 10). Each check raises before anything is written:
--   22023 invalid_parameter_value   bad input; message "field: problem", COLUMN = field
--   P0002 no_data_found             a task id that never existed (or was pruned)
--   55000 object_not_in_prerequisite_state   valid input the task's state forbids
--                                    (a deleted task is readable, never changed)
-- The API maps these to 422 / 404 / 409 (pgbeat.api.errors).

CREATE OR REPLACE FUNCTION pgbeat.raise_invalid(p_field text, p_problem text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%: %', p_field, p_problem
        USING ERRCODE = 'invalid_parameter_value', COLUMN = p_field;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.raise_not_found(p_id integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'task % not found', p_id USING ERRCODE = 'no_data_found';
END $$;

-- A task id as psql users write it (7, 7::bigint, '7'): the functions they call take
-- bigint; an id past the column's range names no task.
CREATE OR REPLACE FUNCTION pgbeat.task_id_of(p_id bigint) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_id IS NULL OR p_id NOT BETWEEN 1 AND 2147483647 THEN
        RAISE EXCEPTION 'task % not found', p_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN p_id::integer;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.raise_deleted(p_id integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'task % is deleted (its history stays readable)', p_id
        USING ERRCODE = 'object_not_in_prerequisite_state';
END $$;

-- A duration given as seconds (JSON number) or interval text ('30s', '1h30m',
-- '2 minutes'), as a pure time interval (no day or month parts, so adding it
-- never depends on the session's time zone). The one rule for every entrance:
-- positive, at most 10 years. (The API and the CLI read their users' text, such
-- as 'every 2 minutes', into seconds first: pgbeat.schedules.parse_duration.)
CREATE OR REPLACE FUNCTION pgbeat.parse_duration(p_field text, p_value jsonb) RETURNS interval
LANGUAGE plpgsql AS $$
DECLARE
    v interval;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'is required');
    ELSIF jsonb_typeof(p_value) = 'number' THEN
        -- Range-checked as numeric first: a huge JSON number must not overflow
        -- double precision or interval (22003/22008) instead of saying what is wrong.
        IF (p_value #>> '{}')::numeric <= 0 THEN
            PERFORM pgbeat.raise_invalid(p_field, 'must be positive');
        ELSIF (p_value #>> '{}')::numeric > 3660 * 86400 THEN
            PERFORM pgbeat.raise_invalid(p_field, 'must be at most 10 years');
        END IF;
        v := make_interval(secs => (p_value #>> '{}')::double precision);
    ELSIF jsonb_typeof(p_value) = 'string' THEN
        BEGIN
            v := (p_value #>> '{}')::interval;
        EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow
                       OR interval_field_overflow OR syntax_error THEN
            PERFORM pgbeat.raise_invalid(p_field, format('%s is not a duration (use e.g. "30s", "2m", "1h30m")', p_value));
        END;
        IF extract(month FROM v) <> 0 OR extract(year FROM v) <> 0 THEN
            PERFORM pgbeat.raise_invalid(p_field, 'months and years are not a fixed duration; use a cron schedule');
        END IF;
        v := make_interval(secs => extract(epoch FROM v)::double precision);
    ELSE
        PERFORM pgbeat.raise_invalid(p_field, 'must be a number of seconds or a duration string');
    END IF;
    IF v <= interval '0' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be positive');
    END IF;
    IF v > interval '3660 days' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be at most 10 years');
    END IF;
    RETURN v;
END $$;

-- The range of times accepted anywhere (Rule 18; pgbeat.limits in Python, and the
-- CHECK constraints of migration 0002).
CREATE OR REPLACE FUNCTION pgbeat.earliest_time() RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT timestamptz '1970-01-01 00:00:00+00' $$;

CREATE OR REPLACE FUNCTION pgbeat.latest_time() RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT timestamptz '9000-01-01 00:00:00+00' $$;

-- The shortest `every` (Rule 18): the session's pgbeat.min_interval setting in
-- seconds (the API sets it from PGBEAT_MIN_INTERVAL on its sessions; for psql,
-- ALTER DATABASE ... SET pgbeat.min_interval = '0.5'), default 1, never under the
-- 100 ms that the tasks_every_floor constraint holds.
CREATE OR REPLACE FUNCTION pgbeat.min_interval() RETURNS interval
LANGUAGE plpgsql STABLE AS $$
DECLARE
    configured text := nullif(btrim(current_setting('pgbeat.min_interval', true)), '');
BEGIN
    RETURN make_interval(secs => greatest(0.1, coalesce(configured::double precision, 1)));
EXCEPTION WHEN invalid_text_representation THEN
    RETURN interval '1 second';
END $$;

CREATE OR REPLACE FUNCTION pgbeat.parse_timestamp(p_field text, p_value jsonb) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v timestamptz;
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        RETURN NULL;
    ELSIF jsonb_typeof(p_value) <> 'string' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be an ISO 8601 timestamp string');
    END IF;
    IF (p_value #>> '{}') !~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)$' THEN
        PERFORM pgbeat.raise_invalid(p_field, format('%s is not an ISO 8601 timestamp with a UTC offset', p_value));
    END IF;
    v := (p_value #>> '{}')::timestamptz;
    -- Rule 18: a time every reader can represent, after any time-zone shift or
    -- interval added to it (Python's datetime ends at 9999-12-31).
    IF NOT (v >= pgbeat.earliest_time() AND v < pgbeat.latest_time()) THEN
        PERFORM pgbeat.raise_invalid(p_field, format('must be from %s up to (not including) %s (UTC)',
            to_char(pgbeat.earliest_time() AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
            to_char(pgbeat.latest_time() AT TIME ZONE 'UTC', 'YYYY-MM-DD')));
    END IF;
    RETURN v;
EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
    PERFORM pgbeat.raise_invalid(p_field, format('%s is not a valid timestamp', p_value));
END $$;

CREATE OR REPLACE FUNCTION pgbeat.parse_number(p_field text, p_value jsonb, p_min double precision,
                                    p_max double precision, p_integer boolean DEFAULT false)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    v numeric;  -- JSON numbers are numeric: checked as such, so 1e400 is "out of range", not an overflow
BEGIN
    IF jsonb_typeof(p_value) IS DISTINCT FROM 'number' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be a number');
    END IF;
    v := (p_value #>> '{}')::numeric;
    IF p_integer AND v <> trunc(v) THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be an integer');
    END IF;
    IF v < p_min::numeric OR v > p_max::numeric THEN
        PERFORM pgbeat.raise_invalid(p_field, format('must be between %s and %s', p_min, p_max));
    END IF;
    RETURN v::double precision;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.parse_text(p_field text, p_value jsonb, p_max_length integer) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(p_value) IS DISTINCT FROM 'string' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be a string');
    END IF;
    IF length(p_value #>> '{}') NOT BETWEEN 1 AND p_max_length THEN
        PERFORM pgbeat.raise_invalid(p_field, format('must be 1 to %s characters', p_max_length));
    END IF;
    RETURN p_value #>> '{}';
END $$;

CREATE OR REPLACE FUNCTION pgbeat.parse_boolean(p_field text, p_value jsonb) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(p_value) IS DISTINCT FROM 'boolean' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be true or false');
    END IF;
    RETURN (p_value #>> '{}')::boolean;
END $$;

-- A task spec or changes as psql users write them: a quoted literal, json, jsonb or
-- jsonb_build_object(...). One polymorphic parameter takes them all: an overload
-- per type would make a quoted literal ambiguous ("function is not unique").
-- Text that is not JSON is refused naming the field, like every other bad input
-- (Rule 10), not with a raw 22P02.
CREATE OR REPLACE FUNCTION pgbeat.parse_json_object(p_field text, p_value anycompatible) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v jsonb;
BEGIN
    IF pg_typeof(p_value) = 'jsonb'::regtype THEN
        v := p_value;  -- the API's calls: no conversion, no subtransaction
    ELSE
        BEGIN
            v := p_value::text::jsonb;
        EXCEPTION WHEN invalid_text_representation OR untranslatable_character THEN
            PERFORM pgbeat.raise_invalid(p_field, 'is not valid JSON');
        END;
    END IF;
    IF v IS NULL OR jsonb_typeof(v) <> 'object' THEN
        PERFORM pgbeat.raise_invalid(p_field, 'must be a JSON object');
    END IF;
    RETURN v;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.reject_unknown_keys(p_field text, p_value jsonb, p_known text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k text;
BEGIN
    SELECT key INTO k FROM jsonb_object_keys(p_value) AS key WHERE key <> ALL (p_known) ORDER BY key LIMIT 1;
    IF k IS NOT NULL THEN
        PERFORM pgbeat.raise_invalid(concat_ws('.', nullif(p_field, ''), k),
            format('unknown field (expected one of: %s)', array_to_string(p_known, ', ')));
    END IF;
END $$;
