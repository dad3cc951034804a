"""The OpenAPI document, as exact as the server: every status a route answers with a
real example, security schemes, and a pass over what Litestar generates that removes
what no generator should see (one-element `oneOf`s, `null` in query parameters) and
adds what it cannot infer (`additionalProperties: false` where unknown fields are
refused, no security on the open paths)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.openapi.spec import (
    Components,
    Example,
    OpenAPI,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
    SecurityScheme,
)

import pgbeat
from pgbeat.api import models

BEARER, API_KEY = "bearerAuth", "apiKeyAuth"
SECURITY_SCHEMES = {
    BEARER: SecurityScheme(type="http", scheme="bearer", description="`Authorization: Bearer <key>`"),
    API_KEY: SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header"),
}

DESCRIPTION = """A task scheduler whose every coordination rule lives in PostgreSQL.

**Authentication.** A server started with `PGBEAT_API_KEYS` requires one of its keys on
every path but `/health`, `/ready`, `/metrics` and `/schema`, as `Authorization: Bearer
<key>` or `X-API-Key: <key>`; this document then lists both schemes as required. Started
without keys the API is open and no operation requires them.

**Requests.** A body must be `Content-Type: application/json` (415 otherwise); a write
from a web page of another origin is 403 unless `PGBEAT_CORS_ORIGINS` allows it.
Timestamps, in bodies and queries, are RFC 3339 with an offset (`Z` or `+02:00`).

**Errors** are `{"status_code", "detail", "field"}`: `detail` names the field and the
problem, `field` is the field alone."""

# One real answer per status: what a client of this API sees.
ERROR_EXAMPLES: dict[int, tuple[str, models.Error]] = {
    400: (
        "malformed request, wrong type, unknown field or bad query parameter (field named)",
        models.Error(400, "limit: Expected `int <= 500`", "limit"),
    ),
    401: (
        "missing or wrong API key (with `WWW-Authenticate: Bearer`)",
        models.Error(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"),
    ),
    403: (
        "a write from a web page of an origin PGBEAT_CORS_ORIGINS does not allow",
        models.Error(
            403,
            "Origin: 'https://elsewhere.example' may not change anything here: "
            "add it to PGBEAT_CORS_ORIGINS to allow it",
            "Origin",
        ),
    ),
    404: ("unknown or deleted task, unknown run", models.Error(404, "task 7 not found")),
    409: (
        "valid input that the task's current state forbids",
        models.Error(409, "task 7 is complete: nothing to resume"),
    ),
    413: ("body over 64 KiB", models.Error(413, "Request Entity Too Large")),
    415: (
        "a body that is not application/json",
        models.Error(
            415, "Content-Type: 'text/plain' is not supported: send application/json", "Content-Type"
        ),
    ),
    422: (
        "input the database refuses (field named)",
        models.Error(
            422,
            "schedule.cron: '61 * * * *' is not a valid cron expression: [61] is not acceptable",
            "schedule.cron",
        ),
    ),
    429: (
        "over the rate limit (with `RateLimit-*` and `Retry-After`)",
        models.Error(429, "Too Many Requests"),
    ),
    500: ("a server fault (logged)", models.Error(500, "internal error")),
    503: (
        "the database is unreachable or ended the session: retry",
        models.Error(503, "database unavailable, retry later"),
    ),
}

# What every database-backed route can answer, besides its own.
COMMON = (400, 401, 429, 500, 503)
# What every write can answer too (the request guard).
WRITES = (403, 415)


def errors(*codes: int, write: bool = False) -> dict[int, ResponseSpec]:
    """The Error responses of a route: the common ones, a write's, and `codes`."""
    wanted = sorted({*COMMON, *(WRITES if write else ()), *codes})
    return {
        code: ResponseSpec(
            models.Error,
            description=ERROR_EXAMPLES[code][0],
            generate_examples=False,
            examples=[Example(summary=str(code), value=msgspec.to_builtins(ERROR_EXAMPLES[code][1]))],
        )
        for code in wanted
    }


