"""The Litestar app: a thin layer over the stored functions (validation and shaping
only), with API-key auth, per-key rate limiting, Prometheus metrics and OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import msgspec
import uvicorn
from litestar import Litestar, Request, Response, get
from litestar.connection import ASGIConnection
from litestar.datastructures import Headers, State
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)
from litestar.middleware.rate_limit import (
    DURATION_VALUES,
    CacheObject,
    RateLimitConfig,
    RateLimitMiddleware,
)
from litestar.openapi import OpenAPIConfig
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.stores.base import Store
from litestar.stores.memory import MemoryStore
from litestar.types import Message, Send
from prometheus_client import Gauge

import pgbeat
from pgbeat import db, migrations, queries
from pgbeat.api import dashboard
from pgbeat.api.creations import TaskCreations
from pgbeat.api.errors import EXCEPTION_HANDLERS
from pgbeat.api.models import Health, Readiness
from pgbeat.api.routes import RunController, TaskController, upcoming
from pgbeat.config import Config

log = logging.getLogger("pgbeat.api")

# Open to anyone: probes, scrapers and the API description.
OPEN_PATHS = ["^/health$", "^/ready$", "^/metrics", "^/schema"]
# The dashboard signs in with a form and keeps a session instead (pgbeat.api.dashboard).
KEYLESS_PATHS = [*OPEN_PATHS, "^/ui(/|$)"]
MAX_BODY_BYTES = 64 * 1024


# ---------------------------------------------------------------- auth and rate limit


def presented_key(headers: Headers) -> str | None:
    """The key in `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


def key_is_valid(presented: str, keys: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every configured key."""
    candidate = presented.encode()
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(candidate, key)
    return valid


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    def __init__(self, app, keys: tuple[str, ...], exclude: list[str]) -> None:
        super().__init__(app, exclude=exclude)
        self.keys = tuple(key.encode() for key in keys)

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        presented = presented_key(connection.headers)
        challenge = {"WWW-Authenticate": "Bearer"}
        if presented is None:
            raise NotAuthorizedException(
                "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", headers=challenge
            )
        if not key_is_valid(presented, self.keys):
            raise NotAuthorizedException("invalid API key", headers=challenge)
        return AuthenticationResult(user=None, auth=presented)


class WindowCount(int):
    """A window's request count standing in for Litestar's list of request timestamps,
    which Litestar only ever measures with len()."""

    def __len__(self) -> int:
        return int(self)


class CountingRateLimitMiddleware(RateLimitMiddleware):
    """Litestar's rate limiter (same fixed window, 429 and RateLimit-* headers) storing
    each window as [count, reset] instead of one timestamp per request, so a request
    costs the same at 600,000/min as at 6/min."""

    def __init__(self, app, config: RateLimitConfig) -> None:
        super().__init__(app, config)
        # The lock guards a read-check-write that never waits (the store below is in
        # memory): on one event loop nothing can interleave it. anyio's lock cost a
        # loop pass (or, fast, a running-loop lookup and a getpid) per request.
        self._lock = contextlib.nullcontext()

    async def retrieve_cached_history(self, key: str, store: Store) -> CacheObject:
        now = int(time.time())
        cached = await store.get(key)
        if cached:
            count, reset = msgspec.json.decode(cached)
            if reset > now:
                return CacheObject(history=WindowCount(count), reset=reset)  # type: ignore[arg-type]
        return CacheObject(history=WindowCount(0), reset=now + DURATION_VALUES[self.unit])  # type: ignore[arg-type]

    async def set_cached_history(self, key: str, cache_object: CacheObject, store: Store) -> None:
        cache_object.history = WindowCount(len(cache_object.history) + 1)  # type: ignore[assignment]
        window = msgspec.json.encode([len(cache_object.history), cache_object.reset])
        await store.set(key, window, expires_in=DURATION_VALUES[self.unit])

    def create_send_wrapper(self, send: Send, cache_object: CacheObject) -> Send:
        """The same RateLimit-* headers, appended to the response's raw headers: nothing
        else sets them, and setting each through MutableScopeHeaders scanned every header
        (a third of what the rate limiter cost per request)."""

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).extend(
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in self.create_response_headers(cache_object=cache_object).items()
                )
            await send(message)

        return send_wrapper


class WindowStore(MemoryStore):
    """Litestar's in-memory store without its lock: none of its operations waits, so
    on one event loop they cannot interleave (and the rate limiter uses it from one)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = contextlib.nullcontext()  # type: ignore[assignment]


def rate_limit_identity(keyed: bool) -> Callable[[Request], str]:
    """Who a request counts against: its API key (hashed) when keys are configured, else its address."""

    def identify(request: Request) -> str:
        key = presented_key(request.headers) if keyed else None
        if key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return "addr:" + (request.client.host if request.client else "unknown")

    return identify


# ---------------------------------------------------------------- health, readiness, metrics


class SchemaCheck:
    """Is the schema current? Asking yoyo opens a session, so a current answer is
    kept and a stale one re-asked at most every few seconds."""

    def __init__(self, url: str, recheck_after: float = 5.0) -> None:
        self.url = url
        self.recheck_after = recheck_after
        self.pending: list[str] | None = None
        self.checked_at = 0.0

    async def pending_migrations(self) -> list[str]:
        if self.pending != [] and time.monotonic() - self.checked_at > self.recheck_after:
            self.pending = await asyncio.to_thread(migrations.pending, self.url)
            self.checked_at = time.monotonic()
        return self.pending or []


@get("/health", tags=["operations"], summary="Liveness", cache=False)
async def health() -> Health:
    return Health("ok")


@get(
    "/ready",
    tags=["operations"],
    summary="Readiness: database reachable and schema current (503 otherwise)",
    cache=False,
)
async def ready(state: State) -> Response[Readiness]:
    try:
        await state.pool.fetchval(queries.get("ping"), timeout=2)
        pending = await state.schema_check.pending_migrations()
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return Response(Readiness("not ready", f"database unreachable: {exc}"), status_code=503)
    if pending:
        return Response(
            Readiness("not ready", "migrations pending (run pgbeat migrate)", pending), status_code=503
        )
    return Response(Readiness("ready"))


# Gauges read from the database at scrape time (pgbeat.metric_values), by metric name there.
DATABASE_GAUGES = {
    "tasks": Gauge("pgbeat_tasks", "Tasks by status", ["status"]),
    "runs_pending": Gauge("pgbeat_runs_pending", "Runs waiting for a worker", []),
    "runs_running": Gauge("pgbeat_runs_running", "Runs executing now", []),
    "runs_finished_recent": Gauge(
        "pgbeat_runs_finished_recent", "Runs finished in the last 5 minutes, by state", ["state"]
    ),
    "run_start_delay_seconds": Gauge(
        "pgbeat_run_start_delay_seconds",
        "Delay between a run falling due and starting, over runs finished in the last 5 minutes",
        ["quantile"],
    ),
    "daemons_live": Gauge(
        "pgbeat_daemons_live", "Schedulers and workers alive (holding their lock)", ["role"]
    ),
}
DATABASE_UP = Gauge("pgbeat_database_up", "1 when the api could read the database at the last scrape", [])


async def read_database_gauges(pool: asyncpg.Pool) -> None:
    try:
        rows = await pool.fetch(queries.get("metric_values"), timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        log.warning("metrics: database unreadable", extra={"event": "metrics_db_error", "error": str(exc)})
        DATABASE_UP.set(0)
        return
    DATABASE_UP.set(1)
    for row in rows:
        gauge = DATABASE_GAUGES.get(row["metric"])
        if gauge is not None:
            (gauge.labels(row["label"]) if row["label"] else gauge).set(row["value"])


class MetricsController(PrometheusController):
    """Litestar's Prometheus endpoint, with the scheduler's gauges refreshed from the database first."""

    path = "/metrics"

    @get(include_in_schema=False, cache=False)
    async def get(self, state: State) -> Response:  # type: ignore[override]
        await read_database_gauges(state.pool)
        return await PrometheusController.get.fn(self)


# ---------------------------------------------------------------- the app


def create_app(url: str, config: Config, pool_size: int = 16) -> Litestar:
    @contextlib.asynccontextmanager
    async def database(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = await db.create_pool(
            url,
            min_size=2,
            max_size=pool_size,
            server_settings={"timezone": "UTC", "application_name": "pgbeat-api"},
        )
        app.state.schema_check = SchemaCheck(url)
        app.state.creations = TaskCreations(app.state.pool)
        if not config.api_keys:
            log.warning(
                "PGBEAT_API_KEYS is not set: the API is open to anyone who can reach it",
                extra={"event": "api_open"},
            )
        try:
            yield
        finally:
            try:
                await asyncio.wait_for(app.state.pool.close(), 10)
            except TimeoutError:
                app.state.pool.terminate()

    middleware: list[DefineMiddleware] = [
        PrometheusConfig(app_name="pgbeat", prefix="pgbeat_api", group_path=True).middleware
    ]
    if config.api_keys:
        middleware.append(DefineMiddleware(ApiKeyMiddleware, keys=config.api_keys, exclude=KEYLESS_PATHS))
    if config.rate_limit_per_minute > 0:
        rate_limit = RateLimitConfig(
            rate_limit=("minute", config.rate_limit_per_minute),
            exclude=OPEN_PATHS,
            identifier_for_request=rate_limit_identity(bool(config.api_keys)),
            middleware_class=CountingRateLimitMiddleware,
        )
        middleware.append(rate_limit.middleware)

    return Litestar(
        route_handlers=[
            TaskController,
            RunController,
            upcoming,
            health,
            ready,
            MetricsController,
            *dashboard.route_handlers(config),
        ],
        lifespan=[database],
        middleware=middleware,
        stores={"rate_limit": WindowStore()},
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="pgbeat",
            version=pgbeat.__version__,
            description="A task scheduler whose every coordination rule lives in PostgreSQL.",
            path="/schema",
            render_plugins=[dashboard.api_docs()],
        ),
        template_config=dashboard.TEMPLATES,
        logging_config=None,  # pgbeat.logs configures logging
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the caller's `stop` event ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_api(url: str, config: Config, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve the API with uvicorn until `stop` is set, then drain and return."""
    server_config = uvicorn.Config(
        create_app(url, config),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = _Server(server_config)
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving
    if not server.started:
        raise SystemExit(f"pgbeat api: could not start on {host}:{port} (see the log above)")
    log.info("api stopped", extra={"event": "api_stopped"})


__all__ = ["create_app", "run_api"]
