"""HTTP as clients expect it: JSON bodies only and no cross-site writes (the guard
below), CORS off unless origins are configured, compression on request, HEAD
wherever GET works, and an `Allow` header that lists every method of a path."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from litestar import Litestar
from litestar.config.compression import CompressionConfig
from litestar.config.cors import CORSConfig
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from pgbeat.api.errors import BadInput

# Methods that change something: their requests pass the guard first.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The bodies a browser sends to another site without asking it first (CORS "simple requests").
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
# Responses smaller than this are sent as they are: gzip would save nothing worth its CPU.
COMPRESS_MIN_BYTES = 1024
# Headers a browser app on an allowed origin may send, and may read from our answers.
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "Content-Type"]
CORS_EXPOSED_HEADERS = [
    "Location",
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
]
CORS_METHODS = ["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"]


def cors_config(origins: Sequence[str]) -> CORSConfig | None:
    """Litestar's CORS for the configured origins; None (no CORS headers at all, so
    browsers keep other origins out) when there are none."""
    if not origins:
        return None
    return CORSConfig(
        allow_origins=list(origins),
        allow_methods=CORS_METHODS,  # type: ignore[arg-type]
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_EXPOSED_HEADERS,
        allow_credentials=False,  # keys travel in headers, never in cookies
        max_age=600,
    )


def compression_config() -> CompressionConfig:
    return CompressionConfig(backend="gzip", minimum_size=COMPRESS_MIN_BYTES, gzip_compress_level=6)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """Refuses, before anything runs, a request that could change something and that a
    web page on another site could have sent without the browser asking first:

    * a body that is not `application/json` → 415 (and a form's Content-Type even
      without a body): forms and `text/plain` are the only bodies a browser sends to
      another site without asking it first;
    * an `Origin` that is neither this server nor one of the CORS origins → 403: a
      body-less cross-site `POST /tasks/7/trigger` carries one.

    Clients that are not browsers (curl, the CLI, generated clients) send no `Origin`.
    Paths under `exempt` post their own forms and guard them with their own CSRF token
    (the dashboard)."""

    def __init__(
        self, app: ASGIApp, allowed_origins: Sequence[str] = (), exempt: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in UNSAFE_METHODS
            and not scope["path"].startswith(self.exempt)
        ):
            self.check_body(scope)
            self.check_origin(scope)
        await self.app(scope, receive, send)

    @staticmethod
    def check_body(scope: Scope) -> None:
        content_type = _header(scope, b"content-type")
        length = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        has_body = chunked or (length or "0").strip() not in ("", "0")
        if content_type is None:
            if has_body:
                raise BadInput("Content-Type", "missing: send the body as application/json", 415)
            return
        media_type = content_type.partition(";")[0].strip().lower()
        # Without a body a client's default type (aiohttp's octet-stream) is harmless; a
        # form's is not, even empty.
        if media_type != "application/json" and (has_body or media_type in FORM_TYPES):
            raise BadInput(
                "Content-Type", f"{media_type or content_type!r} is not supported: send application/json", 415
            )

    def check_origin(self, scope: Scope) -> None:
        origin = _header(scope, b"origin")
        if origin is None or origin in self.allowed_origins or "*" in self.allowed_origins:
            return
        if _header(scope, b"sec-fetch-site") == "same-origin":
            return
        host = _header(scope, b"host")
        if host and origin != "null" and urlsplit(origin).netloc.lower() == host.lower():
            return
        raise BadInput(
            "Origin",
            f"{origin!r} may not change anything here: add it to PGBEAT_CORS_ORIGINS to allow it",
            403,
        )


class PgbeatApp(Litestar):
    """Litestar, plus HEAD wherever GET works (the GET handler answers; the body is
    dropped, its length kept) and an `Allow` header naming every method of the path
    (Litestar's OPTIONS answer names only those of the path's first handler)."""

    _allowed: dict[str, str] | None = None

    def allowed_methods(self, path_template: str) -> str | None:
        if self._allowed is None:
            allowed: dict[str, str] = {}
            for route in self.routes:
                if isinstance(route, HTTPRoute):
                    methods = set(route.methods) | ({"HEAD"} if "GET" in route.methods else set())
                    allowed[route.path_format] = ", ".join(sorted(methods))
            self._allowed = allowed
        return self._allowed.get(path_template)

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope["method"] = "GET"

        async def send_as_asked(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                given = [v for k, v in headers if k.lower() == b"allow"]
                if given:
                    # Routed (OPTIONS): the path's methods; not routed (405): Litestar's, plus HEAD.
                    allow = self.allowed_methods(scope.get("path_template", ""))
                    if allow is None:
                        methods = {m.strip() for m in given[0].decode().split(",")}
                        allow = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
                    message["headers"] = [
                        *((k, v) for k, v in headers if k.lower() != b"allow"),
                        (b"allow", allow.encode()),
                    ]
            elif head and message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await super().__call__(scope, receive, send_as_asked)
