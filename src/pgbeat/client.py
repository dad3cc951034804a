"""The REST client behind `pgbeat task`, `runs`, `upcoming`, `status` and `completion`.

It talks to the API at PGBEAT_URL (default http://127.0.0.1:8000) with the key in
PGBEAT_API_KEY. It prints tables (coloured on a terminal unless NO_COLOR is set), or
with --json exactly the API's objects, one per line. A request that fails exits 1 with
the API's message (or why the API could not be reached) on stderr; a command line it
cannot read exits 2 with the command's usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp

from pgbeat import kinds

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_REQUEST_TIMEOUT = 30.0
FINAL_STATES = ("succeeded", "failed", "timed_out", "abandoned", "cancelled", "skipped")
RUN_STATES = ("pending", "running", *FINAL_STATES)
TASK_STATUSES = ("active", "paused", "complete", "deleted")


class ApiError(Exception):
    """A request that failed: the API's status and message, or why it could not be reached."""


# ---------------------------------------------------------------- text from the server

# C0/C1 controls and the bidirectional overrides: a task name or an error is printed
# as data, never as instructions to the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def clean(text: object) -> str:
    """Server text made safe for a terminal: control characters as visible escapes."""

    def escape(match: re.Match[str]) -> str:
        ch = match.group()
        return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")

    return _CONTROL.sub(escape, str(text))


# ---------------------------------------------------------------- the API


def normalise_url(url: str) -> str:
    """`127.0.0.1:8000` and `localhost` mean http://...; a trailing slash is dropped."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def network_failure(url: str, exc: BaseException, timeout: float) -> str:
    """Why a request got no answer, in words."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return (
            f"no answer from {url} within {timeout:g} s (is it a pgbeat API? --request-timeout waits longer)"
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve the host of {url}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        reason = os.strerror(errno) if errno else type(exc.os_error).__name__
        return f"cannot connect to {url}: {reason.lower()} (is `pgbeat api` or `pgbeat serve` running?)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{url} closed the connection without answering"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"{url!r} is not a URL (--url or PGBEAT_URL)"
    return f"cannot reach {url}: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")