def openapi_config(keyed: bool, render_plugins: list[OpenAPIRenderPlugin]) -> OpenAPIConfig:
    return OpenAPIConfig(
        title="pgbeat",
        version=pgbeat.__version__,
        description=DESCRIPTION,
        path="/schema",
        render_plugins=render_plugins,
        create_examples=False,
        use_handler_docstrings=False,
        components=Components(security_schemes=dict(SECURITY_SCHEMES)),
        security=[{BEARER: []}, {API_KEY: []}] if keyed else None,
    )


# ---------------------------------------------------------------- the pass over Litestar's document

# Bodies whose unknown fields msgspec refuses (400): additionalProperties false.
CLOSED_BODIES = {
    name
    for name, cls in vars(models).items()
    if isinstance(cls, type)
    and issubclass(cls, msgspec.Struct)
    and cls.__struct_config__.forbid_unknown_fields
}


def _is_null(schema: Schema | Reference) -> bool:
    return isinstance(schema, Schema) and schema.type == OpenAPIType.NULL


def _without_null(schema: Schema) -> None:
    """A query string has no null: an optional parameter is one left out."""
    if schema.one_of:
        schema.one_of = [s for s in schema.one_of if not _is_null(s)]
    if isinstance(schema.type, list | tuple):
        types = [t for t in schema.type if t != OpenAPIType.NULL]
        schema.type = types[0] if len(types) == 1 else types
    if schema.enum:
        schema.enum = [v for v in schema.enum if v is not None]


def _merge_single_one_of(schema: Schema) -> Schema | Reference:
    """oneOf [X] is X: X's fields move up (the parent's description and bounds stay); a
    lone reference replaces the schema (what the parent adds is then a description)."""
    if not schema.one_of or len(schema.one_of) != 1:
        return schema
    (only,) = schema.one_of
    if isinstance(only, Reference):
        return only
    schema.one_of = None
    for field in dataclasses.fields(Schema):
        value = getattr(only, field.name)
        if value is not None and getattr(schema, field.name) is None:
            setattr(schema, field.name, value)
    return schema


def tidy_schema(schema: Any, in_query: bool = False) -> Any:
    """The schema cleaned (in place), or what replaces it."""
    if not isinstance(schema, Schema):
        return schema
    for name in ("one_of", "any_of", "all_of"):
        if children := getattr(schema, name):
            setattr(schema, name, [tidy_schema(child, in_query) for child in children])
    if schema.properties:
        schema.properties = {name: tidy_schema(child) for name, child in schema.properties.items()}
    schema.items = tidy_schema(schema.items)
    schema.additional_properties = tidy_schema(schema.additional_properties)
    if in_query:
        _without_null(schema)
    return _merge_single_one_of(schema)


def _operations(document: OpenAPI) -> list[tuple[str, Operation]]:
    found = []
    for path, item in (document.paths or {}).items():
        for method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            operation = getattr(item, method, None)
            if operation is not None:
                found.append((path, operation))
    return found


def tidy(document: OpenAPI, open_paths: tuple[str, ...]) -> OpenAPI:
    """Litestar's document, cleaned as described at the top (in place; returned)."""
    components = document.components
    for name, schema in ((components.schemas or {}) if components else {}).items():
        tidy_schema(schema)
        if name in CLOSED_BODIES:
            schema.additional_properties = False
    for path, operation in _operations(document):
        for parameter in operation.parameters or ():
            if not isinstance(parameter, Reference):
                parameter.schema = tidy_schema(parameter.schema, in_query=parameter.param_in == "query")
        for response in (operation.responses or {}).values():
            for media in (getattr(response, "content", None) or {}).values():
                media.schema = tidy_schema(media.schema)
        if operation.request_body is not None and not isinstance(operation.request_body, Reference):
            for media in operation.request_body.content.values():
                media.schema = tidy_schema(media.schema)
        if document.security and path.startswith(open_paths):
            operation.security = []  # probes, scrapers and this document need no key
    return document
