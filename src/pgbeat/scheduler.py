"""The scheduler daemon (`pgbeat scheduler`).

It sleeps until just before the earliest slot of an active task (LEAD), a
notification on the schedulers' channel, or a slow safety poll, whichever comes
first; then it asks the database to turn every due slot into a run
(materialize_due_runs for interval and one-shot tasks, which also materialises
plain slots up to AHEAD early, so that a worker claims each at its slot;
due_cron_tasks + fire_cron_slots for cron tasks, whose calendar maths is
croniter's). Which slot becomes which run, misfires, coalescing and overlap are
the database's (sql/schema/30_scheduling.sql; Rules 1, 3, 6, 7, 8);
this loop only decides when to ask. Any number of schedulers may run at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from pgbeat import daemon, db, limits, maintenance, metrics, queries, schedules
from pgbeat.config import Config

log = logging.getLogger("pgbeat.scheduler")

BATCH = 500  # tasks fired per call of a stored function
SAFETY_POLL = 30.0  # longest sleep without asking the database (seconds); slots over 60 s
# away are not announced (notify_schedulers, sql/schema/50_daemons.sql): this poll finds them
QUERY_TIMEOUT = 10.0  # a query slower than this means the connection is gone
RETRY_AFTER_ERROR = 1.0  # pause after a database error that is not a lost connection
# Something is due but a pass fired nothing (another scheduler holds the task
# row, or its cron maths failed): wait this long, doubling up to the cap, rather than spin.
HOLD_OFF_FIRST, HOLD_OFF_CAP = 0.005, 1.0
# Plain slots are materialised up to AHEAD before they fall due (a worker then claims
# each at its slot, on its own timer), and the scheduler wakes LEAD before the earliest
# slot: a slot is pending even if this wake is late by up to LEAD, and one pass takes
# every slot of the next AHEAD - LEAD.
AHEAD = timedelta(milliseconds=20)
LEAD = 0.010


class DatabaseClock:
    """Maps database timestamps to this process's monotonic clock, so sleeps are
    computed from the database's time (the one its `now()` compares slots with),
    whatever this machine's wall clock says."""

    def __init__(self, db_now: datetime, sent_at: float, received_at: float) -> None:
        # The database read its clock somewhere in the round trip; take the middle.
        self.db_ref = db_now
        self.mono_ref = (sent_at + received_at) / 2

    def monotonic_at(self, db_time: datetime) -> float:
        return self.mono_ref + (db_time - self.db_ref).total_seconds()


def earliest_in(payloads: list[str]) -> tuple[datetime | None, bool]:
    """The earliest next_run_at announced by notifications, and whether every payload
    was understood (if not, the caller should ask the database)."""
    earliest: datetime | None = None
    understood = True
    for payload in payloads:
        try:
            value = json.loads(payload)["next_run_at"]
            at = None if value is None else datetime.fromisoformat(value)
        except (ValueError, KeyError, TypeError):
            understood = False
            continue
        if at is not None and (earliest is None or at < earliest):
            earliest = at
    return earliest, understood


def log_set_aside(task_id: int, error: str) -> None:
    """Rule 17: logged once, when the task is set aside (it then fires no more)."""
    log.error(
        "task %s set aside: %s",
        task_id,
        error,
        extra={"event": "task_set_aside", "task_id": task_id, "error": error},
    )


def log_outcomes(rows: list[asyncpg.Record]) -> None:
    """One structured event per fired slot (its outcome, RULES.md glossary)."""
    for row in rows:
        metrics.SLOTS_FIRED.labels(row["outcome"]).inc()
        if row["outcome"] == "error":
            log_set_aside(row["task_id"], row["error"])
            continue
        slot = row["scheduled_for"]  # NULL when the task expired (its `until` passed) instead
        lateness_ms = None if slot is None else round((row["fired_at"] - slot).total_seconds() * 1000, 3)
        log.info(
            "slot %s",
            row["outcome"],
            extra={
                "event": "slot_fired",
                "task_id": row["task_id"],
                "run_id": row["run_id"],
                "slot": None if slot is None else slot.isoformat(),
                "outcome": row["outcome"],
                "missed": row["missed"],
                "lateness_ms": lateness_ms,
            },
        )


