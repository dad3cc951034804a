"""RULES.md's invariants as SQL (invariants.sql), run by the chaos checker and by the tests.

A check is: `setup` (the session's scope and observation tables), the runs' ends
the workers observed (from their logs: a run whose row was abandoned while its
worker kept executing it is open until that worker stopped it), then each
`rule_N_...` entry, which returns its rule's violations. The chaos run and the
tests call the same `check`, with a Record of what the run did to the fleet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from pgbeat import limits, migrations

INVARIANTS_FILE = Path(__file__).with_name("invariants.sql")
_ENTRY = re.compile(r"^-- name: ([a-z0-9_]+)\n-- (.+)\n", re.MULTILINE)

# Bounds the checker holds a run to (SOLUTION.md's failure model states them).
LATENESS_P99_BOUND = 1.0  # s: p99 start delay outside fault windows
LATENESS_MAX_BOUND = 5.0  # s: no single start delay outside fault windows beyond this
RECOVERY_MARGIN = 5.0  # s: a fault window extends this far past the recovery it waits for
SCHEDULE_TOLERANCE = 5.0  # s: how far behind the load stop a task's next slot may be
COUNT_CAP = 2**31 - 1  # Rule 18: counts saturate here


def _parse(text: str) -> dict[str, tuple[str, str]]:
    parts = _ENTRY.split(text)
    entries: dict[str, tuple[str, str]] = {}
    for name, description, sql in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        entries[name] = (description.strip(), sql.strip())
    return entries


STATEMENTS: dict[str, tuple[str, str]] = _parse(INVARIANTS_FILE.read_text(encoding="utf-8"))
# Each rule's invariant: name -> (what must hold, the query returning its violations).
INVARIANTS: dict[str, tuple[str, str]] = {k: v for k, v in STATEMENTS.items() if k.startswith("rule_")}


def rule_of(name: str) -> int:
    """The RULES.md number an invariant checks (rule_2_no_overlap -> 2)."""
    return int(name.split("_")[1])


@dataclass
class Record:
    """What the run did that the database does not know: the faults it injected."""

    since: datetime  # tasks created from here on are checked
    load_stopped_at: datetime  # the schedulers were stopped here
    killed_daemon_ids: list[int] = field(default_factory=list)  # kill -9, or sessions ended by a restart
    fault_windows: list[tuple[datetime, datetime]] = field(default_factory=list)  # fault to recovery
    resumes: list[tuple[int, datetime]] = field(default_factory=list)  # (task, its resume's transaction time)
    sigterms: list[tuple[int, datetime]] = field(default_factory=list)  # (daemon id, when its process got it)
    shutdown_grace: float = 0.0  # s: the workers' PGBEAT_SHUTDOWN_GRACE
    touched_tasks: list[int] = field(default_factory=list)  # tasks whose schedule a fault rewrote
    observed_ends: dict[int, datetime] = field(default_factory=dict)  # run id -> when its worker stopped it
    died_with: dict[int, datetime] = field(default_factory=dict)  # run id -> when its worker, which never
    # logged its end, was killed (it ended then, unless its worker had recorded it: the log line can be lost)
    refused_names: list[str] = field(default_factory=list)  # names only refused requests used (Rule 10)
    retention_days: float = 30.0  # the daemons' PGBEAT_RETENTION_DAYS (Rule 13)
    dead_daemons: list[int] = field(default_factory=list)  # daemon rows left dead before the load (Rule 13)
    migrate_failures: list[str] = field(default_factory=list)  # migrates that failed, not killed (Rule 16)
    poison_tasks: list[int] = field(default_factory=list)  # tasks given poison rows in psql (Rule 17)
    poison_at: datetime | None = None  # when the poison was written (None: since)
    saturated_tasks: list[int] = field(default_factory=list)  # tasks made to fire past 2^31 - 1 (Rule 18)
    min_interval: float = limits.MIN_INTERVAL_SECONDS  # s: the shortest `every` the run allowed (Rule 18)

    def params(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "load_stopped_at": self.load_stopped_at,
            "killed": self.killed_daemon_ids,
            "window_starts": [w[0] for w in self.fault_windows],
            "window_ends": [w[1] for w in self.fault_windows],
            "resumed_tasks": [r[0] for r in self.resumes],
            "resumed_ats": [r[1] for r in self.resumes],
            "sigterm_daemons": [s[0] for s in self.sigterms],
            "sigterm_ats": [s[1] for s in self.sigterms],
            "grace": self.shutdown_grace,
            "touched": self.touched_tasks,
            "margin": RECOVERY_MARGIN,
            "tolerance": SCHEDULE_TOLERANCE,
            "p99_bound": LATENESS_P99_BOUND,
            "max_bound": LATENESS_MAX_BOUND,
            "refused_names": self.refused_names,
            "retention_days": self.retention_days,
            "dead_daemons": self.dead_daemons,
            "migrate_failures": self.migrate_failures,
            "migration_ids": migration_ids(),
            "schema_digest": migrations.schema_digest(),
            "poison": self.poison_tasks,
            "poison_from": self.poison_at or self.since,
            "saturated": self.saturated_tasks,
            "min_interval": self.min_interval,
        }


def migration_ids() -> list[str]:
    """The ids of the migrations this code ships (Rule 16: all applied, each once)."""
    from yoyo import read_migrations

    return [m.id for m in read_migrations(str(migrations.MIGRATIONS_DIR))]


def prepare(conn: psycopg.Connection, record: Record) -> None:
    """The session's scope and the workers' observed ends, for the queries that follow."""
    conn.execute(STATEMENTS["setup"][1])
    conn.execute(STATEMENTS["set_scope"][1], {"since": record.since})
    with conn.cursor() as cur:
        cur.executemany(
            STATEMENTS["observe_end"][1],
            [{"run_id": run_id, "ended_at": at, "died": False} for run_id, at in record.observed_ends.items()]
            + [{"run_id": run_id, "ended_at": at, "died": True} for run_id, at in record.died_with.items()],
        )


def check(conn: psycopg.Connection, record: Record) -> dict[str, list[str]]:
    """Run every invariant; returns each one's violations (empty: its rule held)."""
    prepare(conn, record)
    params = record.params()
    return {name: [row[-1] for row in conn.execute(sql, params)] for name, (_, sql) in INVARIANTS.items()}


