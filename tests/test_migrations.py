"""`pgbeat migrate`: the database holds exactly what the schema files define, however it
was made (from scratch, again, after a rollback, or by the pre-v1 migrations), and
migrating twice changes nothing. Databases are compared through their catalog
(tests/catalog.py): functions with their settings and source, columns with types and
defaults, constraints, indexes, sequences, views and triggers."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from catalog import catalog, defined_in_database, defined_in_schema_files, diff
from yoyo import get_backend, read_migrations

from pgbeat import kinds, migrations

PRE_V1_DIR = Path(__file__).parent / "fixtures" / "pre_v1_migrations"


@pytest.fixture
def empty_db(pg_server) -> Iterator[str]:
    """A new database with nothing in it; dropped afterwards."""
    name = f"pgbeat_empty_{uuid.uuid4().hex[:12]}"
    admin = pg_server.url(pg_server.maintenance_dbname)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_server.url(name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def apply_pre_v1(url: str, upto: str | None = None) -> None:
    """Build a database as pgbeat's migrations did before the v1 baseline (up to `upto`)."""
    backend = get_backend(migrations.yoyo_url(url))
    old = read_migrations(str(PRE_V1_DIR))
    if upto is not None:
        old = old.__class__([m for m in old if m.id <= upto])
    with backend.lock():
        backend.apply_migrations(backend.to_apply(old))


def execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def test_the_database_holds_what_the_schema_files_define_each_once(db_url):
    in_files = defined_in_schema_files()
    repeated = [(kind, name) for (kind, name), n in Counter((k, n) for k, n, _ in in_files).items() if n > 1]
    assert repeated == [], "each function, view and trigger is defined in exactly one place"
    assert sorted({(kind, name) for kind, name, _ in in_files}) == defined_in_database(db_url)
    # Overloads would make one name two functions: there are none.
    assert len(defined_in_database(db_url)) == len(in_files)


# The migrations after the frozen baseline, in order.
AFTER_BASELINE = ["0002_task_errors"]


def test_migrating_twice_changes_nothing(db_url):
    before = catalog(db_url)
    assert migrations.pending(db_url) == []
    assert migrations.apply(db_url) == []
    assert diff(catalog(db_url), before) == []
    assert migrations.pending(db_url) == []


def numbered_migrations() -> list[str]:
    return sorted(
        p.name.removesuffix(".sql")
        for p in migrations.MIGRATIONS_DIR.glob("*.sql")
        if ".rollback" not in p.name
    )


def test_rollback_then_migrate_rebuilds_the_same_schema(db_url):
    before = catalog(db_url)
    assert migrations.rollback(db_url) == numbered_migrations()[::-1]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT to_regnamespace('pgbeat')").fetchone() == (None,)
    assert migrations.pending(db_url) == [*numbered_migrations(), migrations.SCHEMA_PENDING]
    assert migrations.apply(db_url) == numbered_migrations()
    assert diff(catalog(db_url), before) == []


def test_migrate_puts_back_what_the_files_define_and_drops_the_rest(db_url):
    """Whatever was changed by hand (a function's body or settings, a view, a trigger)
    or left behind (a function, view or trigger no file defines any more) is gone."""
    before = catalog(db_url)
    execute(
        db_url,
        "CREATE FUNCTION pgbeat.retired(integer) RETURNS integer LANGUAGE sql AS $$ SELECT $1 $$",
        "CREATE VIEW pgbeat.retired_view AS SELECT id FROM pgbeat.tasks",
        "CREATE TRIGGER retired_trigger AFTER DELETE ON pgbeat.tasks FOR EACH STATEMENT"
        " EXECUTE FUNCTION pgbeat.notify_workers()",
        "CREATE OR REPLACE FUNCTION pgbeat.next_due_at() RETURNS timestamptz"
        " LANGUAGE sql AS $$ SELECT now() $$",
        "ALTER FUNCTION pgbeat.claim_runs(integer, integer) RESET ALL",
        "DROP VIEW pgbeat.live_daemons",
        "CREATE VIEW pgbeat.live_daemons AS SELECT * FROM pgbeat.daemons",
    )
    changed = catalog(db_url)
    assert diff(changed, before) != []
    # A change by hand leaves the recorded digest alone: a plain migrate has nothing to do...
    assert migrations.pending(db_url) == []
    assert migrations.apply(db_url) == []
    assert diff(catalog(db_url), changed) == []
    # ...and migrate --reapply-schema undoes it.
    migrations.apply(db_url, reapply_schema=True)
    assert diff(catalog(db_url), before) == []


