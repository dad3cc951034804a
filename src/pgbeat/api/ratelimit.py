"""Rate limits: requests per API key (per client address on an open API), and failed
authentications per client address, each a fixed one-minute window counted in this
api process. A request over a limit is 429 with Retry-After and the RateLimit-*
headers; the probes, /metrics and /schema are never limited.

The client address is the connection's peer, unless that peer is one of the proxies
the operator names in PGBEAT_TRUSTED_PROXIES: then it is the nearest address in
X-Forwarded-For that is not such a proxy. (uvicorn's own proxy-header handling is
off: it trusts 127.0.0.1 by default, so any local client could pick its address.)
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import time
from collections.abc import Callable

from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.exceptions import TooManyRequestsException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from pgbeat.config import Network

WINDOW_SECONDS = 60.0
MAX_TRACKED = 100_000  # identities kept per limiter before expired windows are dropped


def _in(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def client_address(scope: Scope, trusted: tuple[Network, ...]) -> str:
    """Who sent the request: the peer, or, behind a trusted proxy, the nearest
    X-Forwarded-For address that is not itself a trusted proxy."""
    client = scope.get("client")
    peer = client[0] if client else "unknown"
    if not trusted or not _in(peer, trusted):
        return peer
    forwarded = Headers.from_scope(scope).getall("x-forwarded-for", [])
    hops = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a forged or garbled header: count the proxy's own peer
    return peer


class FixedWindows:
    """Hits per identity in fixed windows of WINDOW_SECONDS."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.windows: dict[str, list[float]] = {}  # identity -> [count, window end]

    def _window(self, identity: str) -> list[float]:
        now = self.clock()
        window = self.windows.get(identity)
        if window is None or window[1] <= now:
            if len(self.windows) >= MAX_TRACKED:
                self.windows = {k: w for k, w in self.windows.items() if w[1] > now}
            window = self.windows[identity] = [0, now + WINDOW_SECONDS]
        return window

    def hit(self, identity: str) -> tuple[bool, int, int]:
        """Count one hit: (allowed, remaining, seconds until the window resets)."""
        window = self._window(identity)
        reset = max(1, math.ceil(window[1] - self.clock()))
        if window[0] >= self.limit:
            return False, 0, reset
        window[0] += 1
        return True, int(self.limit - window[0]), reset

    def blocked_for(self, identity: str) -> int | None:
        """Seconds until identity may try again, if it is over the limit; else None."""
        window = self.windows.get(identity)
        if window is None or window[0] < self.limit:
            return None
        left = window[1] - self.clock()
        return max(1, math.ceil(left)) if left > 0 else None


def limit_headers(limit: int, remaining: int, reset: int) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(reset),
        "RateLimit-Policy": f"{limit};w={int(WINDOW_SECONDS)}",
    }


def too_many(
    detail: str, retry_after: int, headers: dict[str, str] | None = None
) -> TooManyRequestsException:
    return TooManyRequestsException(detail, headers={**(headers or {}), "Retry-After": str(retry_after)})


def presented_key(headers: Headers) -> str | None:
    """The key in `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


class RequestRateLimit(ASGIMiddleware):
    """`limit` requests a minute per API key (keys configured: only valid keys get
    this far) or per client address (open API)."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, limit: int, keyed: bool, trusted: tuple[Network, ...], exclude: list[str]) -> None:
        self.windows = FixedWindows(limit)
        self.keyed = keyed
        self.trusted = trusted
        open_paths = re.compile("|".join(exclude))
        self.should_bypass_for_scope = lambda scope: bool(open_paths.search(scope["path"]))

    def identity(self, scope: Scope) -> str:
        key = presented_key(Headers.from_scope(scope)) if self.keyed else None
        if key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return "addr:" + client_address(scope, self.trusted)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        allowed, remaining, reset = self.windows.hit(self.identity(scope))
        headers = limit_headers(self.windows.limit, remaining, reset)
        if not allowed:
            raise too_many("rate limit exceeded, retry later", reset, headers)
        raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *raw]
            await send(message)

        await next_app(scope, receive, send_with_headers)