def lateness_stats(conn: psycopg.Connection, record: Record) -> tuple[int, float, float, float]:
    """(runs, p50, p99, max) start delay in seconds outside the fault windows."""
    prepare(conn, record)
    n, p50, p99, worst = conn.execute(STATEMENTS["lateness_stats"][1], record.params()).fetchone()
    return n, p50 or 0.0, p99 or 0.0, worst or 0.0


def observed_ends(
    log_lines: Iterable[str], died_at: datetime | None
) -> tuple[dict[int, datetime], dict[int, datetime]]:
    """When a worker stopped executing each run it started, from its JSON log: the run's
    end as it observed it (`ended_at` of run_finished, runs_cancelled and runs_unrecorded); and, apart,
    the runs it started but never logged an end for, with the moment it was killed (if
    it was: a killed worker's last lines may be lost, so these ended then at the latest)."""
    started: set[int] = set()
    ended: dict[int, datetime] = {}
    for line in log_lines:
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # a line cut short by kill -9
        event = doc.get("event")
        if event == "run_started":
            started.add(doc["run_id"])
        elif event in ("run_finished", "runs_cancelled", "runs_unrecorded") and "ended_at" in doc:
            at = datetime.fromisoformat(doc["ended_at"])
            for run_id in doc.get("run_ids") or [doc["run_id"]]:
                ended[run_id] = at
    died = dict.fromkeys(started - ended.keys(), died_at) if died_at is not None else {}
    return ended, died
