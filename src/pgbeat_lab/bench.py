"""`pgbeat bench <scenario>`: the benchmarks, run against real pgbeat processes.

Each run creates a fresh database (pgbeat_bench_<random>) on PGBEAT_DATABASE_URL's
server (or the embedded one), migrates it, measures the hardware floor with pgbench
(the minimal queue step: claim one pending row FOR UPDATE SKIP LOCKED and mark it
done), runs the scenario with real `pgbeat scheduler` / `worker` / `api` processes,
reads the figures from the database itself (runs' timestamps, pg_stat_database) and
from /proc (RSS, CPU), prints a table, writes the raw figures with --json, and drops
the database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import psycopg
import uvloop

from pgbeat import migrations, schedules
from pgbeat.config import Config
from pgbeat_lab import peers
from pgbeat_lab.fleet import Fleet

# ---------------------------------------------------------------- figures


@dataclass
class Floor:
    """pgbench running the minimal queue step: the most this machine's PostgreSQL does."""

    clients: int
    seconds: float
    tps: float
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    target: str = ""  # ">= 10000", "<= 20": the target, if it sets one
    floor: str = ""  # what the ratio divides by: "tps", "p50" or "p99" (the floor's latency)
    ratio: float | None = None
    met: bool | None = None

    def judge(self, floor: Floor | None) -> None:
        if self.value is None:
            return
        if floor is not None and self.floor:
            base = {"tps": floor.tps, "p50": floor.latency_p50_ms, "p99": floor.latency_p99_ms}[self.floor]
            self.ratio = self.value / base if base else None
        if self.target:
            op, limit = self.target.split()
            self.met = self.value >= float(limit) if op == ">=" else self.value <= float(limit)


# At module level, as `python3 -c` runs it: its names are globals, not a function's locals
# (which would make it 2.5 times faster and the figures incomparable with earlier ones).
PYTHON_LOOP = compile("total = 0\nfor i in range(1_000_000):\n    total += i\n", "<loop>", "exec")


def python_loop_seconds() -> float:
    """Seconds this host takes for a top-level Python loop of 10 million additions (timed
    over one million): hosts of one nominal size differ several-fold in speed, and the
    pgbench floor does not show how fast Python runs beside it."""
    started = time.perf_counter()
    exec(PYTHON_LOOP, {})
    return (time.perf_counter() - started) * 10