class Api:
    def __init__(self, url: str, api_key: str | None, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self.url = normalise_url(url)
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(
            headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    def not_pgbeat(self, status: int, content_type: str) -> ApiError:
        return ApiError(
            f"the server at {self.url} is not a pgbeat API (it answered HTTP {status}"
            f"{' with ' + content_type if content_type else ''}); check --url or PGBEAT_URL"
        )

    async def call(
        self, method: str, path: str, body: Any = None, answers: tuple[int, ...] = (), **params: Any
    ) -> Any:
        query = {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items() if v is not None
        }
        try:
            async with self.session.request(method, self.url + path, json=body, params=query) as resp:
                raw = await resp.read()
                status, content_type = resp.status, resp.content_type
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiError(network_failure(self.url, exc, self.timeout)) from exc
        if status == 204 and not raw:
            return None
        try:
            data = json.loads(raw) if content_type == "application/json" else None
        except ValueError:
            data = None
        if status >= 400 and status not in answers:
            if not (isinstance(data, dict) and isinstance(data.get("detail"), str) and "status_code" in data):
                raise self.not_pgbeat(status, content_type)
            raise ApiError(f"{clean(data['detail'])} (HTTP {status})")
        if data is None:
            raise self.not_pgbeat(status, content_type)
        return data

    async def pages(self, path: str, limit: int | None, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """Every item of a keyset-paginated list, in the API's order, up to `limit`."""
        cursor, seen = None, 0
        while limit is None or seen < limit:
            size = 500 if limit is None else min(limit - seen, 500)
            page = await self.call("GET", path, limit=size, cursor=cursor, **params)
            for item in page["items"]:
                yield item
            seen += len(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return


# ---------------------------------------------------------------- output


STATE_COLOURS = {
    "succeeded": "32",  # green
    "active": "32",
    "failed": "31",  # red
    "timed_out": "31",
    "abandoned": "31",
    "error": "31",
    "running": "36",  # cyan
    "pending": "33",  # yellow
    "paused": "33",
    "scheduled": "2",
    "cancelled": "2",  # dim
    "skipped": "2",
    "complete": "2",
    "deleted": "2",
}


def colour_wanted(choice: str, stream: TextIO) -> bool:
    """`auto`: on a terminal, unless NO_COLOR is set (no-color.org) or TERM is dumb."""
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class Out:
    """Where a command prints: stdout, coloured or not."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def paint(self, text: str, code: str | None) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code and text.strip() else text

    def bold(self, text: str) -> str:
        return self.paint(text, "1")

    def state(self, text: str, state: str | None = None) -> str:
        return self.paint(text, STATE_COLOURS.get(state or text.split()[0] if text.strip() else ""))

    def print(self, text: str = "") -> None:
        print(text, flush=True)

    def json(self, data: Any) -> None:
        print(json.dumps(data), flush=True)


Column = tuple[str, Callable[[dict[str, Any]], Any], str | None]  # header, value, state key for colour


def when(value: str | None) -> str:
    """'2026-11-23T10:00:30.123456Z' -> '2026-11-23 10:00:30Z'."""
    if not value:
        return "-"
    date, _, rest = value.partition("T")
    return f"{date} {rest[:8]}Z"


def millis(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}ms" if abs(value) < 10_000 else f"{value / 1000:.1f}s"


def outcome(run: dict[str, Any]) -> str:
    """The error of a run, else its result."""
    return run["error"] or (json.dumps(run["result"]) if run["result"] else "")


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def schedule_text(schedule: dict[str, Any]) -> str:
    if "every" in schedule:
        return f"every {schedule['every']}"
    if "at" in schedule:
        return f"at {when(schedule['at'])}"
    return f"cron {schedule.get('cron')} ({schedule.get('timezone', 'UTC')})"


def task_state(task: dict[str, Any]) -> str:
    return task["status"]


def last_run(task: dict[str, Any]) -> dict[str, Any] | None:
    return task.get("last_run")


TASK_COLUMNS: list[Column] = [
    ("ID", lambda t: t["id"], None),
    ("NAME", lambda t: cut(t["name"], 30), None),
    ("KIND", lambda t: t["kind"], None),
    ("SCHEDULE", lambda t: schedule_text(t["schedule"]), None),
    ("STATUS", task_state, "status"),
    ("NEXT RUN", lambda t: when(t["next_run_at"]), None),
    ("LAST RUN", lambda t: when((last_run(t) or {}).get("scheduled_for")), None),
    ("LAST STATE", lambda t: (last_run(t) or {}).get("state") or "-", "last_state"),
]

RUN_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"], None),
    ("TASK", lambda r: cut(f"{r['task_id']} {r['task_name']}", 28), None),
    ("STATE", lambda r: r["state"] + (f" (+{r['coalesced']})" if r.get("coalesced") else ""), "state"),
    ("SCHEDULED", lambda r: when(r["scheduled_for"]), None),
    ("STARTED", lambda r: when(r["started_at"]), None),
    ("DURATION", lambda r: millis(r["duration_ms"]), None),
    ("LATE", lambda r: millis(r["lateness_ms"]), None),
    ("OUTCOME", lambda r: cut(outcome(r), 60), None),
]
# Follow mode prints a line per run as it finishes: the widths are fixed up front.
RUN_WIDTHS = [8, 28, 14, 20, 20, 8, 8, 0]

UPCOMING_COLUMNS: list[Column] = [
    ("WHEN", lambda u: when(u["scheduled_for"]), None),
    ("TASK", lambda u: cut(f"{u['task_id']} {u['task_name']}", 34), None),
    ("KIND", lambda u: u["kind"], None),
    ("SOURCE", lambda u: u["source"] + (f" run {u['run_id']}" if u.get("run_id") else ""), "source"),
]


def _state_of(row: dict[str, Any], key: str | None) -> str | None:
    if key == "last_state":
        return (row.get("last_run") or {}).get("state")
    if key == "source":
        return "pending" if row.get("source") == "pending" else None
    return row.get(key) if key else None


def rows_of(
    items: Iterable[dict[str, Any]], columns: list[Column]
) -> list[tuple[list[str], list[str | None]]]:
    return [
        ([clean(get(item)) for _, get, _ in columns], [_state_of(item, key) for *_, key in columns])
        for item in items
    ]


def line(out: Out, cells: list[str], widths: list[int], states: list[str | None] | None = None) -> str:
    parts = []
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        padded = cell.ljust(width) if i < len(cells) - 1 else cell
        parts.append(out.state(padded, states[i]) if states and states[i] else padded)
    return "  ".join(parts).rstrip()


def table(out: Out, items: list[dict[str, Any]], columns: list[Column]) -> str:
    rows = rows_of(items, columns)
    header = [name for name, *_ in columns]
    widths = [max(len(r[i]) for r in [header, *(cells for cells, _ in rows)]) for i in range(len(header))]
    lines = [out.bold(line(Out(False), header, widths))]
    lines += [line(out, cells, widths, states) for cells, states in rows]
    return "\n".join(lines)


def task_details(out: Out, task: dict[str, Any]) -> str:
    status = out.state(task["status"])
    lines = [
        out.bold(f"task {task['id']}  {clean(task['name'])}") + f"  ({task['kind']}, {status})",
        f"  schedule       {clean(schedule_text(task['schedule']))}",
        f"  params         {clean(json.dumps(task['params']))}",
        f"  timeout        {task['timeout']:g}s",
        f"  next run       {when(task['next_run_at'])}",
        f"  until          {when(task.get('until'))}",
        f"  runs           {task['fired']} fired"
        + (f" of max {task['max_runs']}" if task.get("max_runs") is not None else " (no max)"),
        f"  overlap        {task['overlap']}",
        f"  misfire        {task['misfire']} (grace {task.get('misfire_grace', 60):g}s)",
        f"  retries        {task['max_retries']} (backoff {task['retry_backoff']:g}s, doubling)",
    ]
    if task.get("error"):
        lines.append(f"  error          {clean(task['error'])}")
    for label, key in (("pending run", "pending_run"), ("last run", "last_run")):
        run = task.get(key)
        if run:
            lines.append(
                f"  {label:<14} {run['id']} {out.state(run['state'])} scheduled {when(run['scheduled_for'])}"
                f" took {millis(run['duration_ms'])} {clean(cut(outcome(run), 80))}".rstrip()
            )
    lines.append(f"  created        {when(task['created_at'])}, updated {when(task['updated_at'])}")
    return "\n".join(lines)


def run_details(out: Out, run: dict[str, Any]) -> str:
    lines = [
        out.bold(f"run {run['id']}") + f"  task {run['task_id']} {clean(run['task_name'])} ({run['kind']})",
        f"  state          {out.state(run['state'])}"
        + (f", attempt {run['attempt']}" if run["attempt"] > 1 else ""),
        f"  scheduled for  {when(run['scheduled_for'])}",
        f"  due at         {when(run['due_at'])}",
        f"  started        {when(run['started_at'])}   late {millis(run['lateness_ms'])}",
        f"  finished       {when(run['finished_at'])}   took {millis(run['duration_ms'])}",
        f"  coalesced      {run['coalesced']} further slot(s) folded into this run",
        f"  worker         {clean(run['worker_host'] or '-')}",
        f"  error          {clean(run['error'] or '-')}",
        "  result" + ("         -" if run["result"] is None else ""),
    ]
    if run["result"] is not None:
        lines += ["    " + clean(text) for text in json.dumps(run["result"], indent=2).splitlines()]
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def parse_param(text: str) -> tuple[str, Any]:
    """key=value; the value is JSON when it parses (seconds=2 -> 2, name='"2024"' -> "2024"),
    else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use true or false)")


def optional_int(text: str) -> int | None:
    """A count, or `none` to clear it."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (or none)") from None


def optional_time(text: str) -> str | None:
    return None if text.lower() == "none" else text


def duration(text: str) -> str | float:
    """A duration for the API: a bare number is seconds."""
    try:
        return float(text)
    except ValueError:
        return text


def seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


TASK_FIELDS = (
    "name",
    "timeout",
    "until",
    "max_runs",
    "overlap",
    "misfire",
    "misfire_grace",
    "max_retries",
    "retry_backoff",
)
UNSET = argparse.SUPPRESS  # an option not given leaves no attribute: "not given" differs from "none"


def task_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if getattr(args, "every", None) is not None:
        body["schedule"] = {"every": duration(args.every)}
        if getattr(args, "start", None) is not None:
            body["schedule"]["start"] = args.start
    elif getattr(args, "at", None) is not None:
        body["schedule"] = {"at": args.at}
    elif getattr(args, "in_", None) is not None:
        body["schedule"] = {"in": duration(args.in_)}
    elif getattr(args, "cron", None) is not None:
        body["schedule"] = {"cron": args.cron}
    if getattr(args, "timezone", None) is not None:
        body.setdefault("schedule", {})["timezone"] = args.timezone
    if getattr(args, "params", None):
        body["params"] = dict(args.params)
    for field in TASK_FIELDS:
        if hasattr(args, field):
            body[field] = getattr(args, field)
    if getattr(args, "paused", None) is not None:
        body["paused"] = args.paused
    if getattr(args, "reset_fired", False):
        body["fired"] = 0
    return body


async def task_command(api: Api, args: argparse.Namespace, out: Out) -> None:
    action = args.action
    if action == "ls":
        await watching(args, out, lambda: list_tasks(api, args, out))
        return
    if action == "add":
        task = await api.call("POST", "/tasks", {"kind": args.kind, **task_body(args)})
        text = f"created task {task['id']}\n" + task_details(out, task)
    elif action == "show":
        task = await api.call("GET", f"/tasks/{args.id}")
        text = task_details(out, task)
    elif action == "update":
        body = task_body(args)
        if not body:
            raise UsageError(args, "nothing to change: give at least one option (see --help)")
        if body.get("schedule", {}).keys() == {"timezone"}:
            # A new time zone for the cron schedule the task already has.
            current = await api.call("GET", f"/tasks/{args.id}")
            if "cron" not in current["schedule"]:
                raise UsageError(args, "--timezone applies to cron schedules; give --cron with it")
            body["schedule"]["cron"] = current["schedule"]["cron"]
        task = await api.call("PATCH", f"/tasks/{args.id}", body)
        text = f"updated task {task['id']}\n" + task_details(out, task)
    elif action in ("pause", "resume"):
        task = await api.call("POST", f"/tasks/{args.id}/{action}")
        text = f"task {task['id']} {out.state(task['status'])}, next run {when(task['next_run_at'])}"
    elif action == "trigger":
        task = await api.call("POST", f"/tasks/{args.id}/trigger")
        text = f"task {task['task_id']}: run {task['id']} queued for now"
    elif action == "rm":
        task = await api.call("DELETE", f"/tasks/{args.id}")  # 204: nothing to print under --json
        text = f"deleted task {args.id} (its history stays: pgbeat runs --task {args.id})"
    else:
        raise AssertionError(action)
    if args.json:
        if task is not None:
            out.json(task)
    else:
        out.print(text)


async def list_tasks(api: Api, args: argparse.Namespace, out: Out) -> str | None:
    items = [
        task
        async for task in api.pages(
            "/tasks", args.limit, kind=args.kind, status=args.status, paused=args.paused, name=args.name
        )
    ]
    if args.json:
        for task in items:
            out.json(task)
        return None
    return table(out, items, TASK_COLUMNS) if items else "no tasks"


def run_filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "task_id": args.task,
        "state": args.state,
        "kind": args.kind,
        "since": args.since,
        "until": args.until,
    }


async def runs_command(api: Api, args: argparse.Namespace, out: Out) -> None:
    if args.action == "show":
        run = await api.call("GET", f"/runs/{args.id}")
        out.json(run) if args.json else out.print(run_details(out, run))
        return
    if args.follow:
        await follow_runs(api, args, out)
        return
    runs = [run async for run in api.pages("/runs", args.limit, **run_filters(args))]
    if args.json:
        for run in runs:
            out.json(run)
    else:
        out.print(table(out, runs, RUN_COLUMNS) if runs else "no runs")


async def runs_after(api: Api, args: argparse.Namespace, after_id: int) -> list[dict[str, Any]]:
    """Every run with an id above after_id, oldest first (pages newest first until after_id)."""
    found: list[dict[str, Any]] = []
    async for run in api.pages("/runs", None, **run_filters(args)):
        if run["id"] <= after_id:
            break
        found.append(run)
    return found[::-1]


RECHECK_ONE_BY_ONE = 20  # unfinished runs re-read by id; beyond that, by paging back to them


async def follow_runs(api: Api, args: argparse.Namespace, out: Out) -> None:
    """The newest --limit finished runs, then each run once as it finishes, oldest first.

    Cursor-based: `mark` is the highest run id below which every run has been printed or
    was before the start; runs above it that have not finished are re-read until they do.
    So however many runs finish between two polls, none is dropped or printed twice.
    """
    start = [run async for run in api.pages("/runs", args.limit, **run_filters(args))][::-1]
    widths = RUN_WIDTHS
    if not args.json:
        out.print(out.bold(line(Out(False), [name for name, *_ in RUN_COLUMNS], widths)))

    def show(run: dict[str, Any]) -> None:
        if args.json:
            out.json(run)
        else:
            ((cells, states),) = rows_of([run], RUN_COLUMNS)
            out.print(line(out, cells, widths, states))

    unfinished: set[int] = set()
    mark = start[0]["id"] - 1 if start else 0
    if not start:
        newest = [run async for run in api.pages("/runs", 1)]
        mark = newest[0]["id"] if newest else 0
    pending_check = start
    deadline = time.monotonic() + args.follow_for if args.follow_for else None
    while True:
        for run in pending_check:
            if run["id"] <= mark and run["id"] not in unfinished:
                continue
            if run["state"] in FINAL_STATES:
                unfinished.discard(run["id"])
                show(run)
            else:
                unfinished.add(run["id"])
            mark = max(mark, run["id"])
        if deadline is not None and time.monotonic() >= deadline:
            return
        await asyncio.sleep(args.interval)
        if len(unfinished) > RECHECK_ONE_BY_ONE:
            polled = await runs_after(api, args, min(unfinished) - 1)
        else:  # a few long runs need not make every poll page back to them
            rechecked = await asyncio.gather(*(api.call("GET", f"/runs/{i}") for i in sorted(unfinished)))
            polled = sorted([*rechecked, *await runs_after(api, args, mark)], key=lambda run: run["id"])
        pending_check = [run for run in polled if run["id"] > mark or run["id"] in unfinished]


async def upcoming_command(api: Api, args: argparse.Namespace, out: Out) -> None:
    async def once() -> str | None:
        if args.task is not None:
            page = await api.call("GET", f"/tasks/{args.task}/upcoming", count=args.limit)
        else:
            page = await api.call("GET", "/upcoming", limit=args.limit, until=args.until)
        items = page["items"]
        if args.json:
            for item in items:
                out.json(item)
            return None
        return table(out, items, UPCOMING_COLUMNS) if items else "nothing upcoming"

    await watching(args, out, once)


async def status_command(api: Api, args: argparse.Namespace, out: Out) -> None:
    async def once() -> str | None:
        status = await api.call("GET", "/status")
        ready = await api.call("GET", "/ready", answers=(503,))  # 503: not ready, and why
        if args.json:
            out.json(status)
            return None
        return status_text(out, status, ready)

    await watching(args, out, once)


def status_text(out: Out, status: dict[str, Any], ready: dict[str, Any]) -> str:
    runs, lateness = status["runs"], status["lateness_ms"]
    counts = status["tasks"]
    order = [s for s in TASK_STATUSES if s in counts] + sorted(set(counts) - set(TASK_STATUSES))
    tasks = ", ".join(f"{counts[s]} {out.state(s)}" for s in order) or "none"
    lines = [
        out.bold(f"pgbeat {status['version']}") + f"  database {out.state(status['database'], 'active')}"
        f"  at {when(status['now'])}",
        f"  ready        {out.state(ready['status'], 'active' if ready['status'] == 'ready' else 'failed')}"
        + (f": {clean(ready['detail'])}" if ready.get("detail") else ""),
        f"  tasks        {tasks}",
        f"  backlog      {runs['due']} run(s) due and waiting for a worker"
        + (f", oldest due {when(runs['oldest_due_at'])}" if runs["oldest_due_at"] else ""),
        f"  runs now     {runs['pending']} pending, {runs['running']} running",
        f"  lateness     p50 {millis(lateness['p50'])}, p95 {millis(lateness['p95'])},"
        f" max {millis(lateness['max'])} (runs started in the last 5 minutes)",
        "",
    ]
    daemons = status["daemons"]
    if daemons:
        lines.append(
            table(
                out,
                daemons,
                [
                    ("DAEMON", lambda d: d["id"], None),
                    ("ROLE", lambda d: d["role"], None),
                    ("HOST", lambda d: d["host"], None),
                    ("PID", lambda d: d["pid"], None),
                    ("STARTED", lambda d: when(d["started_at"]), None),
                    ("HEARTBEAT", lambda d: f"{d['since_heartbeat_s']:.1f}s ago", None),
                ],
            )
        )
    else:
        lines.append(out.state("no scheduler or worker is running", "failed"))
    return "\n".join(lines)


async def watching(args: argparse.Namespace, out: Out, once: Callable[[], Any]) -> None:
    """Print once, or with --watch redraw every N seconds until interrupted (like watch(1))."""
    every = getattr(args, "watch", None)
    if not every:
        text = await once()
        if text is not None:
            out.print(text)
        return
    clear = sys.stdout.isatty()
    while True:
        text = await once()
        if text is not None:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            head = out.bold(f"every {every:g}s: pgbeat {' '.join(args.argv_shown)}") + f"   {stamp}"
            out.print(("\x1b[H\x1b[2J" if clear else "") + head + "\n\n" + text + ("" if clear else "\n"))
        await asyncio.sleep(every)


class UsageError(Exception):
    """A command line that reads but makes no sense (exit 2 with the command's usage)."""

    def __init__(self, args: argparse.Namespace, message: str) -> None:
        super().__init__(message)
        self.parser = args.parser


async def dispatch(args: argparse.Namespace, out: Out) -> None:
    async with Api(args.url, args.api_key, args.request_timeout) as api:
        if args.command == "task":
            await task_command(api, args, out)
        elif args.command == "runs":
            await runs_command(api, args, out)
        elif args.command == "upcoming":
            await upcoming_command(api, args, out)
        elif args.command == "status":
            await status_command(api, args, out)


def run_client(args: argparse.Namespace, config: object = None) -> int:
    out = Out(colour_wanted(args.color, sys.stdout))
    try:
        asyncio.run(dispatch(args, out))
    except BrokenPipeError:
        # Like any filter: a closed pipe (`pgbeat task ls | head`) ends the command
        # quietly, with the status a shell gives a process SIGPIPE ended. stdout goes
        # to /dev/null so that the flush at exit has nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ApiError as exc:
        print(f"pgbeat: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        exc.parser.error(str(exc))
    except KeyboardInterrupt:
        return 0 if getattr(args, "watch", None) or getattr(args, "follow", False) else 130
    return 0


# ---------------------------------------------------------------- the command line


def global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The client's options: on `pgbeat` itself and again on each client command, so they
    may come before or after it (`pgbeat --json task ls` = `pgbeat task ls --json`)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("client options")
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the API's JSON objects, one per line (default: tables)",
    )
    group.add_argument(
        "--url",
        metavar="URL",
        default=default(os.environ.get("PGBEAT_URL") or DEFAULT_URL),
        help="the API's base URL; http:// is assumed without a scheme"
        f" (default: PGBEAT_URL, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(os.environ.get("PGBEAT_API_KEY") or None),
        help="sent as Authorization: Bearer KEY (default: PGBEAT_API_KEY, else none)",
    )
    group.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default=default("auto"),
        help="colour the output; auto: on a terminal unless NO_COLOR is set (default: auto)",
    )
    group.add_argument(
        "--request-timeout",
        type=seconds,
        metavar="SECONDS",
        default=default(DEFAULT_REQUEST_TIMEOUT),
        help=f"give up on an API request after this long (default: {DEFAULT_REQUEST_TIMEOUT:g})",
    )


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _task_options(p: argparse.ArgumentParser, adding: bool) -> None:
    schedule = p.add_argument_group("schedule (exactly one when adding)")
    keep = "" if adding else " (default: unchanged)"
    when_ = schedule.add_mutually_exclusive_group(required=adding)
    when_.add_argument(
        "--every", metavar="DURATION", help="a fixed interval: 30s, 2m, 1h30m, '2 minutes' or seconds" + keep
    )
    when_.add_argument(
        "--at", metavar="ISO", help="once, at a time with an offset: 2027-08-08T17:35:00Z" + keep
    )
    when_.add_argument(
        "--in", dest="in_", metavar="DURATION", help="once, after a delay from now: 1h30m" + keep
    )
    when_.add_argument(
        "--cron",
        metavar="EXPR",
        help="standard cron: 'MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK' or @hourly, @daily, @weekly,"
        " @monthly, @yearly; an optional 6th field is seconds, written last ('0 9 * * 1-5 30' is"
        " 09:00:30 on weekdays; '*/15 * * * * *' is every second of minutes 0, 15, 30, 45)" + keep,
    )
    schedule.add_argument(
        "--timezone",
        metavar="TZ",
        help="IANA time zone of --cron (default: UTC"
        + (")" if adding else "; alone: the task's cron in TZ)"),
    )
    schedule.add_argument(
        "--start", metavar="ISO", help="with --every: the grid's first slot (default: one interval from now)"
    )
    opts = p.add_argument_group("task options")
    opts.add_argument(
        "--name", default=UNSET, help="a label (default: the kind" + (")" if adding else "; unchanged)")
    )
    opts.add_argument(
        "--param",
        dest="params",
        action="append",
        type=parse_param,
        metavar="KEY=VALUE",
        help="a parameter of the kind, repeatable; VALUE is JSON when it parses (seconds=2 is a number,"
        " counter='\"2024\"' a string), else a string (default: the kind's defaults"
        + (")" if adding else "; given: replaces all params)"),
    )
    unchanged = "" if adding else "; unchanged"
    opts.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        default=UNSET,
        help=f"a run's time limit (default: 60{unchanged})",
    )
    opts.add_argument(
        "--until",
        type=optional_time,
        metavar="ISO",
        default=UNSET,
        help=f"no slot after this time; none clears it (default: none{unchanged})",
    )
    opts.add_argument(
        "--max-runs",
        type=optional_int,
        metavar="N",
        default=UNSET,
        help=f"complete after N scheduling decisions; none clears it (default: none{unchanged})",
    )
    opts.add_argument(
        "--overlap",
        choices=["queue", "skip"],
        default=UNSET,
        help="a slot while the previous run is pending or running: queue one run,"
        f" or record it skipped (default: queue{unchanged})",
    )
    opts.add_argument(
        "--misfire",
        choices=["run_once", "skip"],
        default=UNSET,
        help=f"slots missed while no scheduler ran: run once, or skip (default: run_once{unchanged})",
    )
    opts.add_argument(
        "--misfire-grace",
        type=seconds,
        metavar="SECONDS",
        default=UNSET,
        help=f"with --misfire skip: how late the latest slot may still run (default: 60{unchanged})",
    )
    opts.add_argument(
        "--max-retries",
        type=int,
        metavar="N",
        default=UNSET,
        help=f"attempts after a failed, timed-out or abandoned run (default: 0{unchanged})",
    )
    opts.add_argument(
        "--retry-backoff",
        type=seconds,
        metavar="SECONDS",
        default=UNSET,
        help=f"wait before the first retry, doubling per attempt (default: 10{unchanged})",
    )


def _id(p: argparse.ArgumentParser, what: str = "task") -> None:
    p.add_argument("id", type=int, metavar="ID", help=f"the {what}'s id")


def _watch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--watch",
        "-w",
        type=seconds,
        nargs="?",
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw every SECONDS (2 if not given) until Ctrl-C (default: print once)",
    )


ID_USAGE = "%(prog)s ID [options]"


def add_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, suppress=True)

    def command(parent: argparse._SubParsersAction, name: str, help_text: str, *example: str, **kw: Any):
        p = parent.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=examples(*example),
            **kw,
        )
        p.set_defaults(func=run_client, parser=p)
        return p

    task = sub.add_parser(
        "task",
        help="add, list, show, change, pause, trigger and delete tasks",
        description="Tasks: what runs, and when. Each action is one REST call to the pgbeat API.",
        epilog=examples(
            "pgbeat task add sleep --every 30s --param seconds=2", "pgbeat task ls --status active"
        ),
    )
    actions = task.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = command(
        actions,
        "add",
        "schedule a task",
        "pgbeat task add sleep --every 30s --param seconds=2 --name nap",
        "pgbeat task add http --cron '*/5 * * * *' --timezone Europe/Berlin --param url=https://example.com/",
        "pgbeat task add counter --in 1h30m --param counter=hits --max-retries 3",
        "pgbeat task add sleep --at 2027-08-08T17:35:00Z --paused",
        usage="%(prog)s KIND (--every DURATION | --at ISO | --in DURATION | --cron EXPR) [options]",
    )
    p.add_argument("kind", choices=kinds.names(), help="what a run does")
    _task_options(p, adding=True)
    p.add_argument("--paused", action="store_true", default=None, help="create it paused (default: active)")

    p = command(
        actions,
        "ls",
        "list tasks with their next and last run",
        "pgbeat task ls",
        "pgbeat task ls --status paused --kind http",
        "pgbeat task ls --watch 5",
        usage="%(prog)s [--kind KIND] [--status STATUS] [--paused true|false] [--name TEXT] [--limit N]"
        " [--watch [SECONDS]] [options]",
    )
    p.add_argument("--kind", choices=kinds.names(), help="only this kind (default: all)")
    p.add_argument("--status", choices=TASK_STATUSES, help="only this status (default: all but deleted)")
    p.add_argument(
        "--paused", type=boolean, metavar="true|false", help="only paused or unpaused (default: both)"
    )
    p.add_argument("--name", help="only names containing this, any case (default: any)")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most N tasks")
    _watch(p)

    p = command(
        actions, "show", "one task whole, with its last and pending run", "pgbeat task show 7", usage=ID_USAGE
    )
    _id(p)

    p = command(
        actions,
        "update",
        "change a task: only what is given changes",
        "pgbeat task update 7 --every 1m --name slower",
        "pgbeat task update 7 --timezone Asia/Tokyo",
        "pgbeat task update 7 --paused false --max-runs none",
        "pgbeat task update 7 --cron @daily --reset-fired",
        usage="%(prog)s ID [--every DURATION | --at ISO | --in DURATION | --cron EXPR] [--timezone TZ]"
        " [--name NAME] [--param KEY=VALUE] [--paused true|false] [--max-runs N|none] [--reset-fired] ...",
    )
    _id(p)
    _task_options(p, adding=False)
    p.add_argument(
        "--paused", type=boolean, metavar="true|false", help="pause or resume (default: unchanged)"
    )
    p.add_argument(
        "--reset-fired",
        action="store_true",
        help="count max-runs from zero again (default: a schedule change keeps the count)",
    )

    for action, what, example in (
        ("pause", "pause a task (its pending run is cancelled)", "pgbeat task pause 7"),
        ("resume", "resume a paused task at its next slot", "pgbeat task resume 7"),
        ("trigger", "run a task now, once", "pgbeat task trigger 7"),
        (
            "rm",
            "delete a task: no more runs; its history stays (prints nothing with --json)",
            "pgbeat task rm 7",
        ),
    ):
        _id(command(actions, action, what, example, usage=ID_USAGE))

    p = command(
        sub,
        "runs",
        "execution history, newest first (with --follow: a log, newest last)",
        "pgbeat runs --task 7 --state failed",
        "pgbeat runs --since 2026-11-23T00:00:00Z --kind http",
        "pgbeat runs --follow --json",
        "pgbeat runs show 1234",
        usage="%(prog)s [--task ID] [--state STATE] [--kind KIND] [--since ISO] [--until ISO] [--limit N]"
        " [--follow] [options]\n       %(prog)s show ID [options]",
    )
    p.set_defaults(action="ls")
    p.add_argument("--task", type=int, metavar="ID", help="only this task's runs (default: all tasks)")
    p.add_argument("--state", choices=RUN_STATES, help="only runs in this state (default: all)")
    p.add_argument("--kind", choices=kinds.names(), help="only this kind (default: all)")
    p.add_argument("--since", metavar="ISO", help="only runs scheduled at or after this time (default: any)")
    p.add_argument("--until", metavar="ISO", help="only runs scheduled before this time (default: any)")
    p.add_argument(
        "--limit", type=int, default=20, metavar="N", help="at most N runs (with --follow: to start)"
    )
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="then print each run as it finishes, until Ctrl-C (default: once)",
    )
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--follow-for", type=float, default=None, help=argparse.SUPPRESS)
    shows = p.add_subparsers(dest="action", metavar="show ID", required=False, prog="pgbeat runs")
    _id(
        command(
            shows,
            "show",
            "one run whole: its result, error, worker and times",
            "pgbeat runs show 1234",
            "run",
            usage=ID_USAGE,
        )
    )

    p = command(
        sub,
        "upcoming",
        "the next executions, soonest first",
        "pgbeat upcoming --limit 10",
        "pgbeat upcoming --task 7",
        "pgbeat upcoming --until 2026-11-24T00:00:00Z -w",
        usage="%(prog)s [--task ID] [--limit N] [--until ISO] [--watch [SECONDS]] [options]",
    )
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N executions")
    p.add_argument("--until", metavar="ISO", help="only executions up to this time (default: no bound)")
    p.add_argument("--task", type=int, metavar="ID", help="only this task's (default: all tasks)")
    _watch(p)

    p = command(
        sub,
        "status",
        "live schedulers and workers, the backlog and lateness",
        "pgbeat status",
        "pgbeat status --watch",
        usage="%(prog)s [--watch [SECONDS]] [options]",
    )
    _watch(p)

    p = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for bash or zsh.",
        epilog=examples(
            'eval "$(pgbeat completion bash)"     # in ~/.bashrc',
            'eval "$(pgbeat completion zsh)"      # in ~/.zshrc',
        ),
    )
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    p.set_defaults(func=print_completion)


def print_completion(args: argparse.Namespace, config: object = None) -> int:
    from pgbeat import argv

    print(argv.completion_script(args.root_parser, args.shell), end="")
    return 0
