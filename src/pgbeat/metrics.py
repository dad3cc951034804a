"""What the daemons measure (Prometheus), and the small HTTP endpoint each scheduler and
worker serves it on, with its liveness: `/health` and `/metrics` on PGBEAT_METRICS_PORT.

The endpoint runs on the daemon's own asyncio loop, so a loop that is stuck cannot
answer and the liveness probe fails; `/health` is 503 while the daemon has no database
session. In `pgbeat serve` the API's `/metrics` shows the same series (one registry per
process) and no port of its own is opened."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("pgbeat.metrics")

DEFAULT_PORT = 9100

# Lateness (start - slot) is usually under a millisecond, and up to minutes after an
# outage; durations range from a counter's microseconds to an http run's timeout.
LATENESS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 300)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)

RUN_LATENESS = Histogram(
    "pgbeat_run_lateness_seconds",
    "Time from a run's slot to its start, observed by the worker that claimed it",
    ["kind"],
    buckets=LATENESS_BUCKETS,
)
RUN_DURATION = Histogram(
    "pgbeat_run_duration_seconds",
    "Time a run executed, observed by its worker when it ended",
    ["kind"],
    buckets=DURATION_BUCKETS,
)
RUNS_CLAIMED = Counter("pgbeat_runs_claimed_total", "Runs this worker claimed", ["kind"])
RUNS_FINISHED = Counter(
    "pgbeat_runs_finished_total",
    "Runs this worker recorded as ended, by kind and final state",
    ["kind", "state"],
)
CLAIM_ERRORS = Counter("pgbeat_claim_errors_total", "Claim transactions that failed (not a lost session)")
FINISH_ERRORS = Counter("pgbeat_finish_errors_total", "Batches of finished runs the database refused")
RECONNECTS = Counter("pgbeat_reconnects_total", "Database sessions lost and reopened", ["role"])
RUNS_DUE = Gauge(
    "pgbeat_runs_due",
    "Due runs waiting for a worker, counted up to 10,001 at this daemon's last reap (every few seconds)",
    ["role"],
)
SLOTS_FIRED = Counter(
    "pgbeat_slots_fired_total", "Scheduling decisions this scheduler made, by outcome", ["outcome"]
)


class Health:
    """Whether the daemon holds its database session (set by pgbeat.daemon)."""

    def __init__(self) -> None:
        self.session_ok = False


HEALTH = Health()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        writer.close()
        return
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, _, rest = request_line.partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
    if method not in ("GET", "HEAD"):
        status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET or HEAD\n"
    elif path == "/health":
        ok = HEALTH.session_ok
        status = "200 OK" if ok else "503 Service Unavailable"
        content_type = "application/json"
        body = b'{"status":"ok"}' if ok else b'{"status":"no database session"}'
    elif path == "/metrics":
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        status, body = "200 OK", encoder(REGISTRY)
    else:
        status, content_type, body = "404 Not Found", "text/plain", b"/health or /metrics\n"
    extra = "Allow: GET, HEAD\r\n" if status.startswith("405") else ""
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n".encode("latin-1")
    )
    if method != "HEAD":
        writer.write(body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def endpoint(port: int, host: str = "0.0.0.0"):
    """Serve /health and /metrics on port (0: nothing) while the block runs."""
    if port == 0:
        yield
        return
    server = await asyncio.start_server(_answer, host, port)
    log.info("metrics endpoint", extra={"event": "metrics_listening", "port": port})
    try:
        yield
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
