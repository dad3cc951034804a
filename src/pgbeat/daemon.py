"""What every daemon (scheduler, worker) shares: its own registered session, which
LISTENs and holds the daemon's advisory lock (Rule 12); reconnection with backoff; and
supervised side tasks (its maintenance is pgbeat.maintenance)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self

import asyncpg
import uvloop

from pgbeat import db, metrics, queries

log = logging.getLogger("pgbeat.daemon")


class SessionLost(ConnectionError):
    """The daemon's own session ended: its locks are gone, so its work must stop."""


async def sleep_until(stop: asyncio.Event, timeout: float | None, *events: asyncio.Event) -> None:
    """Sleep until stop or any of events is set, or timeout seconds pass."""
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, *events)]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


# The event loop's timers have millisecond resolution and may fire a millisecond
# late: a sleep that must end on time hands its last WAKE_EARLY seconds to a thread.
WAKE_EARLY = 0.002


async def sleep_until_precisely(deadline: float, stop: asyncio.Event, *events: asyncio.Event) -> None:
    """Sleep until the monotonic `deadline` (to within tens of microseconds), or until
    stop or any of events is set. The last WAKE_EARLY seconds are slept by a thread,
    so the loop stays free for what is in flight; events set then are seen after it."""
    early = deadline - WAKE_EARLY - time.monotonic()
    if early > 0:
        await sleep_until(stop, early, *events)
        if stop.is_set() or any(e.is_set() for e in events):
            return
    remaining = deadline - time.monotonic()
    if remaining > 0:
        await asyncio.to_thread(time.sleep, remaining)


class Backoff:
    """Exponential backoff with jitter for reconnecting: 0.1 s doubling to 2 s (a refused
    connection is cheap, and a restarted PostgreSQL is found again within 2 s)."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self, stop: asyncio.Event) -> None:
        await sleep_until(stop, self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.cap, self.delay * 2)


class DaemonSession:
    """A daemon's own session: registered in pgbeat.daemons, holding the daemon lock,
    listening on `channels`. `wake` is set on every notification; `lost` when the
    session ends underneath us (then SessionLost is raised by check())."""

    def __init__(self, url: str, role: str, channels: tuple[str, ...] = ()) -> None:
        self.url, self.role, self.channels = url, role, channels
        self.conn: asyncpg.Connection | None = None
        self.daemon_id: int | None = None
        self.wake = asyncio.Event()
        self.lost = asyncio.Event()
        self.payloads: list[str] = []

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(payload)
        self.wake.set()

    def _on_terminate(self, _conn: Any) -> None:
        metrics.HEALTH.session_ok = False
        self.lost.set()
        self.wake.set()

    def take_payloads(self) -> list[str]:
        self.wake.clear()
        payloads, self.payloads = self.payloads, []
        return payloads

    def check(self) -> None:
        if self.lost.is_set() or self.conn is None or self.conn.is_closed():
            raise SessionLost(f"{self.role} session lost")

    async def __aenter__(self) -> Self:
        self.conn = await db.connect(self.url, timeout=10)
        try:
            self.conn.add_termination_listener(self._on_terminate)
            for channel in self.channels:
                await self.conn.add_listener(channel, self._on_notify)
            self.daemon_id = await self.conn.fetchval(
                queries.get("register_daemon"),
                self.role,
                socket.gethostname(),
                os.getpid(),
            )
        except BaseException:
            await self.conn.close(timeout=2)
            raise
        metrics.HEALTH.session_ok = True
        log.info(
            "daemon registered",
            extra={"event": "daemon_registered", "role": self.role, "daemon_id": self.daemon_id},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        metrics.HEALTH.session_ok = False
        conn, self.conn = self.conn, None
        if conn is None or conn.is_closed():
            return
        with contextlib.suppress(*db.CONNECTION_ERRORS, asyncpg.PostgresError):
            await conn.execute(queries.get("stop_daemon"), self.daemon_id, timeout=5)
        with contextlib.suppress(*db.CONNECTION_ERRORS):
            await conn.close(timeout=5)
        if conn and not conn.is_closed():
            conn.terminate()


async def supervise(main: Awaitable[None], *side: Awaitable[None]) -> None:
    """Run main with its side tasks; when any of them ends or fails, cancel the others.
    The first failure is re-raised; main returning ends the group normally."""
    tasks = [asyncio.ensure_future(main), *(asyncio.ensure_future(s) for s in side)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for t, result in zip(tasks, results, strict=True):
        if t in done and isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


async def every(interval: float, stop: asyncio.Event, action: Callable[[], Awaitable[Any]]) -> None:
    """Call action every interval seconds until stop (a supervised side task)."""
    while not stop.is_set():
        await action()
        await sleep_until(stop, interval * random.uniform(0.8, 1.2))


async def run_forever(role: str, stop: asyncio.Event, session_main: Callable[[], Awaitable[None]]) -> None:
    """Run session_main until stop, reconnecting with backoff when the database goes away."""
    backoff = Backoff()
    while not stop.is_set():
        started = time.monotonic()
        try:
            await session_main()
            backoff.reset()
        except db.CONNECTION_ERRORS as exc:
            metrics.RECONNECTS.labels(role).inc()
            if time.monotonic() - started > 10:
                backoff.reset()  # a session that lasted: this is a new outage, retry quickly
            log.warning(
                "database connection lost; reconnecting",
                extra={"event": "reconnecting", "role": role, "error": repr(exc)},
            )
            await backoff.wait(stop)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run main(stop) on a fresh uvloop loop (its transports and callbacks cost a fraction
    of asyncio's: the api's request rate, the worker's runs per second); SIGTERM/SIGINT
    set `stop` so the daemon drains and exits 0."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        loop_runner.run(runner())
    return 0
