"""Task creations that arrive together are written together.

A creation's cost is its transaction: the round trip and the commit, not the insert
(pgbeat.api_create_tasks in sql/schema/70_api.sql). So POST /tasks does not call
the database itself: it queues its spec here, and the creations queued while earlier
ones are in flight go to pgbeat.api_create_tasks as one call, in one transaction. A
lone request is sent at once; nothing waits for company.

Each request still gets its own answer, and only after its task is committed. If
the database refuses any spec of a call (its input, not its availability), that
call wrote nothing, and its specs are sent again one per call, so that each gets
its own task or its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg

from pgbeat import db, queries, schedules

CREATE_TASKS = queries.get("create_tasks")
TRANSACTION_NOW = queries.get("transaction_now")


def refused_input(exc: BaseException) -> bool:
    """The database refused what it was given (data exception or constraint), which
    one spec of a shared call may do on its own."""
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] in ("22", "23")


def as_is(row: asyncpg.Record) -> Any:
    return row


class TaskCreations:
    """`shape` turns each created row into its answer inside the call's transaction:
    a row that cannot be answered rolls the call back (Rule 10: a 5xx never follows
    a commit), and the call's other specs are sent again, one per call."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        max_per_call: int = 64,
        max_calls: int = 2,
        shape: Callable[[asyncpg.Record], Any] = as_is,
    ) -> None:
        self.pool = pool
        self.shape = shape
        self.max_per_call = max_per_call
        # Calls in flight at once: one fills while another commits.
        self.max_calls = max_calls
        self.calls = 0
        self.queued: list[tuple[dict[str, Any], datetime | None, asyncio.Future]] = []
        self.senders: set[asyncio.Task] = set()

    async def create(self, spec: dict[str, Any], first_slot: datetime | None) -> Any:
        """The created task's api_tasks row, shaped (or the error for this spec)."""
        answer = asyncio.get_running_loop().create_future()
        self.queued.append((spec, first_slot, answer))
        if self.calls < self.max_calls:
            self.calls += 1
            sender = asyncio.create_task(self.send_queued())
            self.senders.add(sender)
            sender.add_done_callback(self.senders.discard)
        return await answer

    async def send_queued(self) -> None:
        try:
            while self.queued:
                batch = self.queued[: self.max_per_call]
                del self.queued[: self.max_per_call]
                await self.send(batch)
        finally:
            self.calls -= 1

    async def send(self, batch: list[tuple[dict[str, Any], datetime | None, asyncio.Future]]) -> None:
        answers = [answer for *_, answer in batch]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                slots = [slot for _, slot, _ in batch]
                if any(slots):
                    # Cron's first slots again, from the transaction's clock: the one the
                    # database checks them against (Rule 7), whatever this host's clock says
                    # or however long the request waited for a connection.
                    now = await conn.fetchval(TRANSACTION_NOW)
                    slots = [
                        slot
                        and schedules.next_cron_slot(
                            spec["schedule"]["cron"], spec["schedule"].get("timezone", "UTC"), now
                        )
                        for spec, slot, _ in batch
                    ]
                rows = await conn.fetch(CREATE_TASKS, [b[0] for b in batch], slots)
                answered = list(zip(answers, [self.shape(row) for row in rows], strict=True))
        except asyncio.CancelledError:
            for answer in answers:
                answer.cancel()
            raise
        except Exception as exc:
            if len(batch) > 1 and (refused_input(exc) or not isinstance(exc, db.CONNECTION_ERRORS)):
                await asyncio.gather(*(self.send([one]) for one in batch))
                return
            for answer in answers:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for answer, row in answered:
            if not answer.done():  # (its client may have gone)
                answer.set_result(row)
