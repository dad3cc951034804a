"""Every scheduler and worker serves /health and /metrics on a port of its own, from
its own event loop: a real worker process, probed while it runs tasks, while it is
stopped (SIGSTOP: a loop that cannot run), and through promtool."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
from pathlib import Path

import fleetsupport as fs
import pytest
from sqlsupport import query, wait_for

from pgbeat_lab.fleet import free_port

pytestmark = pytest.mark.slow  # real daemons


def probe(port: int, path: str, timeout: float = 5.0, **headers: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def promtool() -> str | None:
    """promtool from PATH, else from Debian's prometheus package, extracted once into a cache."""
    if found := shutil.which("promtool"):
        return found
    cache = Path(os.environ.get("PGBEAT_TOOL_CACHE", Path.home() / ".cache" / "pgbeat-tools"))
    binary = cache / "usr" / "bin" / "promtool"
    if binary.exists():
        return str(binary)
    cache.mkdir(parents=True, exist_ok=True)
    download = subprocess.run(
        ["apt-get", "download", "prometheus"], cwd=cache, capture_output=True, timeout=300
    )
    debs = sorted(cache.glob("prometheus_*.deb"))
    if download.returncode != 0 and not debs:
        return None
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(cache)], check=True, timeout=120)
    return str(binary) if binary.exists() else None


def test_a_worker_serves_health_and_metrics_and_a_stopped_loop_fails_the_probe(fleet, db_url):
    port = free_port()
    (worker,) = fs.start(fleet, "worker", 1, "--metrics-port", str(port))
    (scheduler,) = fs.start(fleet, "scheduler", 1, env={"PGBEAT_METRICS_PORT": str(free_port())})
    task = fs.create_task(db_url, {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": 1}})
    wait_for("two runs to succeed", lambda: len(fs.succeeded_runs(db_url, task["id"])) >= 2)

    status, _, body = probe(port, "/health")
    assert (status, body) == (200, b'{"status":"ok"}')

    def counted() -> bool:
        text = probe(port, "/metrics")[2].decode()
        return 'pgbeat_runs_finished_total{kind="sleep",state="succeeded"}' in text

    wait_for("the finished runs to be counted", counted)
    status, headers, body = probe(port, "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for series in (
        'pgbeat_runs_claimed_total{kind="sleep"}',
        'pgbeat_run_lateness_seconds_bucket{kind="sleep",le="0.001"}',
        'pgbeat_run_duration_seconds_count{kind="sleep"}',
        "pgbeat_claim_errors_total 0.0",
        "# TYPE pgbeat_run_lateness_seconds histogram",
    ):
        assert series in text, series
    # No value where nothing happened: a kind that never ran has no series.
    assert 'kind="http"' not in text
    status, headers, body = probe(port, "/metrics", Accept="application/openmetrics-text; version=1.0.0")
    assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert probe(port, "/nothing")[0] == 404

    tool = promtool()
    if tool is None:
        pytest.skip("promtool: not installed and Debian's prometheus package could not be downloaded")
    for source in (text, probe(port, "/metrics")[2].decode()):
        checked = subprocess.run([tool, "check", "metrics"], input=source, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr

    # The API's /metrics too, in both formats (the database's gauges, request metrics).
    _, base = fleet.start_api()
    api_port = int(base.rsplit(":", 1)[1])
    for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
        status, headers, body = probe(api_port, "/metrics", Accept=accept)
        assert status == 200 and headers["content-type"].split(";")[0] == accept.split(";")[0], headers
        checked = subprocess.run(
            [tool, "check", "metrics"], input=body.decode(), capture_output=True, text=True
        )
        assert checked.returncode == 0 or accept != "text/plain", checked.stdout + checked.stderr
    assert b"pgbeat_run_start_delay_seconds" not in body  # a quantile gauge of made-up zeros, gone

    # A loop that cannot run cannot answer: the liveness probe times out...
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        with pytest.raises(OSError):  # socket.timeout is an OSError
            probe(port, "/health", timeout=2)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    # ...and answers again once it runs.
    wait_for("the worker to answer again", lambda: probe(port, "/health")[0] == 200)
    assert scheduler.alive() and worker.alive()


def test_health_is_503_without_a_database_session(fleet, db_url, pg_server):
    port = free_port()
    fs.start(fleet, "worker", 1, "--metrics-port", str(port))
    assert probe(port, "/health")[0] == 200
    dbname = query(db_url, "SELECT current_database() AS d")[0]["d"]
    admin = pg_server.url("postgres")

    def cut_and_probe() -> bool:
        """End the worker's sessions (as a database restart does) and probe at once,
        before its reconnection (0.1 s backoff) succeeds."""
        query(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", dbname)
        status, _, body = probe(port, "/health")
        return status == 503 and b"no database session" in body

    wait_for("the probe to say 503 while the session is gone", cut_and_probe, every=0.01)
    wait_for("the worker to reconnect", lambda: probe(port, "/health")[0] == 200)
    text = probe(port, "/metrics")[2].decode()
    assert 'pgbeat_reconnects_total{role="worker"}' in text


def test_every_daemon_reports_the_backlog_it_sees(fleet, db_url):
    """pgbeat_runs_due: due runs waiting for a worker, read at each reap (Rule 13's
    side task, every few seconds) by every daemon: with no worker, one per task (Rule 3);
    once a worker claims them, none."""
    port = free_port()
    fs.start(fleet, "scheduler", 1, "--metrics-port", str(port))
    for _ in range(3):
        fs.create_task(db_url, {"kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": 1}})

    def due_seen(expected: float) -> bool:
        text = probe(port, "/metrics")[2].decode()
        return f'pgbeat_runs_due{{role="scheduler"}} {expected}' in text

    wait_for("the scheduler to see three due runs waiting", lambda: due_seen(3.0))
    fs.start(fleet, "worker", 1, env={"PGBEAT_METRICS_PORT": "0"})
    wait_for("the scheduler to see the backlog gone", lambda: due_seen(0.0))
