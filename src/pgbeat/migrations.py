"""`pgbeat migrate`: bring a database to the schema this code defines.

Two kinds of SQL file (CONTRIBUTING.md, "Database code"):

* sql/migrations/NNNN_*.sql change what a database keeps: tables, columns,
  constraints, indexes, types. yoyo applies each once; a released one is never edited.
* sql/schema/NN_*.sql define every function, view and trigger, each once, in its
  current form. After the migrations, in one transaction, pgbeat drops its
  functions, views and triggers and runs these files, so the database holds
  exactly what they define, and writes the kind modules' declarations to
  pgbeat.kinds; the digest of both is recorded, and readiness reports a database
  whose functions or kinds are not the code's.

All of it runs under the migration lock (Rule 16): a session-level advisory lock on a
connection of its own, so replicas that start together migrate once, and a migrate
killed at any point (SIGKILL, out of memory, a lost node) leaves no lock behind:
PostgreSQL releases it with the session. yoyo's own lock is a committed row that a
killed process leaves in place; it is taken inside the advisory lock, where any row
found is a dead migrate's and is broken first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from yoyo import get_backend, read_migrations
from yoyo.backends.base import DatabaseBackend
from yoyo.migrations import MigrationList, get_migration_hash

from pgbeat import kinds, queries

SQL_DIR = Path(__file__).parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
SCHEMA_DIR = SQL_DIR / "schema"

BASELINE = "0001_baseline"
# The migrations pgbeat had before the v1 baseline squashed them. A database they
# made holds exactly the baseline's tables (tests/test_migrations.py proves it), so
# it is adopted: the baseline is recorded as applied and the schema files replace
# its functions. A database they made only in part is refused.
PRE_V1 = (
    "0001_schema",
    "0002_tasks",
    "0003_scheduling",
    "0004_workers",
    "0005_notify",
    "0006_views",
    "0007_api",
    "0008_plan_once",
    "0009_cheaper_calls",
    "0010_materialize_ahead",
    "0011_notify_near_slots",
    "0012_create_tasks",
)
# What readiness lists when the database's functions are not the schema files'.
SCHEMA_PENDING = "sql/schema"
# Every session of `pgbeat migrate` carries this name (pg_stat_activity shows it) and
# checks every second, even while a statement waits for a lock, that its client is
# still there: a session whose migrate was killed ends at once instead of waiting,
# with its locks, for whatever blocks it.
SESSION_NAME = "pgbeat migrate"
CLIENT_CHECK_MS = 1000

log = logging.getLogger("pgbeat.migrations")


class MigrationError(Exception):
    """The database cannot be brought to this code's schema; the message says why."""


def session_url(url: str) -> str:
    """url with the migrate sessions' name and client check (libpq's `application_name`
    and `options` parameters, which yoyo passes on to psycopg too)."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    params["application_name"] = SESSION_NAME
    check = f"-c client_connection_check_interval={CLIENT_CHECK_MS}"
    options = params.get("options", "")
    if check not in options:
        params["options"] = f"{options} {check}".strip()
    return urlunsplit(parts._replace(query=urlencode(params, quote_via=quote)))  # libpq: %20, not +


def yoyo_url(url: str) -> str:
    """yoyo picks its driver from the URL scheme: use psycopg 3."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        parts = parts._replace(scheme="postgresql+psycopg")
    return urlunsplit(parts)


@contextmanager
def migration_lock(url: str) -> Iterator[DatabaseBackend]:
    """Hold the migration lock (Rule 16) for the block: wait while another migrate holds
    it, then break a yoyo lock row a killed migrate left (none can be a live one's)."""
    with psycopg.connect(session_url(url), autocommit=True) as conn:
        if not conn.execute(queries.get("try_migration_lock")).fetchone()[0]:
            log.info("another pgbeat migrate is running; waiting", extra={"event": "migration_lock_wait"})
            conn.execute(queries.get("migration_lock"))
        backend = get_backend(yoyo_url(session_url(url)))
        try:
            if backend.execute(queries.get("yoyo_lock_holders")).fetchone()[0]:
                log.warning(
                    "breaking the yoyo lock a killed migrate left", extra={"event": "yoyo_lock_broken"}
                )
                backend.break_lock()
            with backend.lock():
                yield backend
        finally:
            backend.connection.close()
    # Leaving the block closed the session, which released the advisory lock.


