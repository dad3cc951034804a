"""http {"url", "method"?: "GET", "expect_status"?: 204}: request a URL, record status and time.

Succeeds on a 2xx status (or exactly expect_status when given); any other status
fails the run with the status recorded. Network failures (timeouts, DNS,
refused connections, TLS) fail it with the error's class named. The request uses
the worker's one aiohttp session (ctx.http); the task's timeout bounds the whole run.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from pgbeat.kinds import RunContext, RunFailed

DEFAULT_URL = "https://httpbin.org/status/200"


async def run(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    url = params.get("url", DEFAULT_URL)
    method = str(params.get("method", "GET")).upper()
    expect = params.get("expect_status")
    started = time.monotonic()
    result: dict[str, Any] = {"url": url, "method": method}
    try:
        async with ctx.http.request(method, url, allow_redirects=True) as response:
            size = 0
            async for chunk in response.content.iter_chunked(65536):
                size += len(chunk)
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        result["response_ms"] = round((time.monotonic() - started) * 1000, 3)
        raise RunFailed(f"{type(exc).__name__}: {exc}".rstrip(": "), result) from exc
    result.update(status=status, response_ms=round((time.monotonic() - started) * 1000, 3), bytes=size)
    ok = status == expect if expect is not None else 200 <= status < 300
    if not ok:
        wanted = f"expected {expect}" if expect is not None else "expected 2xx"
        raise RunFailed(f"HTTP {status} ({wanted})", result)
    return result
