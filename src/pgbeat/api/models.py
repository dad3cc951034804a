"""Request and response bodies of the REST API, as msgspec Structs.

Request bodies are validated by msgspec (types, unknown fields); everything else
(kinds, params, ranges, past times) by the stored functions, which name the field.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

# A timestamp with a UTC offset ("2027-08-08T17:35:00Z"); naive ones are refused.
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
MAX_INT4 = 2**31 - 1
MAX_INT8 = 2**63 - 1


# Enums, not Literals: each is one named schema in the OpenAPI document, and so one
# class in a generated client, wherever it appears.
class TaskKind(StrEnum):
    """pgbeat.kinds; the database refuses any other"""

    SLEEP = "sleep"
    COUNTER = "counter"
    HTTP = "http"


class TaskStatus(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETE = "complete"
    DELETED = "deleted"
    ERROR = "error"  # set aside (RULES.md, Rule 17)


class RunState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ABANDONED = "abandoned"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class Overlap(StrEnum):
    """what a slot does while the task's previous run is pending or running"""

    QUEUE = "queue"
    SKIP = "skip"


class Misfire(StrEnum):
    """what slots missed while no scheduler ran become"""

    RUN_ONCE = "run_once"
    SKIP = "skip"


# A duration: seconds, or text such as "30s", "2m", "1h30m", "every 2 minutes".
Duration = float | str
CronText = Annotated[
    str,
    msgspec.Meta(
        description=(
            "A cron expression read as standard cron (Vixie cron, cronie, POSIX) reads it: five fields"
            " (minute hour day-of-month month day-of-week) with lists, ranges a-b, steps */n and a-b/n,"
            " month and weekday names; or an alias: @hourly, @daily (@midnight), @weekly, @monthly,"
            " @yearly (@annually). When both day fields are restricted a day matches if either does;"
            " when either starts with '*' (as '*/10' does) only if both do. An optional 6th field is"
            " seconds, written last: '0 9 * * 1-5 30' fires at 09:00:30 on weekdays, and"
            " '*/15 * * * * *' every second of minutes 0, 15, 30 and 45. L, W, #, ? and @reboot are"
            " refused. Computed in `timezone`."
        ),
        examples=["*/5 * * * *", "0 9 * * MON-FRI", "@daily", "0 12 1,15 * *"],
    ),
]


class ScheduleIn(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Exactly one of every, at, in or cron (the database checks which)."""

    every: Duration | UnsetType = UNSET
    at: Timestamp | UnsetType = UNSET
    in_: Duration | UnsetType = msgspec.field(default=UNSET, name="in")
    cron: CronText | UnsetType = UNSET
    timezone: str | UnsetType = UNSET
    start: Timestamp | UnsetType = UNSET  # every: the grid's first slot (default: one interval from now)


class TaskFields(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The fields a task is created with, each of them optional here."""

    name: str | UnsetType = UNSET
    kind: str | UnsetType = UNSET
    params: dict[str, Any] | UnsetType = UNSET
    schedule: ScheduleIn | UnsetType = UNSET
    timeout: float | UnsetType = UNSET
    paused: bool | UnsetType = UNSET
    until: Timestamp | UnsetType | None = UNSET
    max_runs: int | UnsetType | None = UNSET
    overlap: Overlap | UnsetType = UNSET
    misfire: Misfire | UnsetType = UNSET
    misfire_grace: float | UnsetType = UNSET
    max_retries: int | UnsetType = UNSET
    retry_backoff: float | UnsetType = UNSET


class TaskChanges(TaskFields, forbid_unknown_fields=True, omit_defaults=True):
    """PATCH /tasks/{id}: only the fields given change; null clears until and max_runs."""

    # A schedule change keeps fired (max_runs counts every slot fired since creation);
    # 0 resets it.
    fired: Literal[0] | UnsetType = UNSET


class TaskSpec(TaskFields, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """POST /tasks: kind and schedule are required."""

    kind: str
    schedule: ScheduleIn


class ScheduleOut(Struct, omit_defaults=True):
    every: str | None = None
    start: datetime | None = None
    at: datetime | None = None
    cron: str | None = None
    timezone: str | None = None


class Task(Struct):
    id: int
    name: str
    kind: TaskKind
    params: dict[str, Any]
    schedule: ScheduleOut
    timeout: float
    paused: bool
    next_run_at: datetime | None
    until: datetime | None
    max_runs: int | None
    fired: int
    overlap: Overlap
    misfire: Misfire
    misfire_grace: float
    max_retries: int
    retry_backoff: float
    status: TaskStatus
    created_at: datetime
    updated_at: datetime
    error: str | None = None  # status "error": why the task was set aside (Rule 17)
    error_at: datetime | None = None


class Run(Struct):
    id: int
    task_id: int
    task_name: str
    kind: TaskKind
    scheduled_for: datetime
    due_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    state: RunState
    attempt: int
    coalesced: int
    result: dict[str, Any] | None
    error: str | None
    duration_ms: float | None
    lateness_ms: float | None
    worker_host: str | None


class TaskDetails(Task, kw_only=True):
    """GET /tasks/{id}: the task with its last run and the run waiting for a worker."""

    last_run: Run | None = None
    pending_run: Run | None = None


class TaskPage(Struct):
    items: list[TaskDetails]
    next_cursor: str | None


class RunPage(Struct):
    items: list[Run]
    next_cursor: str | None


class UpcomingRun(Struct):
    task_id: int
    task_name: str
    kind: TaskKind
    scheduled_for: datetime
    source: Literal["pending", "scheduled"]  # pending: already a run waiting for a worker
    run_id: int | None = None


class UpcomingRuns(Struct):
    items: list[UpcomingRun]


class Error(Struct, omit_defaults=True):
    """Every error response: status_code and detail; field names the bad input when there is one."""

    status_code: int
    detail: str
    field: str | None = None


class Health(Struct):
    status: Literal["ok"]


class Readiness(Struct, omit_defaults=True):
    status: Literal["ready", "not ready"]
    detail: str | None = None
    pending_migrations: list[str] | None = None