class Scheduler:
    """The wake-up loop on one daemon session (which LISTENs on the schedulers' channel)."""

    def __init__(self, session: daemon.DaemonSession, stop: asyncio.Event) -> None:
        self.session = session
        self.stop = stop
        self.hold_off = HOLD_OFF_FIRST
        self.clock: DatabaseClock | None = None

    @property
    def conn(self) -> asyncpg.Connection:
        assert self.session.conn is not None
        return self.session.conn

    async def run(self) -> None:
        while not self.stop.is_set():
            self.session.check()
            try:
                pass_started = time.monotonic()
                fired = await self.fire_due_slots()
                deadline = await self.next_wake(stuck=not fired, pass_started=pass_started)
            except db.CONNECTION_ERRORS:
                raise
            except Exception as exc:  # a database error (or a bug): log it, stay up, retry
                log.exception(
                    "scheduling pass failed; retrying",
                    extra={"event": "scheduler_error", "error": repr(exc)},
                )
                await daemon.sleep_until(self.stop, RETRY_AFTER_ERROR)
                continue
            await self.sleep_until(deadline)

    async def fire_due_slots(self) -> int:
        """Materialise every due slot; returns how many slots the database fired."""
        fired = 0
        while True:
            rows = await self.conn.fetch(
                queries.get("materialize_due_runs"),
                BATCH,
                AHEAD,
                timeout=QUERY_TIMEOUT,
            )
            log_outcomes(rows)
            fired += len(rows)
            if len(rows) < BATCH:
                break
        while True:
            due = await self.conn.fetch(queries.get("due_cron_tasks"), BATCH, timeout=QUERY_TIMEOUT)
            if not due:
                break
            slots, failures = cron_slots(due)
            for task_id, error in failures:
                set_aside = queries.get("set_task_aside")
                if await self.conn.fetchval(set_aside, task_id, error, timeout=QUERY_TIMEOUT):
                    log_set_aside(task_id, error)
            rows = await self.conn.fetch(queries.get("fire_cron_slots"), slots, timeout=QUERY_TIMEOUT)
            log_outcomes(rows)
            fired += len(rows)
            if len(due) < BATCH or not rows:
                break
        return fired

    async def next_wake(self, stuck: bool, pass_started: float) -> float | None:
        """Monotonic time of the earliest due slot (None: nothing scheduled)."""
        sent_at = time.monotonic()
        row = await self.conn.fetchrow(queries.get("next_due_at"), timeout=QUERY_TIMEOUT)
        assert row is not None
        self.clock = DatabaseClock(row["db_now"], sent_at, time.monotonic())
        if row["due_at"] is None:
            return None
        due = self.clock.monotonic_at(row["due_at"])
        deadline = due - LEAD
        if stuck and deadline <= pass_started:
            if due > time.monotonic():
                # Within LEAD of its slot, yet not materialised ahead: a slot only the
                # database's slow path decides (cron, a missed slot, a running skip-policy
                # task...). It is fired when due.
                return due
            # Due before the pass began, yet the pass fired nothing: another scheduler
            # is firing it right now (its row is locked), or its cron maths failed.
            # Do not spin.
            deadline = time.monotonic() + self.hold_off
            self.hold_off = min(HOLD_OFF_CAP, self.hold_off * 2)
        else:
            self.hold_off = HOLD_OFF_FIRST
        return deadline

    async def sleep_until(self, deadline: float | None) -> None:
        """Sleep until deadline (or the safety poll), or until a notification announces
        an earlier slot (or one we cannot read), the session is lost, or stop."""
        poll_at = time.monotonic() + SAFETY_POLL
        while not self.stop.is_set() and not self.session.lost.is_set():
            wake_at = poll_at if deadline is None else min(poll_at, deadline - daemon.WAKE_EARLY)
            timeout = wake_at - time.monotonic()
            if timeout > 0:
                await daemon.sleep_until(self.stop, timeout, self.session.wake)
                if self.session.wake.is_set():
                    earliest, understood = earliest_in(self.session.take_payloads())
                    if not understood:
                        return
                    if earliest is not None and self.clock is not None:
                        announced = self.clock.monotonic_at(earliest) - LEAD
                        deadline = announced if deadline is None else min(deadline, announced)
                    continue
            if deadline is None or deadline - time.monotonic() > daemon.WAKE_EARLY:
                return  # the safety poll, or stop
            # The last WAKE_EARLY before the deadline: slept by a thread, to the microsecond.
            await daemon.sleep_until_precisely(deadline, self.stop)
            return


def cron_slots(due: list[asyncpg.Record]) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """fire_cron_slots' argument: each due cron task's latest slot, next slot and missed
    count, computed by croniter against the database's clock; and the tasks whose
    cron or time zone croniter refused, with the error (to be set aside, Rule 17)."""
    slots, failures = [], []
    for task in due:
        try:
            latest, following, missed = schedules.cron_catch_up(
                task["cron"], task["timezone"], task["next_run_at"], task["db_now"]
            )
        except Exception as exc:  # croniter's assorted errors: this task's problem, not the pass's
            error = f"cron slot could not be computed: {type(exc).__name__}: {exc}"
            failures.append((task["task_id"], error))
            continue
        slots.append(
            {
                "task_id": task["task_id"],
                "slot": task["next_run_at"].isoformat(),
                "latest": latest.isoformat(),
                # past the range of times (Rule 18) there are no more slots
                "next": following.isoformat() if following < limits.LATEST else None,
                "missed": missed,
            }
        )
    return slots, failures


async def run_scheduler(url: str, config: Config, stop: asyncio.Event) -> None:
    """Run the scheduler until stop, reconnecting (and catching up) whenever the database goes away."""

    async def session_main() -> None:
        async with (
            daemon.DaemonSession(url, "scheduler", (db.SCHEDULER_CHANNEL,)) as session,
            maintenance.Maintenance(url, session.daemon_id, session.role, config.retention_days) as upkeep,
        ):
            # The side tasks end when the loop ends (supervise cancels them), so a
            # stop never cancels the loop in the middle of a pass.
            until_main_ends = asyncio.Event()
            await daemon.supervise(Scheduler(session, stop).run(), *upkeep.side_tasks(until_main_ends))

    log.info("scheduler starting", extra={"event": "scheduler_starting"})
    await daemon.run_forever("scheduler", stop, session_main)
    log.info("scheduler stopped", extra={"event": "scheduler_stopped"})
