"""`pgbeat worker`: claim pending runs, execute them concurrently, finish them, release their locks.

Who may run what is decided by the database (pgbeat.claim_runs takes the task's
advisory lock on this worker's own session); this process only executes. All
claim / finish / release calls go over that one session, because the task locks
are session locks on it: finish commits first, then the locks are released.

    claim up to the free slots ──> run each as an asyncio task ──> finish the
    batch of runs that ended (one finish_runs) ──> release their locks and
    claim again (one release_and_claim_runs; a lone release_task_locks when no
    claim follows) ──> or sleep until a notification, a run ending, the next
    pending run's due time, or a slow safety poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg

from pgbeat import daemon, db, kinds, maintenance, metrics, queries
from pgbeat.config import Config
from pgbeat.egress import HttpPolicy, redact
from pgbeat.kinds import http as http_kind

log = logging.getLogger("pgbeat.worker")

SAFETY_POLL = 15.0  # seconds between claims when nothing wakes the worker
SESSION_CHECK_EVERY = 15.0  # prove the lock-holding session is alive (half-open TCP)
CLAIM_ERROR_PAUSE = 1.0

# Release the locks of runs recorded since the last claim, claim, and in the same round
# trip learn the seconds until the next pending run falls due (sql/queries.sql).
CLAIM_RUNS = queries.get("claim_runs")


@dataclass(frozen=True)
class ClaimedRun:
    """A run claim_runs gave this worker: it is `running` and its task is locked on our session."""

    run_id: int
    task_id: int
    kind: str
    params: dict[str, Any]
    timeout: float
    scheduled_for: datetime
    attempt: int
    started_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ClaimedRun:
        return cls(**{name: row[name] for name in CLAIMED_FIELDS})

    @property
    def lateness_ms(self) -> float:
        return round((self.started_at - self.scheduled_for).total_seconds() * 1000, 3)


CLAIMED_FIELDS = tuple(field.name for field in fields(ClaimedRun))


@dataclass(frozen=True)
class Outcome:
    run: ClaimedRun
    state: str  # succeeded | failed | timed_out | cancelled
    result: dict[str, Any] | None
    error: str | None
    duration_ms: float
    ended_at: float  # epoch seconds when the run stopped executing here (logged: the chaos checker's measure)


async def execute(
    run: ClaimedRun, http: aiohttp.ClientSession, http_policy: HttpPolicy | None = None
) -> Outcome:
    """Run one claimed run under its task's timeout and say how it ended.
    Cancellation (shutdown, lost session) propagates: the caller records it."""
    ctx = kinds.RunContext(
        run.run_id, run.task_id, run.attempt, run.scheduled_for, run.timeout, http, http_policy
    )
    started = time.monotonic()
    result: dict[str, Any] | None = None
    error: str | None = None
    timeout = asyncio.timeout(run.timeout)
    try:
        async with timeout:
            result = await kinds.get(run.kind)(run.params, ctx)
        state = "succeeded"
    except kinds.RunFailed as failed:
        state, result, error = "failed", failed.result, failed.error
    except TimeoutError as exc:
        if not timeout.expired():
            state, error = "failed", f"{type(exc).__name__}: {exc}".rstrip(": ")
        else:
            state, error = "timed_out", f"exceeded the task's timeout of {run.timeout:g}s"
            result = {"error_class": "timeout", "retry": True}
    except Exception as exc:
        error = redact(repr(exc))
        log.error("run raised", extra={"event": "run_error", "run_id": run.run_id, "error": error})
        state, error = "failed", redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
    return Outcome(run, state, result, error, round((time.monotonic() - started) * 1000, 3), time.time())


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def log_unrecorded(outcomes: list[Outcome]) -> None:
    log.warning(
        "session lost before runs that ended could be recorded; they will be reaped",
        extra={
            "event": "runs_unrecorded",
            "run_ids": [o.run.run_id for o in outcomes],
            "ended_at": iso_time(max(o.ended_at for o in outcomes)),  # all had ended by then
        },
    )


class Worker:
    """One worker session's life: the main loop and the runs it has in flight."""

    def __init__(
        self,
        session: daemon.DaemonSession,
        http: aiohttp.ClientSession,
        config: Config,
        concurrency: int,
    ) -> None:
        self.session = session
        self.http = http
        self.config = config
        self.concurrency = concurrency
        self.session_lock = asyncio.Lock()  # one call at a time on the lock-holding session
        self.in_flight: dict[asyncio.Task[Outcome], ClaimedRun] = {}
        self.ended: list[Outcome] = []  # finished here, not yet recorded
        self.recorded_locks: set[int] = set()  # tasks whose runs are recorded: unlock at the next claim
        self.run_ended = asyncio.Event()

    @property
    def conn(self) -> asyncpg.Connection:
        self.session.check()
        assert self.session.conn is not None
        return self.session.conn

    @property
    def free_slots(self) -> int:
        return self.concurrency - len(self.in_flight)

    async def main(self, stop: asyncio.Event) -> None:
        """Claim and run until stop; then drain within the grace period. Whatever way
        this ends, no run task of ours outlives it."""
        drain_deadline: float | None = None
        claimed_first = False
        try:
            while True:
                self.collect_ended()
                # A notification means a run is due now: claim it before recording the runs
                # that ended (that only delays their lock release), but never twice in a row.
                claim_first = (
                    self.session.wake.is_set()
                    and self.free_slots > 0
                    and not claimed_first
                    and not stop.is_set()
                )
                if self.ended and not claim_first:
                    claimed_first = False
                    # The loop claims next while it has a free slot and is not stopping.
                    await self.finish_ended(claim_follows=self.free_slots > 0 and not stop.is_set())
                    continue
                claimed_first = bool(self.ended)
                if stop.is_set():
                    if self.recorded_locks:  # no claim follows now
                        async with self.session_lock:
                            await self.release_recorded_locks()
                    if not self.in_flight:
                        return
                    if drain_deadline is None:
                        drain_deadline = time.monotonic() + self.config.shutdown_grace
                        log.info(
                            "worker stopping; waiting for runs in flight",
                            extra={
                                "event": "worker_draining",
                                "in_flight": len(self.in_flight),
                                "grace_s": self.config.shutdown_grace,
                            },
                        )
                    left = drain_deadline - time.monotonic()
                    if left <= 0:
                        await self.cancel_in_flight()
                    else:
                        # (not on stop: it is set; sleeping on it would spin)
                        await daemon.sleep_until(self.run_ended, left, self.session.lost)
                        self.session.check()
                    continue
                wake_in = await self.claim_and_start() if self.free_slots > 0 else None
                if (wake_in is not None and wake_in <= 0) or self.ended:
                    continue
                await self.sleep(stop, wake_in)
        finally:
            if self.ended:  # ended here, but the session went before they were recorded
                log_unrecorded(self.ended)
                self.ended = []
            await self.abandon_in_flight()

    async def sleep(self, stop: asyncio.Event, wake_in: float | None) -> None:
        """Nothing to do now: wait for stop, a run to end, or (with a free slot) a
        notification, the next pending run's due time (on time: runs are materialised
        ahead of their slot and claimed at it), or the safety poll."""
        events = (self.run_ended, self.session.wake, self.session.lost)
        if self.free_slots > 0 and wake_in is not None and wake_in < SAFETY_POLL:
            await daemon.sleep_until_precisely(time.monotonic() + wake_in, stop, *events)
        elif self.free_slots > 0:
            await daemon.sleep_until(stop, SAFETY_POLL, *events)
        else:
            await daemon.sleep_until(stop, None, self.run_ended, self.session.lost)
        self.session.check()

    async def claim_and_start(self) -> float | None:
        """Claim up to the free slots and start them. Returns seconds until the next
        pending run falls due (0 or less: claim again at once; None: none known)."""
        limit = self.free_slots
        self.session.take_payloads()  # clears wake: a notification from now on claims again
        release = self.take_recorded_locks()
        try:
            async with self.session_lock:
                rows = await self.conn.fetch(CLAIM_RUNS, self.session.daemon_id, limit, release)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, db.CONNECTION_ERRORS):
                raise
            await self.claim_failed(exc)
            return CLAIM_ERROR_PAUSE
        claimed = [row for row in rows if row["run_id"] is not None]  # none: one row, run_id NULL
        for row in claimed:
            self.start(ClaimedRun.from_row(row))
        if len(claimed) == limit:
            return 0  # maybe more: the loop claims again while there are free slots
        return rows[0]["wake_in"]

    async def claim_failed(self, exc: asyncpg.PostgresError) -> None:
        """A claim transaction failed: its row changes rolled back, but advisory locks it took
        are session locks and survive; release all but the ones our runs hold."""
        metrics.CLAIM_ERRORS.inc()
        log.error("claim failed", extra={"event": "claim_failed", "error": repr(exc)})
        held = sorted({run.task_id for run in self.in_flight.values()})
        async with self.session_lock:
            released = await self.conn.fetchval(queries.get("release_stray_task_locks"), held)
        if released:
            log.warning(
                "stray task locks released", extra={"event": "stray_locks_released", "count": released}
            )

    def start(self, run: ClaimedRun) -> None:
        metrics.RUNS_CLAIMED.labels(run.kind).inc()
        metrics.RUN_LATENESS.labels(run.kind).observe(max(run.lateness_ms, 0) / 1000)
        log.info(
            "run started",
            extra={
                "event": "run_started",
                "task_id": run.task_id,
                "run_id": run.run_id,
                "kind": run.kind,
                "slot": run.scheduled_for.isoformat(),
                "attempt": run.attempt,
                "lateness_ms": run.lateness_ms,
                "daemon_id": self.session.daemon_id,
            },
        )
        task = asyncio.create_task(execute(run, self.http, self.config.http), name=f"run-{run.run_id}")
        task.add_done_callback(lambda _task: self.run_ended.set())
        self.in_flight[task] = run

    def collect_ended(self) -> None:
        """Move runs that ended from in_flight to ended (a cancelled one ended `cancelled`)."""
        self.run_ended.clear()
        for task in [t for t in self.in_flight if t.done()]:
            run = self.in_flight.pop(task)
            if task.cancelled():
                grace = self.config.shutdown_grace
                error = f"worker stopped: still running after the shutdown grace of {grace:g}s"
                duration = (time.time() - run.started_at.timestamp()) * 1000
                self.ended.append(Outcome(run, "cancelled", None, error, round(duration, 3), time.time()))
            else:
                self.ended.append(task.result())

    async def finish_ended(self, claim_follows: bool) -> None:
        """Record every run that has ended in one finish_runs (one transaction); after it
        committed, release their tasks' locks: with the claim that follows, or now."""
        outcomes, self.ended = self.ended, []
        async with self.session_lock:
            try:
                rows = await self.conn.fetch(
                    queries.get("finish_runs"),
                    [o.run.run_id for o in outcomes],
                    [o.state for o in outcomes],
                    [o.result for o in outcomes],
                    [o.error for o in outcomes],
                )
            except db.CONNECTION_ERRORS:
                log_unrecorded(outcomes)
                raise
            except asyncpg.PostgresError as exc:
                rows = await self.finish_one_by_one(outcomes, exc)
            self.recorded_locks.update(o.run.task_id for o in outcomes)
            if not claim_follows:
                await self.release_recorded_locks()
        recorded = {row["run_id"]: row for row in rows}
        for o in outcomes:
            row = recorded.get(o.run.run_id)
            applied = bool(row and row["applied"])
            if applied:
                metrics.RUNS_FINISHED.labels(o.run.kind, o.state).inc()
                metrics.RUN_DURATION.labels(o.run.kind).observe(o.duration_ms / 1000)
            log.log(
                logging.INFO if applied else logging.WARNING,
                "run finished" if applied else "run finished, but it was no longer ours to record",
                extra={
                    "event": "run_finished",
                    "task_id": o.run.task_id,
                    "run_id": o.run.run_id,
                    "kind": o.run.kind,
                    "slot": o.run.scheduled_for.isoformat(),
                    "attempt": o.run.attempt,
                    "lateness_ms": o.run.lateness_ms,
                    "duration_ms": o.duration_ms,
                    "ended_at": iso_time(o.ended_at),
                    "state": o.state if applied else (row["state"] if row else None),
                    "error": o.error,
                    "recorded": applied,
                },
            )

    def take_recorded_locks(self) -> list[int]:
        """The tasks whose runs are recorded and whose locks are still held; the caller
        releases them (a failed claim leaves them to release_stray_task_locks)."""
        release, self.recorded_locks = sorted(self.recorded_locks), set()
        return release

    async def release_recorded_locks(self) -> None:
        """Release the locks of the tasks whose runs were recorded (call under session_lock)."""
        if release := self.take_recorded_locks():
            await self.conn.fetchval(queries.get("release_task_locks"), release)

    async def finish_one_by_one(self, outcomes: list[Outcome], exc: asyncpg.PostgresError) -> list[Any]:
        """The batch failed (one bad outcome rolls back all): record each alone; one that
        still fails is recorded failed with the database's error."""
        metrics.FINISH_ERRORS.inc()
        log.error("finishing a batch failed", extra={"event": "finish_failed", "error": repr(exc)})
        rows = []
        for o in outcomes:
            attempts = [
                (o.state, o.result, o.error),
                ("failed", None, f"could not record the outcome: {exc}"),
            ]
            for state, result, error in attempts:
                try:
                    rows += await self.conn.fetch(
                        queries.get("finish_run"),
                        o.run.run_id,
                        state,
                        result,
                        error,
                    )
                    break
                except asyncpg.PostgresError as again:
                    if isinstance(again, db.CONNECTION_ERRORS):
                        raise
                    exc = again
        return rows

    async def cancel_in_flight(self) -> None:
        """The grace period is over: cancel what still runs; it is recorded `cancelled`."""
        for task in self.in_flight:
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)

    async def abandon_in_flight(self) -> None:
        """We are leaving this session (lost, or failing): its locks are or will be gone, so
        another worker may start these tasks now. Stop our copies at once; the runs are
        reaped as abandoned since no one can finish them on a dead session."""
        if not self.in_flight:
            return
        for task in self.in_flight:
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)
        log.warning(
            "cancelled runs in flight: the worker's session is gone",
            extra={
                "event": "runs_cancelled",
                "run_ids": [r.run_id for r in self.in_flight.values()],
                "ended_at": iso_time(time.time()),
            },
        )
        self.in_flight.clear()

    async def check_session(self) -> None:
        """A side task: a dead connection (half-open TCP) is noticed even while every slot
        is busy with long runs and the main loop makes no calls."""
        async with self.session_lock:
            try:
                await self.conn.fetchval(queries.get("ping"), timeout=SESSION_CHECK_EVERY)
            except (TimeoutError, *db.CONNECTION_ERRORS) as exc:
                raise daemon.SessionLost(f"worker session check failed: {exc!r}") from exc


