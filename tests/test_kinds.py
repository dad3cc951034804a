"""The task kinds and worker.execute on their own: no database, HTTP targets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pgbeat import kinds, worker
from pgbeat.kinds import RunContext, RunFailed
from pgbeat.kinds import http as http_kind


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=http_kind.CLIENT_TIMEOUT) as session:
        yield session


@pytest.fixture
async def target() -> AsyncIterator[str]:
    """/status/<code> answers that status; /slow/<seconds> waits first."""

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="pgbeat test\n")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text="late\n")

    app = web.Application()
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/slow/{seconds}", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def context(http: Any = None, timeout: float = 10) -> RunContext:
    return RunContext(1, 1, 1, datetime.now(UTC), timeout, http)


def claimed(kind: str, params: dict[str, Any], timeout: float = 10) -> worker.ClaimedRun:
    now = datetime.now(UTC)
    return worker.ClaimedRun(1, 1, kind, params, timeout, now, 1, now)


def test_every_kind_module_is_registered():
    assert set(kinds.KINDS) == {"sleep", "counter", "http"}
    with pytest.raises(RunFailed, match="unknown kind 'nope'"):
        kinds.get("nope")


async def test_sleep_records_how_long_it_slept():
    result = await kinds.get("sleep")({"seconds": 0.2}, context())
    assert result["seconds"] == 0.2
    assert 0.19 <= result["slept_s"] < 1


async def test_counter_leaves_the_increment_to_the_database():
    assert await kinds.get("counter")({"step": 3}, context()) == {}
    started = time.monotonic()
    assert await kinds.get("counter")({"step": 3, "seconds": 0.2}, context()) == {}
    assert time.monotonic() - started >= 0.19  # its work takes `seconds`; the increment is still not its own


async def test_http_success_records_status_and_time(http, target):
    result = await kinds.get("http")({"url": f"{target}/status/200"}, context(http))
    assert result["status"] == 200 and result["method"] == "GET"
    assert result["response_ms"] > 0 and result["bytes"] == len("pgbeat test\n")


async def test_http_method_and_expected_status(http, target):
    params = {"url": f"{target}/status/201", "method": "post", "expect_status": 201}
    assert (await kinds.get("http")(params, context(http)))["method"] == "POST"
    with pytest.raises(RunFailed, match=r"HTTP 200 \(expected 204\)"):
        await kinds.get("http")({"url": f"{target}/status/200", "expect_status": 204}, context(http))


async def test_http_non_2xx_fails_with_the_status_recorded(http, target):
    with pytest.raises(RunFailed) as failed:
        await kinds.get("http")({"url": f"{target}/status/500"}, context(http))
    assert failed.value.error == "HTTP 500 (expected 2xx)"
    assert failed.value.result["status"] == 500
    assert (failed.value.result["error_class"], failed.value.result["retry"]) == ("http_5xx", True)


async def test_http_4xx_is_retried_only_when_the_task_asks(http, target):
    with pytest.raises(RunFailed) as failed:
        await kinds.get("http")({"url": f"{target}/status/404"}, context(http))
    assert (failed.value.result["error_class"], failed.value.result["retry"]) == ("http_4xx", False)
    with pytest.raises(RunFailed) as failed:
        await kinds.get("http")({"url": f"{target}/status/429", "retry_on_4xx": True}, context(http))
    assert (failed.value.result["error_class"], failed.value.result["retry"]) == ("http_4xx", True)


async def test_http_connection_refused_names_the_error_class(http):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RunFailed) as failed:
        await kinds.get("http")({"url": f"http://127.0.0.1:{port}/"}, context(http))
    assert failed.value.error.startswith("connect: ClientConnectorError")
    assert failed.value.result["error_class"] == "connect" and failed.value.result["retry"] is True
    assert "status" not in failed.value.result


async def test_http_dns_failure_names_the_error_class(http):
    with pytest.raises(RunFailed) as failed:
        await kinds.get("http")({"url": "http://pgbeat-test.invalid/"}, context(http))
    assert failed.value.error.startswith("dns: ClientConnectorDNSError")
    assert failed.value.result["error_class"] == "dns"


async def test_http_tls_failure_names_the_error_class(http, target):
    with pytest.raises(RunFailed) as failed:
        await kinds.get("http")({"url": target.replace("http://", "https://") + "/status/200"}, context(http))
    assert failed.value.error.startswith("tls: ClientConnectorSSLError")
    assert failed.value.result["error_class"] == "tls"


async def test_http_read_timeout_fails_with_the_error_class(target):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=0.2)) as http:
        with pytest.raises(RunFailed) as failed:
            await kinds.get("http")({"url": f"{target}/slow/2"}, context(http))
    assert failed.value.error == "timeout: SocketTimeoutError: Timeout on reading data from socket"
    assert failed.value.result["error_class"] == "timeout"


async def test_execute_records_each_outcome(http, target):
    ok = await worker.execute(claimed("sleep", {"seconds": 0}), http)
    assert (ok.state, ok.error) == ("succeeded", None)
    failed = await worker.execute(claimed("http", {"url": f"{target}/status/502"}), http)
    assert (failed.state, failed.result["status"]) == ("failed", 502)
    timed_out = await worker.execute(claimed("sleep", {"seconds": 5}, timeout=0.2), http)
    assert (timed_out.state, timed_out.error) == ("timed_out", "exceeded the task's timeout of 0.2s")
    assert 150 <= timed_out.duration_ms < 1000
    unknown = await worker.execute(claimed("nope", {}), http)
    assert unknown.state == "failed" and "unknown kind" in unknown.error


async def test_execute_a_crashing_kind_is_a_failed_run(monkeypatch, http):
    async def crash(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        raise ValueError("boom")

    monkeypatch.setitem(kinds.KINDS, "sleep", crash)
    outcome = await worker.execute(claimed("sleep", {}), http)
    assert (outcome.state, outcome.error) == ("failed", "ValueError: boom")


async def test_execute_lets_cancellation_through(http):
    task = asyncio.create_task(worker.execute(claimed("sleep", {"seconds": 5}), http))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
