"""http {"url", "method"?: "GET", "expect_status"?: 204, "retry_on_4xx"?: false}: request a
URL, record status, size and time.

Succeeds on a 2xx status (or exactly expect_status when given); any other status
fails the run with the status recorded. Every failure records its class in the
result's `error_class` (timeout, dns, connect, tls, network, http_4xx, http_5xx,
http_status, too_large, egress_denied, redirect, invalid_url) and whether a retry
could help in `retry`: network errors, timeouts and 5xx yes; a 4xx only when the
task asks (retry_on_4xx), a refused destination or an oversized body never.

Bounded and safe by default (pgbeat.egress): redirects are followed here, hop by
hop, each URL checked against the egress policy and each connection made to
addresses the policy allows; the body is read (decompressed) in chunks up to the
policy's max_bytes, so neither a gzip bomb nor a trickling server holds the loop,
and the task's timeout (the worker's) always holds. Credentials in the URL are
never recorded.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from yarl import URL

from pgbeat.egress import EgressDenied, EgressResolver, HttpPolicy, redact, redact_url
from pgbeat.kinds import Param, RunContext, RunFailed

PARAMS = {
    "url": Param("url", max_length=2048, default="https://httpbin.org/status/200"),
    "method": Param(
        "choice", choices=("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"), default="GET"
    ),
    "expect_status": Param("integer", minimum=100, maximum=599),
    "retry_on_4xx": Param("boolean"),
}
CHUNK = 64 * 1024
REDIRECTS = {301, 302, 303, 307, 308}

# aiohttp's own limits; the task's timeout bounds the whole run on top of them.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


def client_session(policy: HttpPolicy) -> aiohttp.ClientSession:
    """The worker's one session: every connection resolved through the egress policy."""
    connector = aiohttp.TCPConnector(resolver=EgressResolver(policy), limit=0)
    return aiohttp.ClientSession(
        connector=connector, timeout=CLIENT_TIMEOUT, headers={"User-Agent": "pgbeat"}, trust_env=False
    )


class Failure(Exception):
    def __init__(self, error_class: str, detail: str, retry: bool) -> None:
        super().__init__(detail)
        self.error_class, self.detail, self.retry = error_class, detail, retry


def classify(exc: BaseException) -> Failure:
    """The error class of a client error, and whether a retry could help."""
    detail = redact(f"{type(exc).__name__}: {exc}".rstrip(": "))
    if isinstance(exc, EgressDenied):
        return Failure("egress_denied", str(exc), False)
    if isinstance(exc, TimeoutError):
        return Failure("timeout", detail, True)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return Failure("dns", detail, True)
    if isinstance(exc, aiohttp.ClientSSLError):
        return Failure("tls", detail, True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Failure("connect", detail, True)
    if isinstance(exc, aiohttp.InvalidURL):
        return Failure("invalid_url", detail, False)
    return Failure("network", detail, True)


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> int:
    """Read the (decompressed) body in chunks, yielding to the loop between them;
    stop with too_large past max_bytes."""
    size = 0
    async for chunk in response.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise Failure("too_large", f"the response body exceeds {max_bytes} bytes", False)
        await asyncio.sleep(0)
    return size


def next_hop(response: aiohttp.ClientResponse, url: URL, method: str) -> tuple[URL, str]:
    """Where a redirect leads, and the method to use there (303, and 301/302 after a
    POST, become GET, as browsers do)."""
    location = response.headers.get("Location")
    if not location:
        raise Failure("redirect", f"HTTP {response.status} without a Location header", False)
    try:
        target = url.join(URL(location))
    except ValueError as exc:
        raise Failure("redirect", f"unreadable Location header: {exc}", False) from None
    if response.status == 303 or (response.status in (301, 302) and method == "POST"):
        method = "GET" if method != "HEAD" else method
    return target, method


async def run(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    policy = ctx.http_policy or HttpPolicy()
    url = str(params.get("url", PARAMS["url"].default))
    method = str(params.get("method", PARAMS["method"].default)).upper()
    expect = params.get("expect_status")
    retry_on_4xx = params.get("retry_on_4xx") is True
    started = time.monotonic()
    result: dict[str, Any] = {"url": redact_url(url), "method": method}

    def failed(failure: Failure) -> RunFailed:
        result["response_ms"] = round((time.monotonic() - started) * 1000, 3)
        result["error_class"] = failure.error_class
        result["retry"] = failure.retry
        if failure.error_class.startswith("http_"):  # "HTTP 503 (expected 2xx)" says it already
            return RunFailed(failure.detail, result)
        return RunFailed(f"{failure.error_class}: {failure.detail}", result)

    try:
        current = URL(url)
        for hop in range(policy.max_redirects + 1):
            refused = policy.url_refusal(str(current))
            if refused is not None:
                raise Failure("egress_denied", f"{redact_url(str(current))} {refused}", False)
            async with ctx.http.request(method, current, allow_redirects=False) as response:
                status = response.status
                if status in REDIRECTS and expect != status:
                    if hop == policy.max_redirects:
                        raise Failure("redirect", f"more than {policy.max_redirects} redirects", False)
                    current, method = next_hop(response, current, method)
                    result["redirects"] = hop + 1
                    continue
                size = await read_capped(response, policy.max_bytes)
                break
    except Failure as failure:
        raise failed(failure) from None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise failed(classify(exc)) from exc
    result.update(status=status, response_ms=round((time.monotonic() - started) * 1000, 3), bytes=size)
    if result.get("redirects"):
        result["final_url"] = redact_url(str(current))
    ok = status == expect if expect is not None else 200 <= status < 300
    if not ok:
        wanted = f"expected {expect}" if expect is not None else "expected 2xx"
        if 400 <= status < 500:
            error_class, retry = "http_4xx", retry_on_4xx
        elif status >= 500:
            error_class, retry = "http_5xx", True
        else:
            error_class, retry = "http_status", False
        raise failed(Failure(error_class, f"HTTP {status} ({wanted})", retry))
    return result