async def run_session(
    url: str, config: Config, stop: asyncio.Event, concurrency: int, http: aiohttp.ClientSession
) -> None:
    """One database session's worth of work: register, run the main loop with its side
    tasks, unregister. Raises a connection error when the session is lost."""
    async with (
        daemon.DaemonSession(url, "worker", (db.WORKER_CHANNEL,)) as session,
        maintenance.Maintenance(
            url,
            session.daemon_id,
            session.role,
            config.retention_days,
            # A reaped task may have a pending run no one was told about.
            on_reaped=lambda _abandoned: session.wake.set(),
        ) as upkeep,
    ):
        worker = Worker(session, http, config, concurrency)
        log.info(
            "worker ready",
            extra={"event": "worker_ready", "daemon_id": session.daemon_id, "concurrency": concurrency},
        )
        # Side tasks end only when main ends (supervise cancels them): they keep going
        # while the main loop drains after stop.
        forever = asyncio.Event()
        await daemon.supervise(
            worker.main(stop),
            *upkeep.side_tasks(forever),
            daemon.every(SESSION_CHECK_EVERY, forever, worker.check_session),
        )


async def run_worker(url: str, config: Config, stop: asyncio.Event, concurrency: int) -> None:
    """The worker process: run sessions until stop, reconnecting with backoff."""
    if concurrency < 1:
        raise SystemExit("pgbeat worker: --concurrency must be at least 1")
    async with http_kind.client_session(config.http) as http:
        await daemon.run_forever("worker", stop, lambda: run_session(url, config, stop, concurrency, http))
    log.info("worker stopped", extra={"event": "worker_stopped"})
