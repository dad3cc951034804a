"""The task, run and upcoming endpoints: each validates, calls one stored function
(sql/schema/70_api.sql wraps those of 20_tasks.sql) and shapes the rows it returns."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, Response, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.datastructures import ResponseHeader, State
from litestar.exceptions import NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.spec import Example
from litestar.params import Body, JSONBody, PathParameter, QueryParameter

from pgbeat import limits, queries, schedules
from pgbeat.api.errors import BadInput
from pgbeat.api.models import (
    MAX_INT4,
    MAX_INT8,
    Run,
    RunPage,
    RunState,
    ScheduleIn,
    ScheduleOut,
    Task,
    TaskChanges,
    TaskDetails,
    TaskFields,
    TaskKind,
    TaskPage,
    TaskSpec,
    TaskStatus,
    UpcomingRun,
    UpcomingRuns,
)
from pgbeat.api.openapi import errors
from pgbeat.config import Config
from pgbeat.egress import HttpPolicy, redact, redact_url

ANSWER_ENCODER = msgspec.json.Encoder()
TaskId = Annotated[int, PathParameter(ge=1, description="task id (one that cannot exist is 404)")]
RunId = Annotated[int, PathParameter(ge=1, description="run id (one that cannot exist is 404)")]
PageLimit = Annotated[int, QueryParameter(ge=1, le=500, description="page size (at most 500)")]
CURSOR = (
    "where the page starts: the previous page's `next_cursor` (the id of its last row); "
    "leave out for the first page"
)


def cursor_parameter(maximum: int) -> Any:
    """A cursor: digits, read by parse_cursor (msgspec would read `1e3` as 1000); an
    integer in the OpenAPI document, which is what digits in a query string are."""
    schema = {"type": "integer", "minimum": 1, "maximum": maximum}
    return Annotated[str | None, QueryParameter(description=CURSOR, schema_extra=schema)]


TaskCursor = cursor_parameter(MAX_INT4)
RunCursor = cursor_parameter(MAX_INT8)
RunStateFilter = Annotated[
    RunState | None, QueryParameter(name="state", description="only runs in this state")
]
KindFilter = Annotated[TaskKind | None, QueryParameter(description="only tasks of this kind")]
RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def moment_parameter(description: str) -> Any:
    """A time in the query string (parsed by query_time: msgspec would take `0.5` as 1970)."""
    return Annotated[
        str | None,
        QueryParameter(
            description=description + "; RFC 3339 with an offset (`2026-11-23T10:00:00Z`)",
            schema_extra={"format": "date-time"},
        ),
    ]


SinceParameter = moment_parameter("only runs scheduled at or after this time")
UntilParameter = moment_parameter("only runs scheduled before this time")
UpcomingUntilParameter = moment_parameter("only executions up to this time")


TASK_EXAMPLE = {
    "name": "ping",
    "kind": "http",
    "params": {"url": "https://httpbin.org/status/200"},
    "schedule": {"every": "30s"},
    "timeout": 10,
}


# ---------------------------------------------------------------- shaping rows


def without_credentials(doc: Any, *keys: str) -> Any:
    """doc (params or a result) with the credentials of its URLs redacted."""
    if not isinstance(doc, dict) or not any(isinstance(doc.get(k), str) and "@" in doc[k] for k in keys):
        return doc
    return {**doc, **{k: redact_url(doc[k]) for k in keys if k in doc}}


def task_from_row(row: asyncpg.Record, cls: type[Task] = Task) -> Task:
    values = {name: row[name] for name in cls.__struct_fields__ if name not in ("last_run", "pending_run")}
    values["schedule"] = msgspec.convert(row["schedule"], ScheduleOut)
    values["params"] = without_credentials(values["params"], "url")
    return cls(**values)


def answer_task(row: asyncpg.Record) -> Task:
    """The task as the API answers it, proven encodable: called inside the write's
    transaction, so a row that cannot be answered is rolled back (Rule 10)."""
    task = task_from_row(row)
    ANSWER_ENCODER.encode(task)
    return task


def answer_run(row: asyncpg.Record) -> Run:
    run = run_from_row(row)
    ANSWER_ENCODER.encode(run)
    return run


def task_details_from_row(row: asyncpg.Record) -> TaskDetails:
    task = task_from_row(row, TaskDetails)
    assert isinstance(task, TaskDetails)
    task.last_run = without_run_credentials(msgspec.convert(row["last_run"], Run | None))
    task.pending_run = without_run_credentials(msgspec.convert(row["pending_run"], Run | None))
    return task


def without_run_credentials(run: Run | None) -> Run | None:
    if run is not None:
        run.result = without_credentials(run.result, "url", "final_url")
        run.error = redact(run.error) if run.error else run.error
    return run


def run_from_row(row: asyncpg.Record) -> Run:
    run = without_run_credentials(Run(**{name: row[name] for name in Run.__struct_fields__}))
    assert run is not None
    return run


# Query parameters whose value is text: for any other, the word "null" is refused.
TEXT_PARAMETERS = frozenset({"name"})


def parameters_that_mean_something(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """A guard: `?state=null` is refused (msgspec would read it as None: no filter; a
    query string has no null, a parameter is left out instead), and a task or run id
    beyond its column's range names nothing (404, not an integer type's error)."""
    for name, value in connection.query_params.multi_items():
        if value == "null" and name not in TEXT_PARAMETERS:
            raise BadInput(name, "'null' is not a value: leave the parameter out", 400)
    params = connection.path_params
    if params.get("task_id", 0) > MAX_INT4:
        raise NotFoundException(f"task {params['task_id']} not found")
    if params.get("run_id", 0) > MAX_INT8:
        raise NotFoundException(f"run {params['run_id']} not found")


def parse_cursor(cursor: str | None, maximum: int) -> int | None:
    if not cursor:
        return None
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 20) or not 0 < int(cursor) <= maximum:
        raise BadInput("cursor", f"{cursor!r} is not a cursor (pass next_cursor of the previous page)", 400)
    return int(cursor)


def next_cursor(rows: list[Any], limit: int) -> str | None:
    return str(rows[-1]["id"]) if len(rows) == limit else None


def query_time(field: str, value: str | None) -> datetime | None:
    """A query parameter's time: RFC 3339 with an offset, as in bodies (400 otherwise,
    a naive time included: whose clock would it be?)."""
    if value is None:
        return None
    match = RFC3339.fullmatch(value.strip())
    if match is None:
        raise BadInput(field, f"{value!r} is not a time with an offset, such as 2026-11-23T10:00:00Z", 400)
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8).upper()
    leap = second == 60  # RFC 3339 allows a leap second; Python and PostgreSQL do not
    try:
        moment = datetime.fromisoformat(
            f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{min(second, 59):02d}"
            f"{fraction[:7]}{'+00:00' if offset == 'Z' else offset}"
        )
    except ValueError as exc:
        raise BadInput(field, f"{value!r} is not a time: {exc}", 400) from None
    # A well-formed time pgbeat keeps none at (pgbeat.limits) is refused as in bodies (422).
    problem = limits.time_problem(moment)
    if problem:
        raise BadInput(field, problem, 422)
    return moment.astimezone(UTC) + timedelta(seconds=leap)


# ---------------------------------------------------------------- schedules


def _seconds(field: str, value: float | str) -> float:
    """The duration's text read as seconds; its range is the database's (parse_duration)."""
    try:
        return schedules.parse_duration(value)
    except ValueError as exc:
        raise BadInput(field, str(exc)) from None


def schedule_for_sql(schedule: ScheduleIn, min_interval: float) -> tuple[dict[str, Any], datetime | None]:
    """The schedule as the stored functions take it (durations in seconds) and, for
    cron, its first slot (croniter's maths; the database does not do calendars)."""
    doc = msgspec.to_builtins(schedule)
    forms = [form for form in ("every", "at", "in", "cron") if form in doc]
    if len(forms) != 1:
        return doc, None  # the database says what is wrong with it
    first_slot = None
    if "every" in doc:
        doc["every"] = _seconds("schedule.every", doc["every"])
        if doc["every"] < min_interval:
            raise BadInput("schedule.every", f"must be at least {min_interval:g}s (PGBEAT_MIN_INTERVAL)")
    elif "in" in doc:
        doc["in"] = _seconds("schedule.in", doc["in"])
    elif "cron" in doc:
        first_slot = first_cron_slot(doc["cron"], doc.get("timezone", "UTC"))
    return doc, first_slot


def first_cron_slot(cron: str, timezone: str, after: datetime | None = None) -> datetime:
    """The first slot after `after` (by default this host's now: enough to check the
    expression; the slot written is computed again from the database's clock)."""
    try:
        schedules.check_timezone(timezone)
    except ValueError as exc:
        raise BadInput("schedule.timezone", str(exc)) from None
    try:
        return schedules.next_cron_slot(cron, timezone, after or datetime.now(UTC))
    except ValueError as exc:
        raise BadInput("schedule.cron", str(exc)) from None
    except Exception as exc:  # croniter raises assorted errors for odd expressions
        raise BadInput("schedule.cron", f"{cron!r} is not a valid cron expression: {exc}") from None


def check_limits(spec: TaskFields, doc: dict[str, Any], policy: HttpPolicy) -> None:
    """The limits the API can check before calling the database (pgbeat.limits), and
    the http kind's egress policy, which only the API and the worker know."""
    where = limits.nul_field(doc, "")
    if where:
        raise BadInput(where, "must not contain NUL characters")
    schedule = spec.schedule if isinstance(spec.schedule, ScheduleIn) else ScheduleIn()
    for field, moment in (
        ("until", spec.until),
        ("schedule.at", schedule.at),
        ("schedule.start", schedule.start),
    ):
        problem = limits.time_problem(moment) if isinstance(moment, datetime) else None
        if problem:
            raise BadInput(field, problem)
    params = doc.get("params")
    if not isinstance(params, dict):
        return
    if limits.json_depth(params) > limits.MAX_PARAMS_DEPTH:
        raise BadInput("params", f"nests deeper than {limits.MAX_PARAMS_DEPTH} levels")
    if len(msgspec.json.encode(params)) > limits.MAX_PARAMS_BYTES:
        raise BadInput("params", f"must be at most {limits.MAX_PARAMS_BYTES} bytes as JSON")
    url = params.get("url")
    refused = policy.url_refusal(url) if isinstance(url, str) else None
    if refused:
        raise BadInput("params.url", f"{redact_url(url)} {refused}")


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """What the API checks input against besides pgbeat.limits: from the Config."""

    http_policy: HttpPolicy = dataclasses.field(default_factory=HttpPolicy)
    min_interval: float = limits.MIN_INTERVAL_SECONDS

    @classmethod
    def of(cls, config: Config) -> InputLimits:
        return cls(config.http, config.min_interval)


def spec_for_sql(spec: TaskFields, given: InputLimits) -> tuple[dict[str, Any], datetime | None]:
    doc = msgspec.to_builtins(spec)
    check_limits(spec, doc, given.http_policy)
    first_slot = None
    if isinstance(spec.schedule, ScheduleIn):
        doc["schedule"], first_slot = schedule_for_sql(spec.schedule, given.min_interval)
    return doc, first_slot


async def cron_slot_now(conn: asyncpg.Connection, doc: dict[str, Any]) -> datetime:
    """The first slot of the cron schedule in `doc`, from the transaction's clock: the one
    the database checks it against, so a host whose clock lags, or a request that waited
    for a connection, never writes a slot already past (Rule 7)."""
    now = await conn.fetchval(queries.get("transaction_now"))
    return first_cron_slot(doc["cron"], doc.get("timezone", "UTC"), now)


async def resume_cron_slot(conn: asyncpg.Connection, task_id: int, resuming: bool = True) -> datetime | None:
    """Lock the task (P0002 when unknown) and, for a cron task that resumes (or one set
    aside, which any change resumes: Rule 17), compute where it resumes."""
    row = await conn.fetchrow(queries.get("lock_task_schedule"), task_id)
    if row["cron"] is None or not (resuming or row["error"] is not None):
        return None
    try:
        return schedules.next_cron_slot(row["cron"], row["timezone"], row["now"])
    except Exception as exc:  # croniter's assorted errors: the stored schedule is the problem
        problem = f"the task's cron schedule cannot be computed ({exc}); give a new one"
        raise BadInput("schedule", problem) from None


# ---------------------------------------------------------------- upcoming


def _cron_times(cron: str, timezone: str, first: datetime) -> Iterator[datetime]:
    yield first
    after, chunk = first, 8
    while after < limits.LATEST:  # (Rule 18: no slot past the range of times)
        try:
            batch = schedules.cron_slots(cron, timezone, after, chunk)
        except Exception:  # croniter's errors: a stored schedule it rejects has no more slots here
            return
        yield from (moment for moment in batch if moment < limits.LATEST)
        after, chunk = batch[-1], min(chunk * 2, 256)


def _slot_times(row: asyncpg.Record) -> Iterator[datetime]:
    first = row["scheduled_for"]
    if row["every_seconds"] is not None:
        every = timedelta(seconds=row["every_seconds"])
        # (no slot at or past the range of times: Rule 18)
        return itertools.takewhile(
            lambda moment: moment < limits.LATEST,
            (first + every * i for i in range(int((limits.LATEST - first) / every) + 2)),
        )
    if row["cron"] is not None:
        return _cron_times(row["cron"], row["timezone"], first)
    return iter([first])


def upcoming_of(row: asyncpg.Record, until: datetime | None) -> Iterator[UpcomingRun]:
    """The executions one row of pgbeat.upcoming_slots stands for, soonest first."""
    bounds = [b for b in (row["until"], until) if b is not None]
    last = min(bounds) if bounds else None
    times = _slot_times(row)
    if row["remaining"] is not None:
        times = itertools.islice(times, max(row["remaining"], 0))
    for moment in times:
        if last is not None and moment > last:
            return
        yield UpcomingRun(row["task_id"], row["task_name"], row["kind"], moment, row["source"], row["run_id"])


def soonest(rows: list[asyncpg.Record], limit: int, until: datetime | None) -> list[UpcomingRun]:
    merged = heapq.merge(*(upcoming_of(row, until) for row in rows), key=lambda u: u.scheduled_for)
    return list(itertools.islice(merged, limit))


# ---------------------------------------------------------------- task operations
# What the endpoints do, callable with a pool alone: the dashboard (pgbeat.api.ui)
# takes its actions through these same calls.


async def update_task(
    pool: asyncpg.Pool, task_id: int, changes: TaskChanges, given: InputLimits = InputLimits()
) -> Task:
    doc, first_slot = spec_for_sql(changes, given)
    # Every write's answer is shaped inside its transaction (Rule 10: no 5xx after a commit).
    async with pool.acquire() as conn, conn.transaction():
        if first_slot is not None:
            first_slot = await cron_slot_now(conn, doc["schedule"])
        if changes.paused is not True and not isinstance(changes.schedule, ScheduleIn):
            first_slot = await resume_cron_slot(conn, task_id, resuming=changes.paused is False)
        return answer_task(await conn.fetchrow(queries.get("update_task"), task_id, doc, first_slot))


async def delete_task(pool: asyncpg.Pool, task_id: int) -> None:
    await pool.fetchval(queries.get("delete_task"), task_id)


async def pause_task(pool: asyncpg.Pool, task_id: int) -> Task:
    async with pool.acquire() as conn, conn.transaction():
        return answer_task(await conn.fetchrow(queries.get("pause_task"), task_id))


async def resume_task(pool: asyncpg.Pool, task_id: int) -> Task:
    async with pool.acquire() as conn, conn.transaction():
        slot = await resume_cron_slot(conn, task_id)
        return answer_task(await conn.fetchrow(queries.get("resume_task"), task_id, slot))


async def trigger_task(pool: asyncpg.Pool, task_id: int) -> Run:
    async with pool.acquire() as conn, conn.transaction():
        return answer_run(await conn.fetchrow(queries.get("trigger_task"), task_id))


async def get_task(pool: asyncpg.Pool, task_id: int) -> TaskDetails:
    row = await pool.fetchrow(queries.get("get_task"), task_id)
    if row is None:
        raise NotFoundException(f"task {task_id} not found")
    return task_details_from_row(row)


async def get_run(pool: asyncpg.Pool, run_id: int) -> Run:
    row = await pool.fetchrow(queries.get("get_run"), run_id)
    if row is None:
        raise NotFoundException(f"run {run_id} not found")
    return run_from_row(row)


async def task_upcoming(pool: asyncpg.Pool, task_id: int, count: int) -> list[UpcomingRun]:
    rows = await pool.fetch(queries.get("upcoming_slots"), count, None, task_id)
    return soonest(rows, count, None)


# ---------------------------------------------------------------- endpoints


class TaskController(Controller):
    path = "/tasks"
    tags = ["tasks"]
    guards = [parameters_that_mean_something]

    @post(
        status_code=201,
        operation_id="createTask",
        summary="Schedule a task",
        response_description="the task; its URL in Location",
        response_headers=[
            ResponseHeader(
                name="Location",
                value="/tasks/7",
                description="the task's URL: /tasks/{id}",
                required=True,
                documentation_only=True,
            )
        ],
        responses=errors(413, 422, write=True),
    )
    async def create_task(
        self,
        state: State,
        data: Annotated[TaskSpec, Body(examples=[Example(value=TASK_EXAMPLE)])],
    ) -> Response[Task]:
        doc, first_slot = spec_for_sql(data, state.input_limits)
        task = await state.creations.create(doc, first_slot)
        return Response(task, status_code=201, headers={"Location": f"/tasks/{task.id}"})

    @get(operation_id="listTasks", summary="List tasks (oldest first, keyset pagination)", responses=errors())
    async def list_tasks(
        self,
        state: State,
        kind: KindFilter = None,
        status: Annotated[TaskStatus | None, QueryParameter(description="only tasks in this status")] = None,
        paused: Annotated[bool | None, QueryParameter(description="only paused (or unpaused) tasks")] = None,
        name: Annotated[str | None, QueryParameter(description="part of the name, any case")] = None,
        limit: PageLimit = 100,
        cursor: TaskCursor = None,
    ) -> TaskPage:
        rows = await state.pool.fetch(
            queries.get("list_tasks"),
            kind,
            status,
            paused,
            name,
            parse_cursor(cursor, MAX_INT4),
            limit,
        )
        return TaskPage([task_details_from_row(row) for row in rows], next_cursor(rows, limit))

    @get(
        "/{task_id:int}",
        operation_id="getTask",
        summary="One task, with its last run and pending run",
        responses=errors(404),
    )
    async def get_task(self, state: State, task_id: TaskId) -> TaskDetails:
        return await get_task(state.pool, task_id)

    @patch(
        "/{task_id:int}",
        operation_id="updateTask",
        summary="Change schedule, params, timeout, name, paused...",
        responses=errors(404, 409, 413, 422, write=True),
    )
    async def update_task(self, state: State, task_id: TaskId, data: JSONBody[TaskChanges]) -> Task:
        return await update_task(state.pool, task_id, data, state.input_limits)

    @delete(
        "/{task_id:int}",
        operation_id="deleteTask",
        summary="Delete: future runs stop, the task and its history stay readable",
        responses=errors(404, 409, write=True),  # 409: already deleted
    )
    async def delete_task(self, state: State, task_id: TaskId) -> None:
        await delete_task(state.pool, task_id)

    @post(
        "/{task_id:int}/pause",
        status_code=200,
        operation_id="pauseTask",
        summary="Pause (a pending run is cancelled)",
        responses=errors(404, 409, write=True),
    )
    async def pause_task(self, state: State, task_id: TaskId) -> Task:
        return await pause_task(state.pool, task_id)

    @post(
        "/{task_id:int}/resume",
        status_code=200,
        operation_id="resumeTask",
        summary="Resume at the next slot",
        responses=errors(404, 409, write=True),
    )
    async def resume_task(self, state: State, task_id: TaskId) -> Task:
        return await resume_task(state.pool, task_id)

    @post(
        "/{task_id:int}/trigger",
        status_code=202,
        operation_id="triggerTask",
        summary="Run now (returns the pending run)",
        responses=errors(404, 409, write=True),
    )
    async def trigger_task(self, state: State, task_id: TaskId) -> Run:
        return await trigger_task(state.pool, task_id)

    @get(
        "/{task_id:int}/runs",
        operation_id="listTaskRuns",
        summary="A task's runs, newest first",
        responses=errors(404),
    )
    async def task_runs(
        self,
        state: State,
        task_id: TaskId,
        run_state: RunStateFilter = None,
        limit: PageLimit = 100,
        cursor: RunCursor = None,
    ) -> RunPage:
        rows = await state.pool.fetch(
            queries.get("task_runs"), task_id, run_state, parse_cursor(cursor, MAX_INT8), limit
        )
        return RunPage([run_from_row(row) for row in rows], next_cursor(rows, limit))

    @get(
        "/{task_id:int}/upcoming",
        operation_id="listTaskUpcoming",
        summary="A task's next executions",
        responses=errors(404),
    )
    async def task_upcoming(
        self,
        state: State,
        task_id: TaskId,
        count: Annotated[int, QueryParameter(ge=1, le=500, description="how many (at most 500)")] = 10,
    ) -> UpcomingRuns:
        return UpcomingRuns(await task_upcoming(state.pool, task_id, count))


class RunController(Controller):
    path = "/runs"
    tags = ["runs"]
    guards = [parameters_that_mean_something]

    @get(
        operation_id="listRuns",
        summary="All runs, newest first (keyset pagination)",
        responses=errors(404, 422),  # a task_id that never existed; a time outside pgbeat's range
    )
    async def list_runs(
        self,
        state: State,
        task_id: Annotated[int | None, QueryParameter(ge=1, description="only this task's")] = None,
        run_state: RunStateFilter = None,
        kind: KindFilter = None,
        since: SinceParameter = None,
        until: UntilParameter = None,
        limit: PageLimit = 100,
        cursor: RunCursor = None,
    ) -> RunPage:
        if task_id is not None and task_id > MAX_INT4:
            raise NotFoundException(f"task {task_id} not found")  # as for any id that never existed
        rows = await state.pool.fetch(
            queries.get("list_runs"),
            task_id,
            run_state,
            kind,
            query_time("since", since),
            query_time("until", until),
            parse_cursor(cursor, MAX_INT8),
            limit,
        )
        return RunPage([run_from_row(row) for row in rows], next_cursor(rows, limit))

    @get("/{run_id:int}", operation_id="getRun", summary="One run", responses=errors(404))
    async def get_run(self, state: State, run_id: RunId) -> Run:
        return await get_run(state.pool, run_id)


@get(
    "/upcoming",
    tags=["runs"],
    operation_id="listUpcoming",
    guards=[parameters_that_mean_something],
    summary="The next executions across all tasks, soonest first",
    responses=errors(422),  # a time outside the range pgbeat keeps
)
async def upcoming(
    state: State,
    limit: Annotated[int, QueryParameter(ge=1, le=500, description="how many (at most 500)")] = 20,
    until: UpcomingUntilParameter = None,
) -> UpcomingRuns:
    end = query_time("until", until)
    rows = await state.pool.fetch(queries.get("upcoming_slots"), limit, end, None)
    return UpcomingRuns(soonest(rows, limit, end))
