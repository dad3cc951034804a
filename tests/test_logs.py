"""The log handler: one JSON event per line, written in order, at most one loop step late."""

from __future__ import annotations

import asyncio
import io
import json
import logging

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
