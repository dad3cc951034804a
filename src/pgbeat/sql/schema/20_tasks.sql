-- Tasks: create, update, pause, resume, delete and trigger a task, and the
-- checks of its fields (kind params, schedule, options). Each operation locks the
-- task row, validates everything (Rule 10), then writes. Cron slots are computed
-- by the caller (croniter, pgbeat.schedules); a slot it passes is checked here
-- against the expression (cron_slot_problem), so a psql caller cannot put a task
-- off its cron grid (Rules 7 and 10).

-- The kinds, as a message lists them: 'counter, http or sleep'.
CREATE OR REPLACE FUNCTION pgbeat.kind_names() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT regexp_replace(string_agg(name, ', ' ORDER BY name), ', ([^,]+)$', ' or \1') FROM pgbeat.kinds
$$;

-- One param's value, checked against its declaration (a Param of the kind's module,
-- pgbeat.kinds.params) and returned as stored.
CREATE OR REPLACE FUNCTION pgbeat.check_param(p_field text, p_param jsonb, p_value jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    lowest double precision := (p_param->>'minimum')::double precision;
    highest double precision := (p_param->>'maximum')::double precision;
    choices text[] := ARRAY(SELECT jsonb_array_elements_text(coalesce(p_param->'choices', '[]')));
    v text;
BEGIN
    CASE p_param->>'type'
    WHEN 'number' THEN
        PERFORM pgbeat.parse_number(p_field, p_value, lowest, highest);
        RETURN p_value;
    WHEN 'integer' THEN
        -- Stored as an integer (2.0 -> 2): finishing a counter's run casts it to bigint.
        RETURN to_jsonb(pgbeat.parse_number(p_field, p_value, lowest, highest, true)::bigint);
    WHEN 'text' THEN
        RETURN to_jsonb(pgbeat.parse_text(p_field, p_value, (p_param->>'max_length')::integer));
    WHEN 'url' THEN
        v := pgbeat.parse_text(p_field, p_value, (p_param->>'max_length')::integer);
        IF v !~* '^https?://[^/?#\s]+([/?#]\S*)?$' THEN
            PERFORM pgbeat.raise_invalid(p_field, format('%s is not an http:// or https:// URL', to_jsonb(v)));
        END IF;
        RETURN to_jsonb(v);
    WHEN 'choice' THEN
        IF jsonb_typeof(p_value) <> 'string' OR upper(p_value #>> '{}') <> ALL (choices) THEN
            PERFORM pgbeat.raise_invalid(p_field, 'must be one of ' || array_to_string(choices, ', '));
        END IF;
        RETURN to_jsonb(upper(p_value #>> '{}'));
    WHEN 'boolean' THEN
        RETURN to_jsonb(pgbeat.parse_boolean(p_field, p_value));
    END CASE;
END $$;

-- A kind's params, checked against its declaration in pgbeat.kinds (written by
-- pgbeat migrate from the kind's module), so psql users get the same rules as the
-- API. Returns the params with their defaults filled in.
CREATE OR REPLACE FUNCTION pgbeat.check_params(p_kind text, p_params jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    declared jsonb;
    param jsonb;
    value jsonb;
    checked jsonb := '{}';
BEGIN
    IF p_params IS NULL OR jsonb_typeof(p_params) = 'null' THEN
        p_params := '{}';
    ELSIF jsonb_typeof(p_params) <> 'object' THEN
        PERFORM pgbeat.raise_invalid('params', 'must be an object');
    END IF;
    -- Rule 18: params small and shallow enough for every reader (pgbeat.limits).
    IF octet_length(p_params::text) > 16384 THEN
        PERFORM pgbeat.raise_invalid('params', 'must be at most 16384 bytes as JSON');
    END IF;
    IF jsonb_path_exists(p_params, 'strict $.**{32 to last} ? (@.type() == "object" || @.type() == "array")') THEN
        PERFORM pgbeat.raise_invalid('params', 'nests deeper than 32 levels');
    END IF;
    SELECT k.params INTO declared FROM pgbeat.kinds k WHERE k.name = p_kind;
    IF NOT FOUND THEN
        PERFORM pgbeat.raise_invalid('kind', format('unknown kind %s (expected %s)',
                                                    coalesce(to_jsonb(p_kind)::text, 'null'), pgbeat.kind_names()));
    END IF;
    PERFORM pgbeat.reject_unknown_keys('params', p_params,
                                       ARRAY(SELECT e->>'name' FROM jsonb_array_elements(declared) e));
    FOR param IN SELECT * FROM jsonb_array_elements(declared) LOOP
        value := coalesce(p_params->(param->>'name'), param->'default');
        CONTINUE WHEN value IS NULL;
        checked := checked || jsonb_build_object(param->>'name',
                                                 pgbeat.check_param('params.' || (param->>'name'), param, value));
    END LOOP;
    RETURN checked;
END $$;

-- An IANA time zone name as the tz database spells it ('europe/paris' ->
-- 'Europe/Paris'), because croniter (zoneinfo) is case-sensitive; POSIX specs
-- such as 'UTC+3', which PostgreSQL accepts but zoneinfo does not, are refused.
CREATE OR REPLACE FUNCTION pgbeat.canonical_time_zone(p_field text, p_name text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    saved text := current_setting('timezone');
    canonical text;
BEGIN
    BEGIN
        PERFORM set_config('timezone', p_name, true);
        canonical := current_setting('timezone');
    EXCEPTION WHEN invalid_parameter_value THEN
        canonical := NULL;
    END;
    PERFORM set_config('timezone', saved, true);
    -- Files of the zone database that are not zones a user means (the host's own
    -- zone, a placeholder, a rules template, the duplicate trees) are refused too.
    IF canonical IS NULL OR canonical !~ '^[A-Za-z][A-Za-z0-9_]*(/[A-Za-z0-9_+-]+)*$'
       OR lower(canonical) IN ('localtime', 'factory', 'posixrules')
       OR lower(canonical) ~ '^(posix|right)/' THEN
        PERFORM pgbeat.raise_invalid(p_field, format('unknown time zone %s (use an IANA name such as "Europe/Paris")',
                                                     to_jsonb(p_name)));
    END IF;
    RETURN canonical;
END $$;

-- What is wrong with one field of a cron expression (NULL: nothing), read as
-- pgbeat.schedules.parse_cron reads it: each comma item is *, a value or a range
-- a-b of values, with an optional /step after * or a range; values within the
-- field's range, or its names (jan..dec, sun..sat). A psql caller's expression gets
-- the checks the API's Python makes (Rule 10).
CREATE OR REPLACE FUNCTION pgbeat.cron_field_problem(p_value text, p_name text, p_min integer,
                                                     p_max integer, p_names text[] DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    item text;
    span text;
    step text;
    part text;
    bounds integer[];
BEGIN
    FOREACH item IN ARRAY string_to_array(lower(p_value), ',') LOOP
        -- A plain match, then split_part: regexp_match's captures cost ~50 us a call.
        IF item !~ '^(\*|[0-9a-z]+(-[0-9a-z]+)?)(/[0-9]+)?$' THEN
            RETURN format('%s is not a valid %s field', to_jsonb(p_value), p_name);
        END IF;
        span := split_part(item, '/', 1);
        step := nullif(split_part(item, '/', 2), '');
        IF step IS NOT NULL AND (length(step) > 4 OR step::integer NOT BETWEEN 1 AND p_max - p_min + 1) THEN
            RETURN format('step %s is out of range in the %s field', step, p_name);
        END IF;
        IF span <> '*' THEN
            bounds := '{}';
            FOREACH part IN ARRAY string_to_array(span, '-') LOOP
                IF part ~ '^[0-9]+$' THEN
                    IF length(part) > 4 OR part::integer NOT BETWEEN p_min AND p_max THEN
                        RETURN format('%s is out of range in the %s field (%s-%s)', part, p_name, p_min, p_max);
                    END IF;
                    bounds := bounds || part::integer;
                ELSIF part = ANY (p_names) THEN
                    bounds := bounds || (array_position(p_names, part) - 1 + p_min);
                ELSE
                    RETURN format('%s is not a value of the %s field', to_jsonb(part), p_name);
                END IF;
            END LOOP;
            IF bounds[2] < bounds[1] THEN
                RETURN format('the range %s in the %s field goes backwards', to_jsonb(item), p_name);
            ELSIF step IS NOT NULL AND cardinality(bounds) = 1 THEN
                RETURN format('%s in the %s field: a step needs * or a range (write %s-%s/%s)',
                              to_jsonb(item), p_name, span, p_max, step);
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

-- The fields of a cron expression, an alias written out ('@daily': 0 0 * * *).
CREATE OR REPLACE FUNCTION pgbeat.cron_fields(p_cron text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT regexp_split_to_array(CASE lower(btrim(p_cron))
                                 WHEN '@yearly' THEN '0 0 1 1 *' WHEN '@annually' THEN '0 0 1 1 *'
                                 WHEN '@monthly' THEN '0 0 1 * *' WHEN '@weekly' THEN '0 0 * * 0'
                                 WHEN '@daily' THEN '0 0 * * *' WHEN '@midnight' THEN '0 0 * * *'
                                 WHEN '@hourly' THEN '0 * * * *' ELSE btrim(p_cron) END, '\s+')
$$;

-- The values one field names (checked by cron_field_problem) as a bit mask: bit v
-- set for each value v (every field's values are below 64). Bit arithmetic, no
-- query: a slot check reads six fields.
CREATE OR REPLACE FUNCTION pgbeat.cron_field_mask(p_value text, p_min integer, p_max integer,
                                                  p_names text[] DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    item text;
    span text;
    first text;
    last text;
    low integer;
    high integer;
    step integer;
    every_step bigint;  -- bits 0, step, 2 step, ...
    width integer;
    mask bigint := 0;
BEGIN
    FOREACH item IN ARRAY string_to_array(lower(p_value), ',') LOOP
        span := split_part(item, '/', 1);
        step := coalesce(nullif(split_part(item, '/', 2), '')::integer, 1);
        IF span = '*' THEN
            low := p_min;
            high := p_max;
        ELSE
            first := split_part(span, '-', 1);
            last := coalesce(nullif(split_part(span, '-', 2), ''), first);
            low := CASE WHEN first ~ '^[0-9]+$' THEN first::integer ELSE array_position(p_names, first) - 1 + p_min END;
            high := CASE WHEN last ~ '^[0-9]+$' THEN last::integer ELSE array_position(p_names, last) - 1 + p_min END;
        END IF;
        every_step := 1;
        width := step;
        WHILE width < 64 LOOP
            every_step := every_step | (every_step << width);
            width := width * 2;
        END LOOP;
        mask := mask | ((every_step << low) & (((1::bigint << (high + 1)) - 1) # ((1::bigint << low) - 1)));
    END LOOP;
    RETURN mask;
END $$;

-- The masks of an expression's fields, in cron's order with seconds last:
-- {minute, hour, day-of-month, month, day-of-week (7 is Sunday, 0), second (0 when
-- no 6th field is given)}. The expression must be one cron_expression_problem passes.
CREATE OR REPLACE FUNCTION pgbeat.cron_masks(p_cron text) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    f text[] := pgbeat.cron_fields(p_cron);
    dows bigint := pgbeat.cron_field_mask(f[5], 0, 7, '{sun,mon,tue,wed,thu,fri,sat}');
BEGIN
    RETURN ARRAY[pgbeat.cron_field_mask(f[1], 0, 59),
                 pgbeat.cron_field_mask(f[2], 0, 23),
                 pgbeat.cron_field_mask(f[3], 1, 31),
                 pgbeat.cron_field_mask(f[4], 1, 12, '{jan,feb,mar,apr,may,jun,jul,aug,sep,oct,nov,dec}'),
                 (dows | (dows >> 7)) & 127,
                 CASE WHEN cardinality(f) = 6 THEN pgbeat.cron_field_mask(f[6], 0, 59) ELSE 1 END];
END $$;

-- What is wrong with a cron expression (NULL: nothing), as the API's Python reads it
-- (pgbeat.schedules.parse_cron): 5 fields, 6 with seconds written last, or one of
-- the aliases standard cron knows; each field within its range; and some day it
-- names exists.
CREATE OR REPLACE FUNCTION pgbeat.cron_expression_problem(p_cron text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    f text[] := pgbeat.cron_fields(p_cron);
    problem text;
    masks bigint[];
BEGIN
    IF btrim(p_cron) ~ '^@' THEN
        IF lower(btrim(p_cron)) NOT IN ('@yearly', '@annually', '@monthly', '@weekly', '@daily', '@midnight', '@hourly') THEN
            RETURN format('%s is not an alias cron knows (@hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually)', to_jsonb(btrim(p_cron)));
        END IF;
    ELSIF cardinality(f) NOT IN (5, 6) THEN
        RETURN format('%s must have 5 fields (or 6, the 6th being seconds, written last)', to_jsonb(btrim(p_cron)));
    ELSIF p_cron !~ '^[0-9A-Za-z*/,\-\s]+$' THEN
        RETURN format('%s has characters cron does not use', to_jsonb(btrim(p_cron)));
    END IF;
    problem := coalesce(
        pgbeat.cron_field_problem(f[1], 'minute', 0, 59),
        pgbeat.cron_field_problem(f[2], 'hour', 0, 23),
        pgbeat.cron_field_problem(f[3], 'day-of-month', 1, 31),
        pgbeat.cron_field_problem(f[4], 'month', 1, 12, '{jan,feb,mar,apr,may,jun,jul,aug,sep,oct,nov,dec}'),
        pgbeat.cron_field_problem(f[5], 'day-of-week', 0, 7, '{sun,mon,tue,wed,thu,fri,sat}'),
        CASE WHEN cardinality(f) = 6 THEN pgbeat.cron_field_problem(f[6], 'seconds', 0, 59) END);
    IF problem IS NOT NULL THEN
        RETURN format('%s: %s', to_jsonb(btrim(p_cron)), problem);
    END IF;
    -- As parse_cron: unless the days are either-or with a restricted day-of-week,
    -- some month named must have some day named: a day up to the longest month's
    -- length (31: bits 1 3 5 7 8 10 12 = 5546; 30: bits 4 6 9 11 = 2640; else 29).
    masks := pgbeat.cron_masks(p_cron);
    IF NOT (f[3] !~ '^\*' AND f[5] !~ '^\*' AND masks[5] <> 127)
       AND masks[3] & ((1::bigint << (CASE WHEN masks[4] & 5546 <> 0 THEN 31
                                           WHEN masks[4] & 2640 <> 0 THEN 30 ELSE 29 END + 1)) - 2) = 0 THEN
        RETURN format('%s never fires: no month it names has the days it names', to_jsonb(btrim(p_cron)));
    END IF;
    RETURN NULL;
END $$;

-- Whether a wall-clock time is one a cron expression names (p_masks: cron_masks),
-- to the microsecond. The day rule is standard cron's: when both day fields are
-- restricted (p_either) a day matches if either does, else only if both do.
CREATE OR REPLACE FUNCTION pgbeat.cron_names_wall_time(p_masks bigint[], p_either boolean, p_wall timestamp)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_trunc('second', p_wall) = p_wall
       AND (p_masks[6] >> extract(second FROM p_wall)::integer) & 1 = 1
       AND (p_masks[1] >> extract(minute FROM p_wall)::integer) & 1 = 1
       AND (p_masks[2] >> extract(hour FROM p_wall)::integer) & 1 = 1
       AND (p_masks[4] >> extract(month FROM p_wall)::integer) & 1 = 1
       AND CASE WHEN p_either
                THEN (p_masks[3] >> extract(day FROM p_wall)::integer) & 1 = 1
                     OR (p_masks[5] >> extract(dow FROM p_wall)::integer) & 1 = 1
                ELSE (p_masks[3] >> extract(day FROM p_wall)::integer) & 1 = 1
                     AND (p_masks[5] >> extract(dow FROM p_wall)::integer) & 1 = 1 END
$$;

-- What is wrong with p_slot as a slot of a cron expression in a time zone (NULL:
-- nothing), so that a slot a caller passes keeps the task on its grid (Rule 7):
-- its wall time in the zone must match every field (seconds 0 without a 6th
-- field, microseconds 0). Across DST changes (README, "Cron across DST changes"),
-- as pgbeat.schedules computes slots: in the repeated hour of a fall-back both
-- occurrences match the fields; wall times skipped by a spring-forward run once,
-- at the instant of the jump plus the first second the expression names (croniter
-- keeps its seconds), so that instant is a slot when some skipped wall time
-- matches. Whether the slot is due is the caller's business (checked_cron_slot).
CREATE OR REPLACE FUNCTION pgbeat.cron_slot_problem(p_cron text, p_timezone text, p_slot timestamptz)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    problem text := pgbeat.cron_expression_problem(p_cron);
    f text[];
    masks bigint[];
    either boolean;
    first_second integer;
    jump timestamptz;
    utc timestamp;
    offset_before interval;
    offset_after interval;
BEGIN
    IF problem IS NOT NULL THEN
        RETURN problem;
    ELSIF p_slot IS NULL THEN
        RETURN 'no slot given';
    END IF;
    f := pgbeat.cron_fields(p_cron);
    masks := pgbeat.cron_masks(p_cron);
    either := f[3] !~ '^\*' AND f[5] !~ '^\*';
    IF pgbeat.cron_names_wall_time(masks, either, p_slot AT TIME ZONE p_timezone) THEN
        RETURN NULL;
    END IF;
    first_second := 0;
    WHILE (masks[6] >> first_second) & 1 = 0 AND first_second < 59 LOOP
        first_second := first_second + 1;
    END LOOP;
    jump := p_slot - make_interval(secs => first_second);
    utc := jump AT TIME ZONE 'UTC';
    offset_before := ((jump - interval '1 microsecond') AT TIME ZONE p_timezone) - (utc - interval '1 microsecond');
    offset_after := (jump AT TIME ZONE p_timezone) - utc;
    -- A jump forward: the wall times [utc + before, utc + after) were skipped.
    IF offset_after > offset_before THEN
        IF EXISTS (
            SELECT 1
              FROM generate_series(date_trunc('minute', utc + offset_before), utc + offset_after,
                                   interval '1 minute') m,
                   generate_series(0, 59) s,
                   LATERAL (SELECT m + make_interval(secs => s) AS wall) w
             WHERE (masks[6] >> s) & 1 = 1
               AND w.wall >= utc + offset_before AND w.wall < utc + offset_after
               AND pgbeat.cron_names_wall_time(masks, either, w.wall)) THEN
            RETURN NULL;
        END IF;
    END IF;
    RETURN format('%sZ is not a slot of %s in %s (it is %s there)', to_json(p_slot AT TIME ZONE 'UTC') #>> '{}',
                  to_jsonb(btrim(p_cron)), p_timezone, to_json(p_slot AT TIME ZONE p_timezone) #>> '{}');
END $$;

-- p_slot as task t's first (or next: p_what) cron slot, or refused naming
-- schedule.cron (Rule 10): a slot of its expression in its zone (Rule 7:
-- cron_slot_problem), and not in the past. Tolerance: 5 seconds. The API computes
-- the slot with croniter just before its transaction, whose now() may be a few
-- milliseconds later (more when a creation queues behind others, and the API's
-- clock may differ a little from the database's); a slot older than that would
-- fire at once as a misfire, which no caller means.
CREATE OR REPLACE FUNCTION pgbeat.checked_cron_slot(t pgbeat.tasks, p_slot timestamptz, p_what text)
RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    problem text;
BEGIN
    IF p_slot IS NULL THEN
        PERFORM pgbeat.raise_invalid('schedule.cron', coalesce(pgbeat.cron_expression_problem(t.cron), format(
            'the %s must be given (the caller computes cron slots, as the API does with croniter)',
            p_what)));
    END IF;
    problem := pgbeat.cron_slot_problem(t.cron, t.timezone, p_slot);
    IF problem IS NOT NULL THEN
        -- The expression's own problem (a row written by hand) rather than the slot's.
        PERFORM pgbeat.raise_invalid('schedule.cron', coalesce(pgbeat.cron_expression_problem(t.cron),
                                                               format('the %s %s', p_what, problem)));
    ELSIF p_slot < now() - interval '5 seconds' THEN
        PERFORM pgbeat.raise_invalid('schedule.cron', format('the %s %sZ is in the past', p_what,
                                                             to_json(p_slot AT TIME ZONE 'UTC') #>> '{}'));
    END IF;
    RETURN p_slot;
END $$;

-- Apply a schedule object ({"every"} | {"at"} | {"in"} | {"cron","timezone"})
-- to a task row in memory: sets every/anchor/run_at/cron/timezone/next_run_at.
-- Cron maths is croniter's: the caller computes the first cron slot, and it is
-- refused unless it is a slot of the expression in the zone, not in the past
-- (checked_cron_slot; Rules 7 and 10).
CREATE OR REPLACE FUNCTION pgbeat.apply_schedule(t pgbeat.tasks, p_schedule jsonb, p_first_slot timestamptz)
RETURNS pgbeat.tasks
LANGUAGE plpgsql AS $$
DECLARE
    forms text[];
    problem text;
BEGIN
    IF p_schedule IS NULL OR jsonb_typeof(p_schedule) <> 'object' THEN
        PERFORM pgbeat.raise_invalid('schedule', 'must be an object with one of every, at, in or cron');
    END IF;
    PERFORM pgbeat.reject_unknown_keys('schedule', p_schedule, ARRAY['every', 'at', 'in', 'cron', 'timezone', 'start']);
    forms := ARRAY(SELECT f FROM unnest(ARRAY['every', 'at', 'in', 'cron']) f WHERE p_schedule ? f);
    IF cardinality(forms) <> 1 THEN
        PERFORM pgbeat.raise_invalid('schedule', format('must have exactly one of every, at, in or cron (got %s)',
            coalesce(nullif(array_to_string(forms, ', '), ''), 'none')));
    END IF;
    IF p_schedule ? 'timezone' AND forms[1] <> 'cron' THEN
        PERFORM pgbeat.raise_invalid('schedule.timezone', 'applies only to cron schedules');
    END IF;
    IF p_schedule ? 'start' AND forms[1] <> 'every' THEN
        PERFORM pgbeat.raise_invalid('schedule.start', 'applies only to every schedules');
    END IF;
    t.every := NULL; t.anchor := NULL; t.run_at := NULL; t.cron := NULL; t.timezone := 'UTC';
    CASE forms[1]
    WHEN 'every' THEN
        t.every := pgbeat.parse_duration('schedule.every', p_schedule->'every');
        IF t.every < pgbeat.min_interval() THEN
            PERFORM pgbeat.raise_invalid('schedule.every', format('must be at least %ss (PGBEAT_MIN_INTERVAL)',
                trim_scale(extract(epoch FROM pgbeat.min_interval()))));
        END IF;
        -- The grid's origin: the first slot is one interval from now unless a start is given.
        t.anchor := coalesce(pgbeat.parse_timestamp('schedule.start', p_schedule->'start'), now() + t.every);
        t.next_run_at := CASE WHEN t.anchor > now() THEN t.anchor
                              ELSE pgbeat.grid_slot_after(t.anchor, t.every, now()) END;
    WHEN 'at' THEN
        t.run_at := pgbeat.parse_timestamp('schedule.at', p_schedule->'at');
        IF t.run_at IS NULL THEN
            PERFORM pgbeat.raise_invalid('schedule.at', 'is required');
        ELSIF t.run_at <= now() THEN
            PERFORM pgbeat.raise_invalid('schedule.at', format('%s is in the past', p_schedule->'at'));
        END IF;
        t.next_run_at := t.run_at;
    WHEN 'in' THEN
        t.run_at := now() + pgbeat.parse_duration('schedule.in', p_schedule->'in');
        t.next_run_at := t.run_at;
    WHEN 'cron' THEN
        t.cron := btrim(pgbeat.parse_text('schedule.cron', p_schedule->'cron', 200));
        -- Read as the API's Python reads it (pgbeat.schedules.parse_cron).
        problem := pgbeat.cron_expression_problem(t.cron);
        IF problem IS NOT NULL THEN
            PERFORM pgbeat.raise_invalid('schedule.cron', problem);
        END IF;
        IF p_schedule ? 'timezone' THEN
            t.timezone := pgbeat.canonical_time_zone('schedule.timezone',
                pgbeat.parse_text('schedule.timezone', p_schedule->'timezone', 64));
        END IF;
        t.next_run_at := pgbeat.checked_cron_slot(t, p_first_slot, 'first slot');
    END CASE;
    IF t.until IS NOT NULL AND t.next_run_at > t.until THEN
        t.next_run_at := NULL;
    END IF;
    RETURN t;
END $$;

-- Apply the optional fields every task has (shared by create and update).
CREATE OR REPLACE FUNCTION pgbeat.apply_options(t pgbeat.tasks, p_spec jsonb) RETURNS pgbeat.tasks
LANGUAGE plpgsql AS $$
BEGIN
    IF p_spec ? 'name' THEN
        t.name := pgbeat.parse_text('name', p_spec->'name', 200);
    END IF;
    IF p_spec ? 'timeout' THEN
        t.timeout := pgbeat.parse_number('timeout', p_spec->'timeout', 0.001, 86400);
    END IF;
    IF p_spec ? 'paused' THEN
        t.paused := pgbeat.parse_boolean('paused', p_spec->'paused');
    END IF;
    IF p_spec ? 'until' THEN
        t.until := pgbeat.parse_timestamp('until', p_spec->'until');
        IF t.until <= now() THEN
            PERFORM pgbeat.raise_invalid('until', format('%s is in the past', p_spec->'until'));
        END IF;
    END IF;
    IF p_spec ? 'max_runs' THEN
        t.max_runs := CASE WHEN jsonb_typeof(p_spec->'max_runs') = 'null' THEN NULL
                           ELSE pgbeat.parse_number('max_runs', p_spec->'max_runs', 1, 2147483647, true) END;
        IF t.max_runs < t.fired THEN
            PERFORM pgbeat.raise_invalid('max_runs', format('the task has already fired %s times', t.fired));
        END IF;
    END IF;
    IF p_spec ? 'overlap' THEN
        IF coalesce(p_spec->>'overlap', '') NOT IN ('queue', 'skip') THEN
            PERFORM pgbeat.raise_invalid('overlap', 'must be "queue" or "skip"');
        END IF;
        t.overlap_policy := p_spec->>'overlap';
    END IF;
    IF p_spec ? 'misfire' THEN
        IF coalesce(p_spec->>'misfire', '') NOT IN ('run_once', 'skip') THEN
            PERFORM pgbeat.raise_invalid('misfire', 'must be "run_once" or "skip"');
        END IF;
        t.misfire_policy := p_spec->>'misfire';
    END IF;
    IF p_spec ? 'misfire_grace' THEN
        t.misfire_grace := pgbeat.parse_number('misfire_grace', p_spec->'misfire_grace', 0, 86400);
    END IF;
    IF p_spec ? 'max_retries' THEN
        t.max_retries := pgbeat.parse_number('max_retries', p_spec->'max_retries', 0, 100, true);
    END IF;
    IF p_spec ? 'retry_backoff' THEN
        t.retry_backoff := pgbeat.parse_number('retry_backoff', p_spec->'retry_backoff', 0, 86400);
    END IF;
    RETURN t;
END $$;

CREATE OR REPLACE FUNCTION pgbeat.task_fields() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['name', 'kind', 'params', 'schedule', 'timeout', 'paused', 'until', 'max_runs',
                 'overlap', 'misfire', 'misfire_grace', 'max_retries', 'retry_backoff']
$$;

-- create_task('{"name": "ping", "kind": "http", "params": {...}, "schedule": {"every": "30s"}}')
-- The spec: a quoted literal, json or jsonb (parse_json_object).
-- p_first_slot: the first cron slot (required for cron schedules, ignored otherwise).
CREATE OR REPLACE FUNCTION pgbeat.create_task(p_spec anycompatible, p_first_slot timestamptz DEFAULT NULL)
RETURNS pgbeat.tasks
LANGUAGE plpgsql AS $$
DECLARE
    spec jsonb := pgbeat.parse_json_object('body', p_spec);
    t pgbeat.tasks;
BEGIN
    PERFORM pgbeat.reject_unknown_keys('', spec, pgbeat.task_fields());
    IF NOT spec ? 'kind' OR jsonb_typeof(spec->'kind') <> 'string' THEN
        PERFORM pgbeat.raise_invalid('kind', format('is required (%s)', pgbeat.kind_names()));
    END IF;
    t.kind := spec->>'kind';
    t.params := pgbeat.check_params(t.kind, spec->'params');
    t.name := coalesce(spec->>'name', t.kind);
    t.timeout := 60; t.paused := false; t.fired := 0;
    t.overlap_policy := 'queue'; t.misfire_policy := 'run_once'; t.misfire_grace := 60;
    t.max_retries := 0; t.retry_backoff := 10;
    t := pgbeat.apply_options(t, spec);
    IF NOT spec ? 'schedule' THEN
        PERFORM pgbeat.raise_invalid('schedule', 'is required');
    END IF;
    t := pgbeat.apply_schedule(t, spec->'schedule', p_first_slot);
    IF t.next_run_at IS NULL THEN
        -- A task that could never run is a mistake, not a task.
        PERFORM pgbeat.raise_invalid('until', format('%s is before the first slot', spec->'until'));
    END IF;
    INSERT INTO pgbeat.tasks (name, kind, params, every, run_at, cron, timezone, anchor, until, max_runs,
                              timeout, paused, next_run_at, overlap_policy, misfire_policy, misfire_grace,
                              max_retries, retry_backoff)
    VALUES (t.name, t.kind, t.params, t.every, t.run_at, t.cron, t.timezone, t.anchor, t.until, t.max_runs,
            t.timeout, t.paused, t.next_run_at, t.overlap_policy, t.misfire_policy, t.misfire_grace,
            t.max_retries, t.retry_backoff)
    RETURNING * INTO t;
    RETURN t;
END $$;

-- The task, locked for the rest of the transaction, to be changed: P0002 if it
-- never existed, 55000 if it is deleted (readable, never changed: Rule 11).
CREATE OR REPLACE FUNCTION pgbeat.lock_task(p_id integer) RETURNS pgbeat.tasks
LANGUAGE plpgsql AS $$
DECLARE
    t pgbeat.tasks;
BEGIN
    SELECT * INTO t FROM pgbeat.tasks WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pgbeat.raise_not_found(p_id);
    ELSIF t.deleted_at IS NOT NULL THEN
        PERFORM pgbeat.raise_deleted(p_id);
    END IF;
    RETURN t;
END $$;

-- Cancel the task's pending run, if any (pause, delete, schedule change).
CREATE OR REPLACE FUNCTION pgbeat.cancel_pending_run(p_task_id integer, p_reason text) RETURNS void
LANGUAGE sql AS $$
    UPDATE pgbeat.runs
       SET state = 'cancelled', started_at = now(), finished_at = now(), error = p_reason
     WHERE task_id = p_task_id AND state = 'pending'
$$;

-- Rule 17: set a task aside, because its own data made scheduling, claiming or
-- finishing it fail: it is paused (its pending run cancelled) with the error and
-- when, so it no longer costs any pass anything, and shows status 'error' until a
-- resume or a valid change clears it (update_task). Returns whether it was set
-- aside now (false: unknown, deleted, or already set aside).
CREATE OR REPLACE FUNCTION pgbeat.set_task_aside(p_id integer, p_error text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pgbeat.quiet', 'on', true);
    -- A next slot outside the range of times is dropped (a resume computes another).
    UPDATE pgbeat.tasks
       SET paused = true, error = left(coalesce(p_error, 'unknown error'), 2000), error_at = now(),
           next_run_at = CASE WHEN next_run_at >= pgbeat.earliest_time() AND next_run_at < pgbeat.latest_time()
                              THEN next_run_at END,
           updated_at = greatest(now(), created_at)
     WHERE id = p_id AND deleted_at IS NULL AND error IS NULL;
    PERFORM set_config('pgbeat.quiet', 'off', true);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pgbeat.cancel_pending_run(p_id, 'task set aside: ' || left(p_error, 200));
    RETURN true;
END $$;

-- update_task(7, '{"schedule": {"every": "1m"}, "paused": true}')
-- Only the given fields change; a new schedule starts a new grid (and drops a
-- pending run of the old schedule) but keeps fired, so a task that reached
-- max_runs stays complete unless the change also resets fired (0) or raises
-- max_runs. Cron: pass the first slot of the new schedule (or, resuming, the
-- next one). The changes: a quoted literal, json or jsonb (parse_json_object);
-- the id as psql users write it (task_id_of).
-- A task set aside (Rule 17) is resumed by any valid change that does not pause
-- it: the error is cleared, and the next pass sets it aside again if its data
-- still fails.
CREATE OR REPLACE FUNCTION pgbeat.update_task(p_id bigint, p_changes anycompatible,
                                              p_first_slot timestamptz DEFAULT NULL)
RETURNS pgbeat.tasks
LANGUAGE plpgsql AS $$
DECLARE
    tid integer := pgbeat.task_id_of(p_id);
    changes jsonb := pgbeat.parse_json_object('body', p_changes);
    t pgbeat.tasks;
    was_paused boolean;
BEGIN
    PERFORM pgbeat.reject_unknown_keys('', changes, array_append(pgbeat.task_fields(), 'fired'));
    t := pgbeat.lock_task(tid);
    was_paused := t.paused;
    -- fired counts the slots fired since creation, whatever the schedules; max_runs
    -- caps it. Only the user resets it: "fired": 0.
    IF changes ? 'fired' THEN
        IF changes->'fired' IS DISTINCT FROM '0'::jsonb THEN
            PERFORM pgbeat.raise_invalid('fired', 'can only be reset: 0');
        END IF;
        t.fired := 0;
    END IF;
    IF changes ? 'kind' AND changes->>'kind' IS DISTINCT FROM t.kind THEN
        PERFORM pgbeat.raise_invalid('kind', 'cannot be changed; create a new task');
    END IF;
    IF changes ? 'params' THEN
        t.params := pgbeat.check_params(t.kind, changes->'params');
    END IF;
    t := pgbeat.apply_options(t, changes);
    IF t.error IS NOT NULL AND NOT (changes ? 'paused' AND t.paused) THEN
        t.paused := false; t.error := NULL; t.error_at := NULL;
    END IF;
    IF changes ? 'schedule' THEN
        t := pgbeat.apply_schedule(t, changes->'schedule', p_first_slot);
        PERFORM pgbeat.cancel_pending_run(tid, 'schedule changed');
        IF t.fired >= t.max_runs THEN
            t.next_run_at := NULL;  -- a new schedule does not undo max_runs
        END IF;
    ELSIF changes ? 'until' OR changes ? 'max_runs' OR changes ? 'fired' THEN
        IF t.next_run_at IS NULL AND t.run_at IS NULL THEN
            -- Limits raised (or removed) on a repeating task they had completed:
            -- it continues with its next slot after now (cron: the caller's).
            t.next_run_at := CASE WHEN t.every IS NOT NULL THEN pgbeat.grid_slot_after(t.anchor, t.every, now())
                                  WHEN t.cron IS NOT NULL AND p_first_slot IS NOT NULL
                                  THEN pgbeat.checked_cron_slot(t, p_first_slot, 'next slot') END;
        END IF;
        IF (t.until IS NOT NULL AND t.next_run_at > t.until) OR t.fired >= t.max_runs THEN
            t.next_run_at := NULL;
        END IF;
    END IF;
    IF t.paused AND NOT was_paused THEN
        PERFORM pgbeat.cancel_pending_run(tid, 'task paused');
    ELSIF was_paused AND NOT t.paused AND NOT changes ? 'schedule' THEN
        t.next_run_at := pgbeat.resume_slot(t, p_first_slot);
    END IF;
    UPDATE pgbeat.tasks
       SET name = t.name, params = t.params, every = t.every, run_at = t.run_at, cron = t.cron,
           timezone = t.timezone, anchor = t.anchor, until = t.until, max_runs = t.max_runs,
           fired = t.fired, timeout = t.timeout, paused = t.paused, next_run_at = t.next_run_at,
           overlap_policy = t.overlap_policy, misfire_policy = t.misfire_policy,
           misfire_grace = t.misfire_grace, max_retries = t.max_retries,
           retry_backoff = t.retry_backoff, error = t.error, error_at = t.error_at, updated_at = now()
     WHERE id = tid
    RETURNING * INTO t;
    RETURN t;
END $$;

-- Where a resumed task continues: the next grid slot after now (slots that fell
-- due while paused were paused on purpose and are not misfires), the pending
-- one-shot time, or the caller's next cron slot (checked_cron_slot).
CREATE OR REPLACE FUNCTION pgbeat.resume_slot(t pgbeat.tasks, p_next_cron_slot timestamptz) RETURNS timestamptz
LANGUAGE plpgsql AS $$
BEGIN
    IF t.next_run_at IS NULL THEN
        RETURN NULL;  -- complete: nothing to resume
    ELSIF t.every IS NOT NULL THEN
        RETURN greatest(t.next_run_at, pgbeat.grid_slot_after(t.anchor, t.every, now()));
    ELSIF t.cron IS NOT NULL AND t.next_run_at < now() THEN
        RETURN pgbeat.checked_cron_slot(t, p_next_cron_slot, 'next slot');
    END IF;
    RETURN t.next_run_at;  -- one-shot keeps its time (runs now if it passed while paused)
END $$;

CREATE OR REPLACE FUNCTION pgbeat.pause_task(p_id bigint) RETURNS pgbeat.tasks
LANGUAGE sql AS $$ SELECT pgbeat.update_task(p_id, jsonb '{"paused": true}') $$;

CREATE OR REPLACE FUNCTION pgbeat.resume_task(p_id bigint, p_next_cron_slot timestamptz DEFAULT NULL)
RETURNS pgbeat.tasks
LANGUAGE sql AS $$
    SELECT pgbeat.update_task(p_id, jsonb '{"paused": false}', p_next_cron_slot)
$$;

-- Delete: future runs stop (the pending one is cancelled), a running one
-- finishes, and history stays readable (the row is kept, marked deleted).
CREATE OR REPLACE FUNCTION pgbeat.delete_task(p_task bigint) RETURNS pgbeat.tasks
LANGUAGE plpgsql AS $$
DECLARE
    p_id integer := pgbeat.task_id_of(p_task);
    t pgbeat.tasks;
BEGIN
    t := pgbeat.lock_task(p_id);
    PERFORM pgbeat.cancel_pending_run(p_id, 'task deleted');
    UPDATE pgbeat.tasks SET deleted_at = now(), next_run_at = NULL, updated_at = now()
     WHERE id = p_id RETURNING * INTO t;
    RETURN t;
END $$;

-- Run now: the task's pending run is made due now, or a new run is queued for
-- now (it starts as soon as a running one finishes). Works on paused tasks too:
-- an explicit request. Returns the pending run.
CREATE OR REPLACE FUNCTION pgbeat.trigger_task(p_task bigint) RETURNS pgbeat.runs
LANGUAGE plpgsql AS $$
DECLARE
    p_id integer := pgbeat.task_id_of(p_task);
    t pgbeat.tasks;
    r pgbeat.runs;
BEGIN
    t := pgbeat.lock_task(p_id);
    -- The task already has a pending run: that is the run. If it is not yet due
    -- (a retry's backoff) it is made due now. Its slot may be a hair after this
    -- transaction's now() (a concurrent trigger committed while we waited for the
    -- task lock): it is pending all the same, never a second pending run.
    UPDATE pgbeat.runs SET due_at = greatest(scheduled_for, least(due_at, now()))
     WHERE task_id = p_id AND state = 'pending'
    RETURNING * INTO r;
    IF FOUND THEN
        PERFORM pg_notify('pgbeat_worker', '');
    ELSE
        INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at)
        VALUES (p_id, t.kind, now(), now())
        RETURNING * INTO r;
    END IF;
    RETURN r;
END $$;
