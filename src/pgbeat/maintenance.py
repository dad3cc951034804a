"""Maintenance every daemon runs beside its main loop (Rule 13): heartbeat, reap, prune.

Schedulers and workers run the same steps on the same timers, over a small pool of
their own (never the daemon's lock-holding session), with one error policy: a step
that fails, on a database error or a lost pool connection, is logged and tried again
at its next turn. It never ends the daemon. The main loop notices the loss of the
daemon's own session by itself, and a worker's runs in flight are not cancelled for
a maintenance step's sake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Self

import asyncpg

from pgbeat import daemon, db, metrics, queries

log = logging.getLogger("pgbeat.maintenance")

HEARTBEAT_EVERY = 30.0  # seconds; the heartbeat is informational (liveness is the lock, Rule 12)
REAP_EVERY = 4.0  # how soon a dead worker's runs are abandoned and retried (Rule 5)
PRUNE_EVERY = 3600.0
STEP_TIMEOUT = 10.0  # a statement slower than this means the pool's connection is gone
PRUNE_BATCH = 10_000  # runs deleted per transaction, so a prune never holds long locks
PRUNE_BATCH_TIMEOUT = 60.0


class Maintenance:
    """One daemon session's maintenance: `async with Maintenance(...) as m`, then run
    `m.side_tasks(until)` beside the main loop (daemon.supervise)."""

    def __init__(
        self,
        url: str,
        daemon_id: int,
        role: str,
        retention_days: float,
        on_reaped: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.daemon_id = daemon_id
        self.role = role
        self.retention_days = retention_days
        self.on_reaped = on_reaped  # told how many runs a reap abandoned, when any
        self.pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> Self:
        self.pool = await db.create_pool(self.url, min_size=1, max_size=2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
            pool.terminate()

    def side_tasks(self, until: asyncio.Event) -> list[Awaitable[None]]:
        """The three steps, each on its timer until `until` is set (or the group is cancelled)."""
        return [
            daemon.every(HEARTBEAT_EVERY, until, lambda: self.guarded("heartbeat", self.heartbeat)),
            daemon.every(REAP_EVERY, until, lambda: self.guarded("reap", self.reap)),
            daemon.every(PRUNE_EVERY, until, lambda: self.guarded("prune", self.prune)),
        ]

    async def guarded(self, step: str, action: Callable[[], Awaitable[Any]]) -> None:
        """The one error policy: log the failure, try again at the next turn."""
        try:
            await action()
        except (asyncpg.PostgresError, *db.CONNECTION_ERRORS) as exc:
            log.warning("%s failed", step, extra={"event": f"{step}_failed", "error": repr(exc)})

    @property
    def _pool(self) -> asyncpg.Pool:
        assert self.pool is not None, "use Maintenance as an async context manager"
        return self.pool

    async def heartbeat(self) -> None:
        await self._pool.execute(queries.get("heartbeat_daemon"), self.daemon_id, timeout=STEP_TIMEOUT)

    async def reap(self) -> int:
        """Abandon runs whose worker session is gone (Rule 5); record dead daemons as
        stopped (Rule 12). One statement, one transaction: an idle daemon's cost is a
        query every few seconds. Returns how many runs were abandoned. The same statement
        counts the backlog it sees (metrics.RUNS_DUE)."""
        row = await self._pool.fetchrow(queries.get("reap"), timeout=STEP_TIMEOUT)
        abandoned = row["abandoned"]
        metrics.RUNS_DUE.labels(self.role).set(row["due"])
        if abandoned:
            log.warning("abandoned runs reaped", extra={"event": "runs_abandoned", "count": abandoned})
            if self.on_reaped is not None:
                self.on_reaped(abandoned)
        return abandoned

    async def prune(self) -> int:
        """Keep history by day (migration 0007): add the coming days' partitions, drop
        the days wholly past the retention period, then delete what is left past it in
        bounded batches. Returns how many runs were deleted row by row."""
        retention = self.retention_days * 86400
        added = await self._pool.fetchval(queries.get("add_run_partitions"), timeout=STEP_TIMEOUT)
        drop_steps = 0  # each partition: detached, its foreign key dropped, then its table
        while await self._pool.fetchval(
            queries.get("drop_run_partitions"), retention, timeout=PRUNE_BATCH_TIMEOUT
        ):
            drop_steps += 1
        if added or drop_steps:
            log.info(
                "history partitions changed",
                extra={"event": "history_partitions", "added": added, "drop_steps": drop_steps},
            )
        total = 0
        while True:
            n = await self._pool.fetchval(
                queries.get("prune_history"),
                retention,
                PRUNE_BATCH,
                timeout=PRUNE_BATCH_TIMEOUT,
            )
            total += n
            if n < PRUNE_BATCH:
                break
        if total:
            log.info("history pruned", extra={"event": "history_pruned", "runs": total})
        return total