def test_schema_files_the_database_does_not_hold_are_pending_and_applied(db_url):
    """New code with changed schema files (and no new migration): readiness says so,
    and migrate applies them."""
    before = catalog(db_url)
    execute(
        db_url,
        "COMMENT ON SCHEMA pgbeat IS 'pgbeat schema files sha256:older'",
        "CREATE OR REPLACE FUNCTION pgbeat.next_due_at() RETURNS timestamptz"
        " LANGUAGE sql AS $$ SELECT now() $$",
    )
    assert migrations.pending(db_url) == [migrations.SCHEMA_PENDING]
    assert migrations.apply(db_url) == []
    assert migrations.pending(db_url) == []
    assert diff(catalog(db_url), before) == []


def test_a_function_a_table_uses_is_kept_and_must_stay_defined(db_url):
    """A function in a CHECK constraint cannot be dropped with the others: migrate keeps
    it, and refuses (writing nothing) when no schema file defines it any more."""
    execute(
        db_url,
        "CREATE FUNCTION pgbeat.short(text) RETURNS boolean LANGUAGE sql IMMUTABLE"
        " AS $$ SELECT length($1) < 9 $$",
        "ALTER TABLE pgbeat.counters ADD CONSTRAINT counters_short CHECK (pgbeat.short(name))",
    )
    before = catalog(db_url)
    with pytest.raises(migrations.MigrationError, match=r"no schema file defines pgbeat\.short\(text\)"):
        migrations.apply(db_url, reapply_schema=True)
    assert diff(catalog(db_url), before) == []


def test_a_database_made_by_the_pre_v1_migrations_is_adopted(db_url, empty_db):
    apply_pre_v1(empty_db)
    assert migrations.pending(empty_db) == [*numbered_migrations(), migrations.SCHEMA_PENDING]
    assert migrations.apply(empty_db) == numbered_migrations()[1:]  # the baseline is recorded, not run
    assert migrations.pending(empty_db) == []
    # Its tables were the baseline's, then the later migrations ran, and its
    # functions are now the schema files': the same catalog as a new database's.
    assert diff(catalog(empty_db), catalog(db_url)) == []


def test_a_database_made_by_part_of_the_pre_v1_migrations_is_refused(empty_db):
    apply_pre_v1(empty_db, upto="0007_api")
    before = catalog(empty_db)
    with pytest.raises(migrations.MigrationError, match="pre-release migrations up to 0007_api"):
        migrations.apply(empty_db)
    assert diff(catalog(empty_db), before) == []


def test_pgbeat_kinds_holds_what_the_kind_modules_declare(db_url):
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT name, params, counts FROM pgbeat.kinds ORDER BY name").fetchall()
    assert [{"name": n, "params": p, "counts": c} for n, p, c in rows] == kinds.declarations()


def test_a_kind_no_module_declares_is_deleted_unless_tasks_use_it(db_url):
    execute(db_url, "INSERT INTO pgbeat.kinds (name) VALUES ('retired')")
    migrations.apply(db_url, reapply_schema=True)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgbeat.kinds WHERE name = 'retired'").fetchone() == (0,)
    execute(
        db_url,
        "INSERT INTO pgbeat.kinds (name) VALUES ('retired')",
        """SELECT pgbeat.create_task('{"kind": "retired", "schedule": {"every": 60}}')""",
    )
    before = catalog(db_url)
    with pytest.raises(migrations.MigrationError, match="retired"):
        migrations.apply(db_url, reapply_schema=True)
    assert diff(catalog(db_url), before) == []
