"""Errors as JSON {"status_code", "detail", "field"}: the stored functions' SQLSTATEs and
Litestar's validation errors mapped to 4xx, so bad input never becomes a 500."""

from __future__ import annotations

import logging
import re

import asyncpg
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ASGIApp, Receive, Scope, Send

from pgbeat.api.models import Error

log = logging.getLogger("pgbeat.api")

# The stored functions' contract (sql/schema/10_input.sql; Rule 10).
STATUS_BY_SQLSTATE = {
    "22023": 422,  # invalid_parameter_value: "field: problem", COLUMN = field
    "P0002": 404,  # no_data_found: unknown or deleted task
    "55000": 409,  # object_not_in_prerequisite_state: valid input the task's state forbids
    "23505": 409,  # unique_violation
}


class BadInput(Exception):
    """Input the API itself refuses: a duration or cron expression it cannot read (422),
    a malformed query parameter (400)."""

    def __init__(self, field: str, problem: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.status_code = status_code


def error_response(status_code: int, detail: str, field: str | None = None, headers=None) -> Response:
    return Response(
        Error(status_code, detail, field), status_code=status_code, headers=headers, media_type=MediaType.JSON
    )


def bad_input_handler(_: Request, exc: BadInput) -> Response:
    return error_response(exc.status_code, str(exc), exc.field)


def postgres_error_handler(request: Request, exc: asyncpg.PostgresError) -> Response:
    sqlstate = exc.sqlstate or ""
    status = STATUS_BY_SQLSTATE.get(sqlstate)
    if status is None and sqlstate[:2] in ("22", "23"):
        status = 422  # any other data exception or constraint violation is the input's fault
    if status is None:
        # Connection, resources, shutdown, or a read-only server (a primary being demoted
        # in a failover): nothing was written, retry later.
        if sqlstate[:2] in ("08", "53", "57") or sqlstate == "25006":
            log.warning("database unavailable", extra={"event": "db_unavailable", "sqlstate": sqlstate})
            return error_response(503, "database unavailable, retry later")
        log.error("database error", exc_info=exc, extra={"event": "db_error", "path": request.url.path})
        return error_response(500, "internal error")
    return error_response(status, exc.message or str(exc), getattr(exc, "column_name", None))


def interface_error_handler(request: Request, exc: asyncpg.InterfaceError) -> Response:
    """asyncpg's client-side errors; its ValueError kind is a value it cannot send as the
    parameter's type (e.g. out of range): the input's fault."""
    if isinstance(exc, ValueError):
        return error_response(422, str(exc))
    log.error("database client error", exc_info=exc, extra={"event": "db_error", "path": request.url.path})
    return error_response(500, "internal error")


def connection_error_handler(_: Request, exc: Exception) -> Response:
    """The database refused or dropped the connection (a pooled session a restart ended
    fails its next query with asyncpg's InternalClientError)."""
    log.warning("database unavailable", extra={"event": "db_unavailable", "error": str(exc)})
    return error_response(503, "database unavailable, retry later")


def invalid_field(key: str | None, message: str) -> str | None:
    """The field a Litestar/msgspec validation error is about: its key, less the body's
    name, plus the field the message names ("Object missing required field `kind`")."""
    path = [part for part in (key or "").split(".") if part and part != "data"]
    named = re.search(r"field `([^`]+)`", message)
    if named:
        path.append(named.group(1))
    return ".".join(path) or None


def validation_error_handler(_: Request, exc: ValidationException) -> Response:
    """Litestar's (msgspec's) validation errors, with the first offending field named."""
    field, problem = None, exc.detail
    if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict):
        problem = exc.extra[0].get("message") or problem
        field = invalid_field(exc.extra[0].get("key"), problem)
    return error_response(400, f"{field}: {problem}" if field else problem, field)


def http_error_handler(_: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, exc.detail, headers=exc.headers)


def nesting_error_handler(_: Request, exc: RecursionError) -> Response:
    """msgspec refuses JSON nested deeper than it can decode."""
    return error_response(400, "body: JSON nests too deeply", "body")


def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"event": "api_error", "path": request.url.path})
    return error_response(500, "internal error")


class MiddlewareErrors:
    """Answers the refusals of the middleware inside it (401, 403, 415, 429) as the route
    handlers' errors are answered, so that the Prometheus middleware outside it sees and
    counts the real status (an exception passing through it would be counted as 200)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except (HTTPException, BadInput) as exc:
            if scope["type"] != "http":
                raise
            request: Request = Request(scope, receive)
            if isinstance(exc, BadInput):
                response = bad_input_handler(request, exc)
            else:
                response = http_error_handler(request, exc)
            await response.to_asgi_response(None, request)(scope, receive, send)


EXCEPTION_HANDLERS = {
    Exception: internal_error_handler,
    BadInput: bad_input_handler,
    RecursionError: nesting_error_handler,
    asyncpg.PostgresError: postgres_error_handler,
    asyncpg.InterfaceError: interface_error_handler,
    OSError: connection_error_handler,
    asyncpg.ConnectionDoesNotExistError: connection_error_handler,
    asyncpg.InternalClientError: connection_error_handler,
    ValidationException: validation_error_handler,
    HTTPException: http_error_handler,
}
