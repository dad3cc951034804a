"""Start, stop and kill pgbeat processes against one database: the tests, `pgbeat bench`
and the chaos run use this to run real scheduler, worker and api replicas side by side."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    role: str
    args: list[str]
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no cleanup, the session just disappears."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code (killed after timeout)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, event: str) -> list[dict]:
        """The JSON log events of this process named `event`, oldest first."""
        docs = (json.loads(line) for line in self.log().splitlines() if line.startswith("{"))
        return [doc for doc in docs if doc.get("event") == event]


@dataclass
class Fleet:
    """pgbeat processes sharing one database URL; logs go to files in log_dir."""

    database_url: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)

    def start(self, role: str, *args: str, env: dict[str, str] | None = None) -> Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        n = sum(1 for p in self.processes if p.role == role)
        log_path = self.log_dir / f"{role}-{n}.log"
        full_env = {
            **os.environ,
            "PGBEAT_DATABASE_URL": self.database_url,
            "PGBEAT_LOG_FORMAT": "json",
            "PGBEAT_METRICS_PORT": "0",  # many daemons on one host: a port only where a test asks
            **self.env,
            **(env or {}),
        }
        cmd = [sys.executable, "-m", "pgbeat.cli", role, *args]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        p = Process(role, list(args), proc, log_path)
        self.processes.append(p)
        return p

    def start_api(self, *args: str, env: dict[str, str] | None = None) -> tuple[Process, str]:
        """Start an api process on a free port; returns it and its base URL once it answers."""
        import urllib.request

        port = free_port()
        p = self.start("api", "--host", "127.0.0.1", "--port", str(port), *args, env=env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not p.alive():
                raise RuntimeError(f"api exited with {p.proc.returncode}:\n{p.log()}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    return p, base
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"api did not answer on {base}:\n{p.log()}")

    def live(self, role: str | None = None) -> list[Process]:
        return [p for p in self.processes if p.alive() and (role is None or p.role == role)]

    def stop_all(self, timeout: float = 30) -> None:
        for p in self.processes:
            if p.alive():
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(10)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