@dataclass
class Result:
    scenario: str
    settings: dict[str, Any]
    floor: Floor | None
    figures: list[Figure]
    processes: dict[str, dict[str, float]] = field(default_factory=dict)
    date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    machine: str = field(default_factory=lambda: f"{os.cpu_count()} cores, {platform.machine()}")
    python_loop_s: float = field(default_factory=python_loop_seconds)

    def figure(self, name: str) -> Figure:
        return next(f for f in self.figures if f.name == name)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def print_result(result: Result) -> None:
    floor = result.floor
    print(
        f"\npgbeat bench {result.scenario} - {result.date}, {result.machine}, "
        f"Python loop of 10M additions {result.python_loop_s:.2f} s"
    )
    print("  " + ", ".join(f"{k}={v}" for k, v in result.settings.items()))
    if floor:
        print(
            f"  floor: pgbench queue step, {floor.clients} client(s): {floor.tps:,.0f} tps, "
            f"latency p50 {floor.latency_p50_ms:.2f} ms, p99 {floor.latency_p99_ms:.2f} ms"
        )
    print(f"  {'figure':<34} {'value':>12} {'unit':<8} {'target':<10} {'vs floor':>9}")
    for f in result.figures:
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        verdict = {True: "ok", False: "MISSED", None: ""}[f.met]
        print(f"  {f.name:<34} {format_value(f.value):>12} {f.unit:<8} {f.target:<10} {ratio:>9} {verdict}")
    for name, stats in result.processes.items():
        print(f"  process {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in stats.items()))


# ---------------------------------------------------------------- database


def with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@contextmanager
def bench_database(server_url: str, migrate: bool = True) -> Iterator[str]:
    """A fresh (migrated) database on server_url's server, dropped at the end."""
    name = f"pgbeat_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        if migrate:
            migrations.apply(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def db_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def create_tasks(
    conn: psycopg.Connection, n: int, kind: str, params: dict, schedule_sql: str, **args: Any
) -> float:
    """Create n tasks in one statement through pgbeat.create_task; returns tasks/s.
    schedule_sql is a jsonb expression of the row number i (0..n-1) and args."""
    started = time.perf_counter()
    conn.execute(
        f"""SELECT count(*) FROM generate_series(0, %(n)s - 1) AS i,
                 LATERAL pgbeat.create_task(jsonb_build_object(
                     'name', 'bench-' || i, 'kind', %(kind)s::text, 'params', %(params)s::jsonb,
                     'schedule', {schedule_sql})) AS t""",
        {"n": n, "kind": kind, "params": json.dumps(params), **args},
    )
    return n / (time.perf_counter() - started)


def wait_for(
    conn: psycopg.Connection, query: str, args: dict, done: Callable[[Any], bool], timeout: float
) -> Any:
    """Poll query every 0.25 s until done(value); returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = conn.execute(query, args).fetchone()[0]
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def sample_ms(conn: psycopg.Connection, query: str, args: dict) -> list[float]:
    return [float(row[0]) for row in conn.execute(query, args).fetchall()]


# ---------------------------------------------------------------- the floor

FLOOR_SCRIPT = (
    "UPDATE pgbeat_bench_floor SET state = 'done' WHERE id = (SELECT id FROM pgbeat_bench_floor"
    " WHERE state = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED);\n"
)


def measure_floor(url: str, clients: int, seconds: float) -> Floor:
    """pgbench -n -M prepared of the minimal queue step on its own table, same database."""
    pgbench = shutil.which("pgbench") or "/usr/bin/pgbench"
    with connect(url) as conn:
        conn.execute(
            "CREATE TABLE pgbeat_bench_floor (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " state text NOT NULL DEFAULT 'pending')"
        )
        conn.execute("CREATE INDEX ON pgbeat_bench_floor (id) WHERE state = 'pending'")
        conn.execute(
            "INSERT INTO pgbeat_bench_floor (state) SELECT 'pending' FROM generate_series(1, %s)",
            (max(50_000, int(20_000 * seconds * clients)),),
        )
        conn.execute("VACUUM ANALYZE pgbeat_bench_floor")
    with tempfile.TemporaryDirectory(prefix="pgbeat-floor-") as tmp:
        script = Path(tmp) / "queue_step.sql"
        script.write_text(FLOOR_SCRIPT)
        cmd = [pgbench, "-n", "-M", "prepared", "-f", str(script), "-c", str(clients), "-j", str(clients)]
        cmd += ["-T", str(max(1, round(seconds))), "-l", "--log-prefix", f"{tmp}/txn", url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
        tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))
        latencies = [
            int(line.split()[2]) / 1000
            for log in Path(tmp).glob("txn.*")
            for line in log.read_text().splitlines()
            if line.strip()
        ]
    with connect(url) as conn:
        conn.execute("DROP TABLE pgbeat_bench_floor")
    return Floor(clients, seconds, tps, percentile(latencies, 50) or 0.0, percentile(latencies, 99) or 0.0)


# ---------------------------------------------------------------- processes


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MB) and CPU seconds (user + system) of a live process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return {}
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    fields = stat.rsplit(")", 1)[1].split()  # fields from the 3rd (state) on
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: the 14th and 15th
    return {"rss_mb": rss_kb / 1024, "cpu_s": ticks / os.sysconf("SC_CLK_TCK")}


def fleet_stats(fleet: Fleet) -> dict[str, dict[str, float]]:
    counts: dict[str, int] = {}
    stats = {}
    for p in fleet.processes:
        n = counts[p.role] = counts.get(p.role, -1) + 1
        stats[f"{p.role}-{n}"] = proc_stats(p.pid)
    return stats


def cpu_between(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> float:
    return sum(after[k].get("cpu_s", 0) - before.get(k, {}).get("cpu_s", 0) for k in after)


@dataclass
class Costs:
    """What the database and the daemons spent so far: WAL written, transactions
    committed in the database (each a round trip of a daemon's: every call is one
    statement), CPU seconds of the database's backends (this machine's processes, read
    from /proc) and of the daemons."""

    wal_bytes: float
    transactions: float
    postgres_cpu_s: float
    daemon_cpu_s: float

    @classmethod
    def now(cls, conn: psycopg.Connection, fleet: Fleet) -> Costs:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        wal, transactions, pids = conn.execute(
            """SELECT pg_current_wal_lsn() - '0/0'::pg_lsn,
                      (SELECT xact_commit + xact_rollback FROM pg_stat_database
                        WHERE datname = current_database()),
                      array(SELECT pid FROM pg_stat_activity
                             WHERE datname = current_database() AND pid <> pg_backend_pid())""",
        ).fetchone()
        backends = sum(proc_stats(pid).get("cpu_s", 0.0) for pid in pids)
        daemons = sum(s.get("cpu_s", 0.0) for s in fleet_stats(fleet).values())
        return cls(float(wal), float(transactions), backends, daemons)

    @classmethod
    def settled(cls, conn: psycopg.Connection, fleet: Fleet) -> Costs:
        """As now(), once the transaction count has stopped moving: a backend reports
        its counts when it goes idle, up to 10 s later (PostgreSQL's stats interval). This
        reading's own two transactions are the noise left."""
        costs = cls.now(conn, fleet)
        for _ in range(24):
            time.sleep(0.5)
            later = cls.now(conn, fleet)
            if later.transactions - costs.transactions <= 4:
                break
            costs = later
        return costs

    def per_run_figures(self, later: Costs, runs: int) -> list[Figure]:
        """The cost of each run between two snapshots. Backends that ended between them
        are not counted, so the PostgreSQL figure is a lower bound."""
        per = max(runs, 1)
        return [
            Figure("WAL bytes per run", (later.wal_bytes - self.wal_bytes) / per, "bytes"),
            Figure("transactions per run", (later.transactions - self.transactions) / per, ""),
            Figure(
                "PostgreSQL CPU ms per run", (later.postgres_cpu_s - self.postgres_cpu_s) * 1000 / per, "ms"
            ),
            Figure("daemon CPU ms per run", (later.daemon_cpu_s - self.daemon_cpu_s) * 1000 / per, "ms"),
        ]


def start_daemons(
    fleet: Fleet, url: str, opts: Options, scheduler: bool = True, env: dict[str, str] | None = None
) -> None:
    """Start the scheduler and worker processes; return once they are registered."""
    if scheduler:
        fleet.start("scheduler", env=env)
    for _ in range(opts.workers):
        fleet.start("worker", "--concurrency", str(opts.concurrency), env=env)
    wanted = opts.workers + (1 if scheduler else 0)
    deadline = time.monotonic() + 60
    with connect(url) as conn:
        while True:
            for p in fleet.processes:
                if not p.alive():
                    raise RuntimeError(f"{p.role} exited with {p.proc.returncode}:\n{p.log()[-3000:]}")
            live = conn.execute(
                "SELECT count(*) FROM pgbeat.live_daemons WHERE role IN ('scheduler', 'worker')"
            ).fetchone()[0]
            if live >= wanted:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("daemons did not register within 60 s")
            time.sleep(0.1)


def check_alive(fleet: Fleet) -> None:
    for p in fleet.processes:
        if not p.alive():
            raise RuntimeError(f"{p.role} exited with {p.proc.returncode}:\n{p.log()[-3000:]}")


# ---------------------------------------------------------------- HTTP load


@dataclass
class Load:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    statuses: dict[int, int]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def http_load(
    base: str,
    clients: int,
    request: Callable[[int], tuple[str, str, dict | None]],
    *,
    total: int | None = None,
    seconds: float | None = None,
    ok: tuple[int, ...] = (200, 201),
) -> Load:
    """`clients` concurrent keep-alive HTTP/1.1 connections sending request(i) for i = 0,
    1, ... until `total` requests are sent or `seconds` pass. A bare client on asyncio
    streams: it shares the cores with the API it measures, and aiohttp spent about
    125 µs of CPU per request, a sixth of what the API itself spends on a POST."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    async def main() -> Load:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        counter = iter(range(total if total is not None else 1 << 62))
        deadline = time.monotonic() + (seconds if seconds is not None else 3600)

        async def client() -> None:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                for i in counter:
                    if time.monotonic() > deadline:
                        return
                    method, path, body = request(i)
                    payload = b"" if body is None else msgspec.json.encode(body)
                    head = (
                        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                    )
                    t0 = time.perf_counter()
                    writer.write(head.encode() + payload)
                    status, length, close = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
                    await reader.readexactly(length)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    statuses[status] = statuses.get(status, 0) + 1
                    if close:
                        writer.close()
                        reader, writer = await asyncio.open_connection(host, port)
            finally:
                writer.close()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        errors = sum(n for s, n in statuses.items() if s not in ok)
        return Load(len(latencies), errors, elapsed, latencies, statuses)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def parse_response_head(head: bytes) -> tuple[int, int, bool]:
    """An HTTP/1.1 response head: (status, Content-Length, whether the server closes)."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = b"close" in value.lower()
    if length is None:
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    return status, length, close


def task_body(i: int, schedule: dict, params: dict | None = None) -> dict:
    return {
        "name": f"bench-api-{i}",
        "kind": "sleep",
        "params": params or {"seconds": 0},
        "schedule": schedule,
    }


# ---------------------------------------------------------------- scenarios


@dataclass
class Options:
    size: int
    duration: float
    concurrency: int = 100
    workers: int = 1
    clients: int = 32
    api_tasks: int | None = None
    floor_clients: int | None = None
    floor_seconds: float = 5.0
    every: float = 60.0  # scale: the tasks' interval, seconds


LATENESS_SQL = """
    SELECT extract(epoch FROM started_at - scheduled_for) * 1000 FROM pgbeat.runs
     WHERE started_at IS NOT NULL AND attempt = 1 AND state <> 'skipped'
       AND scheduled_for >= %(start)s AND scheduled_for < %(end)s
       AND task_id = ANY (%(tasks)s)"""


UNFINISHED_SQL = """
    SELECT count(*) FROM pgbeat.runs WHERE scheduled_for < %(end)s AND state IN ('pending', 'running')"""


def task_ids(conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM pgbeat.tasks ORDER BY id").fetchall()]


def burst(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """N one-shot counter tasks due at the same instant; due -> all runs committed finished."""
    n = opts.size
    start_daemons(fleet, url, opts)
    with connect(url) as conn:
        due = db_now(conn) + timedelta(seconds=2 + n / 5000)
        created_per_s = create_tasks(
            conn, n, "counter", {}, "jsonb_build_object('at', %(due)s::timestamptz)", due=due
        )
        start = max(due, db_now(conn))  # runs are due once both due and committed
        before = Costs.now(conn, fleet)
        done = wait_for(
            conn,
            "SELECT count(*) FROM pgbeat.runs WHERE finished_at IS NOT NULL",
            {},
            lambda v: v >= n,
            timeout=(start - db_now(conn)).total_seconds() + max(60, n / 200),
        )
        after = Costs.settled(conn, fleet)
        check_alive(fleet)
        row = conn.execute(
            """SELECT count(*) FILTER (WHERE state = 'succeeded'), max(finished_at), max(created_at),
                      (SELECT coalesce(sum(value), 0)::bigint FROM pgbeat.counters),
                      count(*) FILTER (WHERE backend_pid IS NOT NULL)
                 FROM pgbeat.runs""",
        ).fetchone()
    succeeded, last_finished, last_created, counted, locked = row
    seconds = (last_finished - start).total_seconds() if last_finished else None
    figures = [
        Figure("runs/s (due -> all finished)", n / seconds if seconds else None, "runs/s", ">= 10000", "tps"),
        Figure("seconds due -> all finished", seconds, "s"),
        Figure(
            "seconds due -> all materialised",
            (last_created - start).total_seconds() if last_created else None,
            "s",
        ),
        Figure("runs finished", done, "runs", f">= {n}"),
        Figure("runs succeeded", succeeded, "runs", f">= {n}"),
        Figure("runs started under a task lock", locked, "runs", f">= {n}"),
        Figure("counter total", counted, "", f">= {n}"),
        Figure("tasks created via SQL/s", created_per_s, "tasks/s"),
        *before.per_run_figures(after, done),
    ]
    return figures, {}


def steady(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """N tasks every 1 s for D seconds: every slot runs; lateness p50/p99. The tasks' phases
    are spread evenly over the second (N runs/s arrive as a steady stream, as tasks created
    at different moments do); N slots all due at one instant would be a burst every second."""
    n, seconds = opts.size, int(opts.duration)
    with connect(url) as conn:
        first = db_now(conn).replace(microsecond=0) + timedelta(seconds=3 + int(n / 5000))
        create_tasks(
            conn,
            n,
            "sleep",
            {"seconds": 0},
            "jsonb_build_object('every', 1, 'start', %(first)s::timestamptz"
            " + i * %(spread)s * interval '1 ms')",
            first=first,
            spread=1000 / max(n, 1),
        )
        tasks = task_ids(conn)
        start_daemons(fleet, url, opts)
        end = first + timedelta(seconds=seconds)
        time.sleep(max(0.0, (first - db_now(conn)).total_seconds()))
        before = fleet_stats(fleet)
        time.sleep(max(0.0, (end - db_now(conn)).total_seconds()))
        after = fleet_stats(fleet)
        window = {"start": first, "end": end, "tasks": tasks}
        wait_for(
            conn,
            UNFINISHED_SQL,
            window,
            lambda v: v == 0,
            timeout=30,
        )
        check_alive(fleet)
        lateness = sample_ms(conn, LATENESS_SQL, window)
        ran, coalesced, skipped = conn.execute(
            """SELECT count(*) FILTER (WHERE state = 'succeeded'), coalesce(sum(coalesced), 0),
                      count(*) FILTER (WHERE state = 'skipped')
                 FROM pgbeat.runs WHERE scheduled_for >= %(start)s AND scheduled_for < %(end)s
                  AND attempt = 1""",
            window,
        ).fetchone()
    expected = n * seconds
    figures = [
        Figure("slots expected", expected, "slots"),
        Figure("slots run", ran, "slots", f">= {expected}"),
        Figure("slots coalesced or skipped", coalesced + skipped, "slots", "<= 0"),
        Figure("runs/s", ran / seconds, "runs/s", "", "tps"),
        Figure("lateness p50", percentile(lateness, 50), "ms", "<= 2", "p50"),
        Figure("lateness p99", percentile(lateness, 99), "ms", "<= 20", "p99"),
        Figure("lateness max", max(lateness, default=None), "ms"),
        Figure("daemon CPU s per s", cpu_between(before, after) / seconds, "cores"),
    ]
    return figures, {}


def latency(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """N tasks on 1 s intervals with staggered phases, plus a trigger_task call every 10 ms."""
    n, seconds = opts.size, int(opts.duration)
    trigger_every = 0.010
    with connect(url) as conn:
        first = db_now(conn).replace(microsecond=0) + timedelta(seconds=3)
        create_tasks(
            conn,
            n,
            "sleep",
            {"seconds": 0},
            "jsonb_build_object('every', 1, 'start', %(first)s::timestamptz"
            " + (i %% 100) * interval '10 ms' + (i / 100) * interval '1 ms')",
            first=first,
        )
        scheduled = task_ids(conn)
        # Tasks only ever run by trigger: their own slot is an hour away.
        create_tasks(conn, 100, "sleep", {"seconds": 0}, "jsonb_build_object('every', '1h')")
        triggered = [t for t in task_ids(conn) if t not in set(scheduled)]
        start_daemons(fleet, url, opts)
        end = first + timedelta(seconds=seconds)
        time.sleep(max(0.0, (first - db_now(conn)).total_seconds()))
        calls = round(seconds / trigger_every)
        began = time.monotonic()
        for i in range(calls):
            time.sleep(max(0.0, began + i * trigger_every - time.monotonic()))
            conn.execute("SELECT (pgbeat.trigger_task(%s)).id", (triggered[i % len(triggered)],))
        wait_for(
            conn,
            UNFINISHED_SQL,
            {"end": end + timedelta(seconds=1)},
            lambda v: v == 0,
            timeout=30,
        )
        check_alive(fleet)
        lateness = sample_ms(conn, LATENESS_SQL, {"start": first, "end": end, "tasks": scheduled})
        trigger_started = sample_ms(
            conn,
            """SELECT extract(epoch FROM started_at - scheduled_for) * 1000 FROM pgbeat.runs
                WHERE task_id = ANY (%(tasks)s) AND started_at IS NOT NULL""",
            {"tasks": triggered},
        )
    figures = [
        Figure("scheduled runs", len(lateness), "runs", f">= {n * seconds}"),
        Figure("lateness p50", percentile(lateness, 50), "ms", "<= 1", "p50"),
        Figure("lateness p99", percentile(lateness, 99), "ms", "<= 5", "p99"),
        Figure("trigger calls", calls, "calls"),
        Figure("triggered runs started", len(trigger_started), "runs"),
        Figure("trigger -> started p50", percentile(trigger_started, 50), "ms", "<= 3", "p50"),
        Figure("trigger -> started p99", percentile(trigger_started, 99), "ms", "", "p99"),
    ]
    return figures, {}


def scale(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """N tasks on `--every` (60) s intervals, their slots spread evenly over the interval:
    creation rate (API and SQL), /upcoming p99, lateness p99, RSS over the window."""
    n, seconds, every = opts.size, opts.duration, opts.every
    via_api = min(n, opts.api_tasks if opts.api_tasks is not None else n // 10)
    _, base = fleet.start_api()
    with connect(url) as conn:
        # Slots spread evenly over the interval after `first`: n/every runs per second.
        first = db_now(conn).replace(microsecond=0) + timedelta(seconds=5 + via_api / 1000 + n / 5000)
        spread_ms = every * 1000 / max(n, 1)

        def post(i: int) -> tuple[str, str, dict]:
            start = first + timedelta(milliseconds=i * spread_ms)
            return "POST", "/tasks", task_body(i, {"every": every, "start": start.isoformat()})

        created = http_load(base, opts.clients, post, total=via_api)
        sql_per_s = create_tasks(
            conn,
            n - via_api,
            "sleep",
            {"seconds": 0},
            "jsonb_build_object('every', %(every)s::float8, 'start', %(first)s::timestamptz"
            " + (%(offset)s + i) * %(spread)s * interval '1 ms')",
            every=every,
            first=first,
            offset=via_api,
            spread=spread_ms,
        )
        tasks = task_ids(conn)
        conn.execute("VACUUM ANALYZE pgbeat.tasks")
        start_daemons(fleet, url, opts)
        # On a host slower than the schedule assumed, creating the tasks outlasts `first`:
        # the slots already due are a start-up backlog (burst's subject), not this steady
        # load, so the window opens only once it has been worked off.
        catch_up_s = wait_until_caught_up(conn)
        # Measure once the first minute of slots is under way.
        window_start = max(first, db_now(conn)) + timedelta(seconds=min(5, seconds / 4))
        time.sleep(max(0.0, (window_start - db_now(conn)).total_seconds()))
        before = fleet_stats(fleet)
        upcoming = http_load(
            base, 1, lambda i: ("GET", "/upcoming?limit=100", None), seconds=seconds, ok=(200,)
        )
        after = fleet_stats(fleet)
        window_end = db_now(conn)
        window = {"start": window_start, "end": window_end - timedelta(seconds=1), "tasks": tasks}
        check_alive(fleet)
        lateness = sample_ms(conn, LATENESS_SQL, window)
        slots, coalesced = conn.execute(
            """SELECT count(*), coalesce(sum(coalesced), 0) FROM pgbeat.runs
                WHERE scheduled_for >= %(start)s AND scheduled_for < %(end)s""",
            window,
        ).fetchone()
    span = (window["end"] - window_start).total_seconds()
    figures = [
        Figure("tasks", len(tasks), "tasks", f">= {n}"),
        Figure("tasks created via API/s", created.rate, "tasks/s", ">= 2000", "tps"),
        Figure("API create errors", created.errors, "", "<= 0"),
        Figure("tasks created via SQL/s", sql_per_s, "tasks/s", "", "tps"),
        Figure("start-up backlog worked off in", catch_up_s, "s"),
        Figure("GET /upcoming p50", percentile(upcoming.latencies_ms, 50), "ms"),
        Figure("GET /upcoming p99", percentile(upcoming.latencies_ms, 99), "ms", "<= 50", "p99"),
        Figure("GET /upcoming errors", upcoming.errors, "", "<= 0"),
        Figure("runs/s", slots / span if span > 0 else None, "runs/s", "", "tps"),
        Figure("slots coalesced", coalesced, "slots", "<= 0"),
        Figure("lateness p50", percentile(lateness, 50), "ms", "", "p50"),
        Figure("lateness p99", percentile(lateness, 99), "ms", "<= 100", "p99"),
        Figure("daemon CPU s per s", cpu_between(before, after) / seconds, "cores"),
    ]
    for name, stats in after.items():
        if stats and not name.startswith("api"):
            figures.append(Figure(f"{name} RSS", stats["rss_mb"], "MB"))
            grown = stats["rss_mb"] - before.get(name, {}).get("rss_mb", stats["rss_mb"])
            figures.append(Figure(f"{name} RSS growth over the window", grown, "MB"))
    return figures, {}


# Seconds by which the most overdue slot or pending run is late (0: none is).
BEHIND_SQL = """SELECT coalesce(extract(epoch FROM now() - least(pgbeat.next_due_at(),
                                                                pgbeat.next_pending_due_at())), 0)"""


def wait_until_caught_up(conn: psycopg.Connection, lag: float = 0.5, timeout: float = 120) -> float:
    """Wait until no slot and no pending run is more than `lag` seconds overdue; returns
    the seconds it took."""
    began = time.monotonic()
    behind = wait_for(conn, BEHIND_SQL, {}, lambda seconds: seconds <= lag, timeout)
    if behind > lag:
        raise RuntimeError(f"daemons still {behind:.1f} s behind after {timeout:g} s")
    return round(time.monotonic() - began, 2)


def idle(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """N hourly tasks, nothing due for D seconds: queries/s of all daemons, and their CPU."""
    n, seconds = opts.size, opts.duration
    with connect(url) as conn:
        create_tasks(
            conn,
            n,
            "sleep",
            {"seconds": 0},
            "jsonb_build_object('every', '1h',"
            " 'start', now() + interval '1 hour' + (i %% 3600) * interval '1 s')",
        )
        fleet.start_api()
        start_daemons(fleet, url, opts)
        # Statistics reach pg_stat_database up to ~10 s late (PGSTAT_IDLE_INTERVAL): let
        # the start-up's transactions land before the window opens.
        time.sleep(min(11.0, max(1.0, seconds / 2)))
        counted = """SELECT xact_commit + xact_rollback FROM pg_stat_database
                      WHERE datname = current_database()"""
        conn.execute("SELECT pg_stat_clear_snapshot()")
        xacts_before = conn.execute(counted).fetchone()[0]
        before = fleet_stats(fleet)
        time.sleep(seconds)
        after = fleet_stats(fleet)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        xacts_after = conn.execute(counted).fetchone()[0]
        check_alive(fleet)
    own = 3  # this session's transactions between the two reads
    queries = max(0, xacts_after - xacts_before - own)
    cpu = cpu_between(before, after)
    figures = [
        Figure("transactions/s, all daemons", queries / seconds, "xact/s", "<= 1"),
        Figure("CPU s over the window, all daemons", cpu, "s"),
        Figure("CPU share, all daemons", cpu / seconds * 100, "%", "<= 1"),
    ]
    for name in after:
        figures.append(
            Figure(f"{name} CPU share", (after[name]["cpu_s"] - before[name]["cpu_s"]) / seconds * 100, "%")
        )
    return figures, {}


def api(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """GET /tasks/{id} then POST /tasks from concurrent keep-alive clients, one api process."""
    n, seconds = opts.size, opts.duration
    with connect(url) as conn:
        create_tasks(conn, n, "sleep", {"seconds": 0}, "jsonb_build_object('every', '1h')")
        ids = task_ids(conn)
    api_proc, base = fleet.start_api()
    http_load(base, opts.clients, lambda i: ("GET", f"/tasks/{ids[i % len(ids)]}", None), seconds=1)
    rng = random.Random(6)
    t0 = time.process_time()
    cpu0 = proc_stats(api_proc.pid).get("cpu_s", 0.0)
    gets = http_load(
        base, opts.clients, lambda i: ("GET", f"/tasks/{rng.choice(ids)}", None), seconds=seconds
    )
    posts = http_load(
        base, opts.clients, lambda i: ("POST", "/tasks", task_body(i, {"every": "1h"})), seconds=seconds
    )
    api_cpu = proc_stats(api_proc.pid).get("cpu_s", 0.0) - cpu0
    client_cpu = time.process_time() - t0
    figures = [
        Figure("GET /tasks/{id} req/s", gets.rate, "req/s", ">= 3000", "tps"),
        Figure("GET /tasks/{id} p50", percentile(gets.latencies_ms, 50), "ms", "", "p50"),
        Figure("GET /tasks/{id} p99", percentile(gets.latencies_ms, 99), "ms", "", "p99"),
        Figure("GET errors", gets.errors, "", "<= 0"),
        Figure("POST /tasks req/s", posts.rate, "req/s", ">= 1500", "tps"),
        Figure("POST /tasks p50", percentile(posts.latencies_ms, 50), "ms", "", "p50"),
        Figure("POST /tasks p99", percentile(posts.latencies_ms, 99), "ms", "", "p99"),
        Figure("POST errors", posts.errors, "", "<= 0"),
        Figure("api CPU share", api_cpu / (2 * seconds) * 100, "%"),
        Figure("load generator CPU share", client_cpu / (2 * seconds) * 100, "%"),
    ]
    return figures, {"get_statuses": gets.statuses, "post_statuses": posts.statuses}


def history_size(conn: psycopg.Connection) -> float:
    """Bytes of the runs table with its indexes (all of its partitions, if it has any)."""
    return float(
        conn.execute(
            """SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size('pgbeat.runs'))
                 FROM pg_partition_tree('pgbeat.runs')"""
        ).fetchone()[0]
    )


def burst_rate(server_url: str, opts: Options, partitioned: bool) -> float | None:
    """runs/s of `burst` on a fresh database whose runs are kept by day (as migrated) or
    in one table (migration 0007 rolled back; the same functions work on both)."""
    with bench_database(server_url) as url:
        if not partitioned:
            assert migrations.rollback(url, 1) == ["0007_runs_by_day"], (
                "0007 is no longer the newest migration"
            )
            migrations.apply_schema(url)
        with tempfile.TemporaryDirectory(prefix="pgbeat-bench-burst-", dir=LOG_TMP) as tmp:
            with Fleet(url, Path(tmp), env={"PGBEAT_RATE_LIMIT": "0"}) as fleet:
                figures, _ = burst(url, opts, fleet)
    return next(f.value for f in figures if f.name == "runs/s (due -> all finished)")


def history(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """N finished runs of history (bulk SQL, spread over 40 days, each day in its
    partition as on a deployment that has kept them), then: GET /runs and
    GET /tasks/{id}/runs p99, one retention pass of 30 days with triggered runs claimed
    meanwhile (the pause it causes them), the table's size before and after; and
    `burst` with runs kept by day against one unpartitioned table, alternated."""
    n, retention_days, span_days = opts.size, 30, 40
    with connect(url) as conn:
        # The fresh database has a partition for the days before its migration (empty);
        # a deployment that ran for span_days has one for each of those days instead.
        for (drop,) in conn.execute(
            "SELECT format('DROP TABLE %s', part) FROM pgbeat.run_partitions() WHERE NOT whole_days"
            " AND upper_bound IS NOT NULL"
        ).fetchall():
            conn.execute(drop)
        conn.execute(
            "SELECT pgbeat.add_run_partitions(2, (now() AT TIME ZONE 'UTC')::date - %s)", (span_days + 1,)
        )
        create_tasks(conn, max(10, n // 10_000), "sleep", {"seconds": 0}, "jsonb_build_object('every', '1h')")
        tasks = task_ids(conn)
        started = time.perf_counter()
        # Run i belongs to task i % len(tasks); slots step back from now over span_days.
        conn.execute(
            """INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at, state, started_at,
                                        finished_at, result, created_at)
               SELECT t.ids[1 + i %% t.k], 'sleep', s.at, s.at, 'succeeded', s.at,
                      s.at + interval '2 ms', '{"slept": 0}', s.at
                 FROM (SELECT %(tasks)s::int[] AS ids, cardinality(%(tasks)s::int[]) AS k) t,
                      generate_series(0, %(n)s - 1) AS i,
                      LATERAL (SELECT now() - (%(span)s * interval '1 day') * (i + 1) / %(n)s AS at) s""",
            {"tasks": tasks, "n": n, "span": span_days},
        )
        conn.execute("VACUUM ANALYZE pgbeat.runs")
        generated_s = time.perf_counter() - started
        size_before = history_size(conn)
        # Retention takes whole days: the runs of the days that ended before the cutoff.
        past_days = conn.execute(
            """SELECT count(*) FROM pgbeat.runs, LATERAL (SELECT (now() AT TIME ZONE 'UTC')
                                                              - make_interval(days => %s) AS cutoff) c
                WHERE scheduled_for < date_trunc('day', c.cutoff) AT TIME ZONE 'UTC'""",
            (retention_days,),
        ).fetchone()[0]
        runs_before = conn.execute("SELECT count(*) FROM pgbeat.runs").fetchone()[0]
        create_tasks(conn, 100, "sleep", {"seconds": 0}, "jsonb_build_object('every', '1h')")
        triggered = [t for t in task_ids(conn) if t not in set(tasks)]
    _, base = fleet.start_api()
    # The worker's own retention would prune at its start: the pass measured here is the bench's.
    start_daemons(fleet, url, opts, scheduler=False, env={"PGBEAT_RETENTION_DAYS": "36500"})
    rng = random.Random(7)
    http_load(base, 4, lambda i: ("GET", "/runs?limit=100", None), total=50)  # warm up
    all_runs = http_load(base, 1, lambda i: ("GET", "/runs?limit=100", None), seconds=opts.duration / 2)
    task_runs = http_load(
        base,
        1,
        lambda i: ("GET", f"/tasks/{rng.choice(tasks)}/runs?limit=100", None),
        seconds=opts.duration / 2,
    )

    # One retention pass as the daemons run it (whole days, then batches), while a run is
    # triggered every 10 ms.
    drop_steps, statements = 0, []
    window: dict[str, datetime] = {}

    def repeat(conn: psycopg.Connection, query: str, more: Callable[[int], bool]) -> int:
        """Run query (one number back) while more(that number), timing each; the numbers' sum."""
        total = 0
        while True:
            t0 = time.perf_counter()
            got = conn.execute(query, (retention_days,)).fetchone()[0]
            statements.append((time.perf_counter() - t0) * 1000)
            total += got
            if not more(got):
                return total

    def prune() -> None:
        nonlocal drop_steps
        with connect(url) as prune_conn:
            window["start"] = db_now(prune_conn)
            drop_steps = repeat(
                prune_conn,
                "SELECT pgbeat.drop_run_partitions(make_interval(days => %s))",
                lambda got: got > 0,
            )
            repeat(
                prune_conn,
                "SELECT pgbeat.prune_history(make_interval(days => %s), 10000)",
                lambda got: got >= 10000,
            )
            window["end"] = db_now(prune_conn)

    pruner = threading.Thread(target=prune)
    with connect(url) as conn:
        pruner.start()
        i = 0
        while pruner.is_alive() or i < 100:
            conn.execute("SELECT (pgbeat.trigger_task(%s)).id", (triggered[i % len(triggered)],))
            i += 1
            time.sleep(0.010)
        pruner.join()
        wait_for(conn, UNFINISHED_SQL, {"end": db_now(conn)}, lambda v: v == 0, timeout=30)
        check_alive(fleet)
        during = sample_ms(
            conn,
            """SELECT extract(epoch FROM started_at - scheduled_for) * 1000 FROM pgbeat.runs
                WHERE task_id = ANY (%(tasks)s) AND started_at IS NOT NULL
                  AND scheduled_for BETWEEN %(start)s AND %(end)s""",
            {"tasks": triggered, **window},
        )
        size_after = history_size(conn)
        pruned = runs_before + i - conn.execute("SELECT count(*) FROM pgbeat.runs").fetchone()[0]
        started_runs = conn.execute(
            "SELECT count(*) FROM pgbeat.runs WHERE task_id = ANY (%s) AND started_at IS NOT NULL",
            (triggered,),
        ).fetchone()[0]
    prune_s = (window["end"] - window["start"]).total_seconds()

    # Burst with runs kept by day, and in one table: fresh databases of the same server,
    # alternated (by day, one table, one table, by day) so drift favours neither.
    server = with_dbname(url, "postgres")
    burst_opts = Options(
        size=max(200, min(20_000, n // 500)), duration=0, concurrency=500, workers=opts.workers
    )
    rates: dict[bool, list[float]] = {True: [], False: []}
    for partitioned in (True, False, False, True):
        rates[partitioned].append(burst_rate(server, burst_opts, partitioned) or 0.0)
    by_day, one_table = sum(rates[True]) / 2, sum(rates[False]) / 2

    mb = 1024 * 1024
    figures = [
        Figure("runs of history", n, "runs"),
        Figure("seconds to generate", generated_s, "s"),
        Figure("GET /runs p50", percentile(all_runs.latencies_ms, 50), "ms"),
        Figure("GET /runs p99", percentile(all_runs.latencies_ms, 99), "ms", "<= 20"),
        Figure("GET /tasks/{id}/runs p50", percentile(task_runs.latencies_ms, 50), "ms"),
        Figure("GET /tasks/{id}/runs p99", percentile(task_runs.latencies_ms, 99), "ms", "<= 10"),
        Figure("GET errors", all_runs.errors + task_runs.errors, "", "<= 0"),
        Figure("runs in days past 30 days", past_days, "runs"),
        Figure("runs pruned", pruned, "runs", f">= {past_days}"),
        Figure("day partitions dropped (3 steps each)", drop_steps / 3, ""),
        Figure("retention pass seconds", prune_s, "s"),
        Figure("longest retention statement", max(statements, default=None), "ms"),
        Figure("runs triggered", i, "runs"),
        Figure("triggered runs started", started_runs, "runs", f">= {i}"),
        Figure("runs triggered during retention", len(during), "runs"),
        Figure("trigger -> started p99, retention", percentile(during, 99), "ms"),
        Figure("trigger -> started max, retention", max(during, default=None), "ms", "<= 10"),
        Figure("runs table + indexes before", size_before / mb, "MB"),
        Figure("runs table + indexes after", size_after / mb, "MB"),
        Figure(f"burst runs/s, runs by day ({burst_opts.size} tasks, mean of 2)", by_day, "runs/s"),
        Figure(f"burst runs/s, one table ({burst_opts.size} tasks, mean of 2)", one_table, "runs/s"),
        Figure("burst by day vs one table", ratio(by_day, one_table), "x", ">= 0.95"),
    ]
    return figures, {
        "burst_runs_per_s": {"by_day": rates[True], "one_table": rates[False]},
        "retention_statements_ms": [round(ms, 1) for ms in statements],
        "trigger_to_started_ms_during_retention": [round(ms, 1) for ms in during],
    }


def make_dashboard_data(conn: psycopg.Connection, n: int) -> dict[str, Any]:
    """N tasks (80% sleep every hour, 10% http cron, 10% counter every 30 min; 5%
    paused, 1% deleted) and 20 N finished runs (bulk SQL): N in the last hour (each
    task's hourly run), the rest spread over 30 days; every 20th failed."""
    third = max(1, n // 10)
    create_tasks(conn, n - 2 * third, "sleep", {"seconds": 0}, "jsonb_build_object('every', '1h')")
    create_tasks(conn, third, "http", {"url": "http://127.0.0.1:9/"}, "jsonb_build_object('every', '1d')")
    cron = {"schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin"}}
    conn.execute(
        "SELECT count(pgbeat.update_task(id, %s::jsonb, %s)) FROM pgbeat.tasks WHERE kind = 'http'",
        (json.dumps(cron), schedules.next_cron_slot("0 9 * * 1-5", "Europe/Berlin", datetime.now(UTC))),
    )
    create_tasks(conn, third, "counter", {"step": 1}, "jsonb_build_object('every', '30m')")
    conn.execute("SELECT count(pgbeat.pause_task(id)) FROM pgbeat.tasks WHERE id % 20 = 0")
    conn.execute("SELECT count(pgbeat.delete_task(id)) FROM pgbeat.tasks WHERE id % 100 = 1")
    tasks = task_ids(conn)
    started = time.perf_counter()
    # Run i belongs to task i % k; the first k runs finished in the last hour, the
    # others step back over 30 days. Lateness is a few ms.
    conn.execute(
        """INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at, state, started_at,
                                    finished_at, result, error, created_at)
           SELECT t.id, t.kind, s.at, s.at, CASE WHEN i %% 20 = 7 THEN 'failed' ELSE 'succeeded' END,
                  s.at + (i %% 13) * interval '1 ms', s.at + interval '15 ms',
                  '{}', CASE WHEN i %% 20 = 7 THEN 'HTTP 503 (expected 2xx)' END, s.at
             FROM (SELECT %(tasks)s::int[] AS ids, cardinality(%(tasks)s::int[]) AS k) ids,
                  generate_series(0, %(runs)s - 1) AS i,
                  LATERAL (SELECT now() - CASE WHEN i < ids.k
                                               THEN interval '1 hour' * (i + 1) / ids.k
                                               ELSE interval '1 hour' + interval '30 days' * i / %(runs)s
                                          END AS at) s,
                  LATERAL (SELECT id, kind FROM pgbeat.tasks WHERE id = ids.ids[1 + i %% ids.k]) t""",
        {"tasks": tasks, "runs": 20 * n},
    )
    conn.execute("VACUUM ANALYZE")
    first_run, last_run = conn.execute("SELECT min(id), max(id) FROM pgbeat.runs").fetchone()
    return {
        "tasks": tasks,
        "live": [
            r[0] for r in conn.execute("SELECT id FROM pgbeat.tasks WHERE deleted_at IS NULL ORDER BY id")
        ],
        "runs": 20 * n,
        "generated_s": time.perf_counter() - started,
        "first_run": first_run,
        "last_run": last_run,
    }


def ui(url: str, opts: Options, fleet: Fleet) -> tuple[list[Figure], dict[str, Any]]:
    """The dashboard's pages with N tasks and 20 N runs of history (make_dashboard_data):
    p50 and p99 of each page's render, one client at a time."""
    n = opts.size
    with connect(url) as conn:
        data = make_dashboard_data(conn, n)
    tasks, live, first_run, last_run = data["tasks"], data["live"], data["first_run"], data["last_run"]
    _, base = fleet.start_api()
    start_daemons(fleet, url, opts, env={"PGBEAT_RETENTION_DAYS": "36500"})
    rng = random.Random(21)
    middle = tasks[len(tasks) // 2]
    pages: dict[str, Callable[[int], str]] = {
        "overview": lambda i: "/ui",
        "overview refresh": lambda i: "/ui/fragments/overview",
        "tasks": lambda i: "/ui/tasks",
        "tasks, later page": lambda i: f"/ui/tasks?after={middle}",
        "tasks by name": lambda i: f"/ui/tasks?name=bench-{rng.randrange(n)}",
        "tasks by kind+status": lambda i: "/ui/tasks?kind=counter&status=paused",
        "a task": lambda i: f"/ui/tasks/{rng.choice(live)}",
        "a task, older runs": lambda i: f"/ui/tasks/{rng.choice(live)}?before={last_run - n}",
        "a run": lambda i: f"/ui/runs/{rng.randint(first_run, last_run)}",
    }
    figures = [
        Figure("tasks", len(tasks), "tasks"),
        Figure("runs of history", data["runs"], "runs"),
        Figure("seconds to generate the runs", data["generated_s"], "s"),
    ]
    errors = 0
    for name, path in pages.items():
        http_load(base, 1, lambda i, path=path: ("GET", path(i), None), total=5)  # warm up
        load = http_load(
            base, 1, lambda i, path=path: ("GET", path(i), None), seconds=opts.duration / len(pages)
        )
        errors += load.errors
        figures.append(Figure(f"{name} p50", percentile(load.latencies_ms, 50), "ms"))
        figures.append(Figure(f"{name} p99", percentile(load.latencies_ms, 99), "ms", "<= 100"))
    figures.append(Figure("page errors", errors, "", "<= 0"))
    return figures, {}


Scenario = Callable[[str, Options, Fleet], tuple[list[Figure], dict[str, Any]]]

# The processes' logs (3 lines per run, about 1.3 MB/s at 1,700 runs/s) stay in memory
# where the host has /dev/shm. On disk, the kernel writes them back every 30 s in one
# batch, and on the database's own filesystem that stalled its WAL flushes (and every
# commit) for about 200 ms: an artefact of the bench sharing one disk, not of pgbeat.
LOG_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

# name -> (function, default size, default duration in seconds, default worker concurrency).
# A burst of trivial runs is drained fastest by a worker with many slots: its claims and
# finishes then cover 500 runs per statement.
SCENARIOS: dict[str, tuple[Scenario, int, float, int]] = {
    "burst": (burst, 20_000, 0, 500),
    "steady": (steady, 1_000, 60, 100),
    "latency": (latency, 100, 30, 100),
    "scale": (scale, 100_000, 60, 100),
    "idle": (idle, 10_000, 60, 100),
    "api": (api, 1_000, 10, 100),
    "history": (history, 10_000_000, 10, 100),
    "ui": (ui, 100_000, 45, 8),
}


PEER_SCENARIOS = {"burst", "latency"}


def run_scenario(name: str, opts: Options, server_url: str, log_dir: Path | None = None) -> Result:
    """Run one scenario in a fresh database on server_url's server, floor first."""
    function = SCENARIOS[name][0]
    floor_clients = opts.floor_clients or opts.workers
    with bench_database(server_url) as url:
        floor = measure_floor(url, floor_clients, opts.floor_seconds) if opts.floor_seconds > 0 else None
        with tempfile.TemporaryDirectory(prefix=f"pgbeat-bench-{name}-", dir=LOG_TMP) as tmp:
            # The load generator is one client address far over the default rate limit.
            fleet = Fleet(url, log_dir or Path(tmp), env={"PGBEAT_RATE_LIMIT": "0"})
            with fleet:
                figures, extra = function(url, opts, fleet)
                processes = fleet_stats(fleet)
    for f in figures:
        f.judge(floor)
    settings = {k: v for k, v in asdict(opts).items() if v is not None}
    settings.update(extra)
    return Result(name, settings, floor, figures, processes)


def server_url(config: Config) -> str:
    from pgbeat import db

    return db.resolve_url(config)


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def measure_peer(name: str, server_url: str, opts: Options) -> dict[str, Any]:
    """The peer's run of the same scenario, on a fresh database of the same server."""
    with bench_database(server_url, migrate=False) as url:
        if name == "burst":
            return peers.pgqueuer_burst(url, opts.size, batch_size=100)
        return {"latencies_ms": peers.pgqueuer_latency(url, opts.duration)}


def peer_figures(name: str, peer: str, measured: dict[str, Any], result: Result, size: int) -> list[Figure]:
    """The peer's figures, and pgbeat's as ratios to them (targets: burst >= 1.5x, p99 <= 0.5x)."""
    if name == "burst":
        rate = measured["jobs_per_s"]
        return [
            Figure(f"{peer} jobs/s (batch_size 100)", rate, "jobs/s"),
            Figure(f"{peer} jobs done", measured["jobs"], "jobs", f">= {size}"),
            Figure(
                f"runs/s vs {peer}",
                ratio(result.figure("runs/s (due -> all finished)").value, rate),
                "x",
                ">= 1.5",
            ),
        ]
    latencies = measured["latencies_ms"]
    p99 = percentile(latencies, 99)
    return [
        Figure(f"{peer} enqueue -> start p50", percentile(latencies, 50), "ms"),
        Figure(f"{peer} enqueue -> start p99", p99, "ms"),
        Figure(
            f"trigger p99 vs {peer} p99",
            ratio(result.figure("trigger -> started p99").value, p99),
            "x",
            "<= 0.5",
        ),
        Figure(f"lateness p99 vs {peer} p99", ratio(result.figure("lateness p99").value, p99), "x", "<= 0.5"),
    ]


def run_from_args(args: argparse.Namespace, config: Config) -> int:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    if args.peer:
        peers.require(args.peer)
        if set(names) - PEER_SCENARIOS:
            raise SystemExit(f"pgbeat bench: --peer runs with {' or '.join(sorted(PEER_SCENARIOS))}")
    url = server_url(config)
    results = []
    for name in names:
        _, size, duration, concurrency = SCENARIOS[name]
        opts = Options(
            size=args.size or size,
            duration=args.duration if args.duration is not None else duration,
            concurrency=args.concurrency or concurrency,
            workers=args.workers,
            clients=args.clients,
            api_tasks=args.api_tasks,
            floor_clients=args.floor_clients,
            floor_seconds=args.floor_seconds,
            every=args.every,
        )
        for round_ in range(args.rounds if args.peer else 1):
            # With a peer the two alternate (peer first in every other round), so that a
            # machine getting faster or slower during the run favours neither.
            peer_first = args.peer and round_ % 2 == 1
            measured = measure_peer(name, url, opts) if peer_first else None
            result = run_scenario(name, opts, url, Path(args.logs) if args.logs else None)
            if args.peer:
                measured = measured or measure_peer(name, url, opts)
                result.figures += peer_figures(name, args.peer, measured, result, opts.size)
                for f in result.figures:
                    f.judge(result.floor)
            print_result(result)
            results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None, config: Config | None = None) -> int:
    """`pgbeat bench ARGS`, or `python -m pgbeat_lab.bench ARGS` (configured from the environment)."""
    p = argparse.ArgumentParser(
        prog="pgbeat bench",
        description="Run a benchmark against real pgbeat processes in a fresh database on "
        "PGBEAT_DATABASE_URL's server (or the embedded one), with the pgbench floor measured first.",
    )
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--size", type=int, help="tasks (default: the scenario's: burst 20000, steady 1000, ...)")
    p.add_argument("--duration", type=float, help="seconds measured (default: the scenario's)")
    p.add_argument(
        "--concurrency", type=int, help="each worker's --concurrency (default: burst 500, others 100)"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients (scale, api)")
    p.add_argument("--every", type=float, default=60.0, help="scale: the tasks' interval in seconds")
    p.add_argument("--api-tasks", type=int, help="scale: tasks created through the API (default size/10)")
    p.add_argument("--floor-clients", type=int, help="pgbench clients (default: one per worker)")
    p.add_argument("--floor-seconds", type=float, default=5.0, help="pgbench run length (0: skip)")
    p.add_argument(
        "--peer",
        choices=peers.PEERS,
        help="also run this peer's version of the scenario (burst, latency) on a fresh database of the "
        "same server, and print pgbeat's figures as ratios to it (needs the bench extra)",
    )
    p.add_argument("--rounds", type=int, default=2, help="with --peer: rounds of pgbeat and the peer")
    p.add_argument("--json", metavar="FILE", help="write the raw figures here")
    p.add_argument("--logs", metavar="DIR", help="keep the pgbeat processes' logs here")
    return run_from_args(p.parse_args(argv), config or Config.from_env())


if __name__ == "__main__":
    sys.exit(main())
