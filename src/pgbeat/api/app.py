"""The Litestar app: a thin layer over the stored functions (validation and shaping
only), with API-key auth, per-key rate limiting, Prometheus metrics and OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import uvicorn
from litestar import Litestar, Request, Response, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
    DefineMiddleware,
)
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController, PrometheusMiddleware
from prometheus_client import REGISTRY, Gauge
from prometheus_client.exposition import choose_encoder

from pgbeat import db, migrations, queries
from pgbeat.api import dashboard, ratelimit
from pgbeat.api.creations import TaskCreations
from pgbeat.api.errors import EXCEPTION_HANDLERS, MiddlewareErrors
from pgbeat.api.http import PgbeatApp, RequestGuard, compression_config, cors_config
from pgbeat.api.models import Health, Readiness
from pgbeat.api.openapi import openapi_config, tidy
from pgbeat.api.ratelimit import presented_key
from pgbeat.api.routes import InputLimits, RunController, TaskController, answer_task, upcoming
from pgbeat.api.status import status
from pgbeat.config import Config

log = logging.getLogger("pgbeat.api")

# Open to anyone: probes, scrapers and the API description.
OPEN_PATHS = ["^/health$", "^/ready$", "^/metrics", "^/schema"]
# The dashboard signs in with a form and keeps a session instead (pgbeat.api.dashboard).
KEYLESS_PATHS = [*OPEN_PATHS, "^/ui(/|$)"]
DASHBOARD_PATHS = ("/ui/",)  # its forms carry their own CSRF token
OPEN_PREFIXES = ("/health", "/ready", "/metrics", "/schema")
MAX_BODY_BYTES = 64 * 1024


# ---------------------------------------------------------------- auth and rate limit


def key_is_valid(presented: str, keys: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every configured key."""
    candidate = presented.encode()
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(candidate, key)
    return valid


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """A valid key or 401; a client address whose failures reach `failures_per_minute`
    is refused (429, Retry-After) until its window ends, whatever key it sends, so
    keys cannot be guessed at speed."""

    def __init__(
        self,
        app,
        keys: tuple[str, ...],
        exclude: list[str],
        failures: ratelimit.FixedWindows,
        trusted: tuple[ratelimit.Network, ...],
    ) -> None:
        super().__init__(app, exclude=exclude)
        self.keys = tuple(key.encode() for key in keys)
        self.failures = failures
        self.trusted = trusted

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        address = ratelimit.client_address(connection.scope, self.trusted)
        blocked_for = self.failures.blocked_for(address)
        if blocked_for is not None:
            raise ratelimit.too_many("too many failed authentications from this address", blocked_for)
        presented = presented_key(connection.headers)
        challenge = {"WWW-Authenticate": "Bearer"}
        if presented is None or not key_is_valid(presented, self.keys):
            self.failures.hit(address)
            log.warning(
                "authentication failed",
                extra={"event": "auth_failed", "client": address, "path": connection.url.path},
            )
            if presented is None:
                raise NotAuthorizedException(
                    "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                    headers=challenge,
                )
            raise NotAuthorizedException("invalid API key", headers=challenge)
        return AuthenticationResult(user=None, auth=presented)


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


@get(
    "/health", tags=["operations"], operation_id="getHealth", summary="Liveness: 200 while the process serves"
)
async def health() -> Health:
    return Health("ok")