def schema_files() -> list[Path]:
    """The schema files in the order they run (their names start with a number)."""
    return sorted(SCHEMA_DIR.glob("*.sql"))


def schema_digest() -> str:
    """What the schema step writes: the schema files and the kinds' declarations."""
    digest = hashlib.sha256()
    for path in schema_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps(kinds.declarations(), sort_keys=True).encode())
    return "pgbeat schema files sha256:" + digest.hexdigest()


def adopt_pre_v1(backend: DatabaseBackend, migrations: MigrationList) -> None:
    """Record the baseline as applied on a database the pre-v1 migrations made."""
    applied = set(backend.get_applied_migration_hashes())
    baseline = [m for m in migrations if m.id == BASELINE]
    if not applied or baseline[0].hash in applied:
        return
    old = [m for m in PRE_V1 if get_migration_hash(m) in applied]
    if len(old) == len(PRE_V1):
        backend.mark_migrations(baseline)
    elif old:
        raise MigrationError(
            f"this database was made by pgbeat's pre-release migrations up to {old[-1]}, not "
            f"through {PRE_V1[-1]}: apply those with the pgbeat version that has them, or "
            "migrate a new database"
        )


def apply_schema(url: str) -> None:
    """Replace pgbeat's functions, views and triggers with the schema files', in one transaction."""
    with psycopg.connect(url) as conn:  # one transaction, committed when the block ends
        kept = conn.execute(queries.get("schema_kept_routines")).fetchall()
        conn.execute(queries.get("schema_drop_objects"))
        for path in schema_files():
            conn.execute(path.read_text(encoding="utf-8"))
        stale = sorted(set(kept) & set(conn.execute(queries.get("schema_kept_routines")).fetchall()))
        if stale:
            raise MigrationError(
                f"no schema file defines {', '.join(r for r, _ in stale)}, which a table still uses: "
                "a migration must drop that use first"
            )
        try:
            conn.execute(queries.get("register_kinds"), [json.dumps(kinds.declarations())])
        except psycopg.errors.ForeignKeyViolation as exc:
            raise MigrationError(
                f"a kind no module declares any more is still used: {exc.diag.message_detail}"
            ) from None
        digest = sql.SQL(queries.get("schema_record_digest")).format(digest=sql.Literal(schema_digest()))
        conn.execute(digest)


def recorded_digest(url: str) -> str | None:
    """The digest of the schema files the database holds (None: none, or no schema)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(queries.get("schema_digest")).fetchone()
    return None if row is None else row[0]


def apply(url: str, reapply_schema: bool = False) -> list[str]:
    """Apply pending migrations, then the schema files, under the migration lock (safe
    when replicas start together, and after one was killed). The schema files run when
    a migration was applied or the database holds other files (or with reapply_schema,
    which also undoes changes made by hand): replacing the triggers locks the tables
    for a moment, which a restarting replica need not cause. Returns the ids of the
    migrations applied; applying twice changes nothing."""
    url = session_url(url)
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with migration_lock(url) as backend:
        adopt_pre_v1(backend, migrations)
        todo = backend.to_apply(migrations)
        backend.apply_migrations(todo)
        if todo or reapply_schema or recorded_digest(url) != schema_digest():
            apply_schema(url)
    return [m.id for m in todo]


def rollback(url: str, count: int | None = None) -> list[str]:
    """Roll back applied migrations, newest first (all of them unless count is given).
    Rolling back the baseline drops the pgbeat schema with everything in it; after a
    partial rollback, migrate with the code that matches the remaining migrations."""
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with migration_lock(url) as backend:
        todo = backend.to_rollback(migrations)
        if count is not None:
            todo = todo[:count]
        backend.rollback_migrations(todo)
    return [m.id for m in todo]


def pending(url: str) -> list[str]:
    """What `pgbeat migrate` would do (readiness: the schema is current when empty):
    the migrations not yet applied, and SCHEMA_PENDING when the database's functions
    are not those of the schema files."""
    backend = get_backend(yoyo_url(url))
    todo = [m.id for m in backend.to_apply(read_migrations(str(MIGRATIONS_DIR)))]
    if recorded_digest(url) != schema_digest():
        todo.append(SCHEMA_PENDING)
    return todo
