"""GET /status: what `pgbeat status` shows, read from the database in one call
(pgbeat.status_report): the live schedulers and workers, the backlog of due runs,
and how late runs started recently."""

from __future__ import annotations

from datetime import datetime

import msgspec
from litestar import get
from litestar.datastructures import State

import pgbeat
from pgbeat import queries
from pgbeat.api.openapi import errors


class StatusDaemon(msgspec.Struct):
    id: int
    role: str
    host: str
    pid: int
    started_at: datetime
    since_heartbeat_s: float


class StatusRuns(msgspec.Struct):
    pending: int  # waiting for a worker, due or not
    running: int
    due: int  # pending and due: the backlog
    oldest_due_at: datetime | None


class StatusLateness(msgspec.Struct):
    """Start minus due time, in milliseconds, of the runs started in the last 5 minutes."""

    p50: float | None
    p95: float | None
    max: float | None
    runs: int


class Status(msgspec.Struct):
    version: str
    database: str
    now: datetime
    tasks: dict[str, int]  # by status
    runs: StatusRuns
    lateness_ms: StatusLateness
    daemons: list[StatusDaemon]


@get(
    "/status",
    tags=["operations"],
    operation_id="getStatus",
    summary="Live schedulers and workers, the backlog of due runs, and recent lateness",
    responses=errors(),
    cache=False,
)
async def status(state: State) -> Status:
    row = await state.pool.fetchrow(queries.get("status_report"))
    return Status(
        version=pgbeat.__version__,
        database="up",
        now=row["now"],
        tasks=msgspec.convert(row["tasks"], dict[str, int]),
        runs=StatusRuns(row["runs_pending"], row["runs_running"], row["runs_due"], row["oldest_due_at"]),
        lateness_ms=StatusLateness(
            row["lateness_p50_ms"], row["lateness_p95_ms"], row["lateness_max_ms"], row["lateness_runs"]
        ),
        daemons=msgspec.convert(row["daemons"], list[StatusDaemon]),
    )