@get(
    "/ready",
    tags=["operations"],
    operation_id="getReadiness",
    summary="Readiness: database reachable and schema current (503 otherwise)",
    responses={
        503: ResponseSpec(
            Readiness,
            description="not ready: the database is unreachable or migrations are pending",
            generate_examples=False,
            examples=[
                Example(
                    summary="migrations pending",
                    value={
                        "status": "not ready",
                        "detail": "migrations pending (run pgbeat migrate)",
                        "pending_migrations": ["0013_example"],
                    },
                )
            ],
        )
    },
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


class InProgressByRoute:
    """The in-progress gauge without a status: Litestar labels it with the status every
    request starts with (200), so a request that ends 201 or 404 was shown as a 200 in
    flight. This drops that label and keeps method, path and app name."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.gauge = Gauge(
            "pgbeat_api_requests_in_progress",
            "Requests the API is answering now",
            [name for name in names if name != "status_code"],
            multiprocess_mode="livesum",
        )

    def labels(self, *values: str | int | float) -> Gauge:
        return self.gauge.labels(
            *(v for name, v in zip(self.names, values, strict=True) if name != "status_code")
        )


class RequestMetrics(PrometheusMiddleware):
    """Litestar's request metrics, with the in-progress gauge above."""

    in_progress: InProgressByRoute | None = None

    def requests_in_progress(self, labels: dict[str, str | int | float]) -> Gauge:  # type: ignore[override]
        if RequestMetrics.in_progress is None:
            RequestMetrics.in_progress = InProgressByRoute(list(labels))
        return RequestMetrics.in_progress  # type: ignore[return-value]


class MetricsController(PrometheusController):
    """Litestar's Prometheus endpoint, with the database's gauges refreshed first, in the
    text format or OpenMetrics as the scraper's Accept header asks."""

    path = "/metrics"

    @get(include_in_schema=False, cache=False)
    async def get(self, request: Request, state: State) -> Response:  # type: ignore[override]
        await read_database_gauges(state.pool)
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(REGISTRY), media_type=content_type)


# ---------------------------------------------------------------- the app


def create_app(url: str, config: Config, pool_size: int = 16) -> Litestar:
    @contextlib.asynccontextmanager
    async def database(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = await db.create_pool(
            url,
            min_size=2,
            max_size=pool_size,
            # No JIT: the API's statements are small, and a misestimated one (a view's
            # status over 100,000 tasks) spent a second compiling before running 10 ms.
            # pgbeat.min_interval: the stored functions enforce the same minimum as the API.
            server_settings={
                "timezone": "UTC",
                "application_name": "pgbeat-api",
                "jit": "off",
                "pgbeat.min_interval": repr(config.min_interval),
            },
        )
        app.state.schema_check = SchemaCheck(url)
        app.state.creations = TaskCreations(app.state.pool, shape=answer_task)
        app.state.input_limits = InputLimits.of(config)
        app.state.auth_failures = auth_failures
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
        PrometheusConfig(
            app_name="pgbeat", prefix="pgbeat_api", group_path=True, middleware_class=RequestMetrics
        ).middleware,
        DefineMiddleware(MiddlewareErrors),
        DefineMiddleware(RequestGuard, allowed_origins=config.cors_origins, exempt=DASHBOARD_PATHS),
    ]
    # Failed authentications per client address, shared by the API's keys and the dashboard's sign-in.
    auth_failures = ratelimit.FixedWindows(config.auth_failures_per_minute)
    if config.api_keys:
        middleware.append(
            DefineMiddleware(
                ApiKeyMiddleware,
                keys=config.api_keys,
                exclude=KEYLESS_PATHS,
                failures=auth_failures,
                trusted=config.trusted_proxies,
            )
        )
    if config.rate_limit_per_minute > 0:
        middleware.append(
            ratelimit.RequestRateLimit(
                config.rate_limit_per_minute, bool(config.api_keys), config.trusted_proxies, OPEN_PATHS
            )
        )

    app = PgbeatApp(
        route_handlers=[
            TaskController,
            RunController,
            upcoming,
            health,
            ready,
            MetricsController,
            status,
            *dashboard.route_handlers(config),
        ],
        lifespan=[database],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=MAX_BODY_BYTES,
        cors_config=cors_config(config.cors_origins),
        compression_config=compression_config(),
        openapi_config=openapi_config(keyed=bool(config.api_keys), render_plugins=[dashboard.api_docs()]),
        template_config=dashboard.TEMPLATES,
        logging_config=None,  # pgbeat.logs configures logging
    )
    tidy(app.openapi_schema, open_paths=OPEN_PREFIXES)
    return app


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
        proxy_headers=False,  # the app reads X-Forwarded-For from PGBEAT_TRUSTED_PROXIES only
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
