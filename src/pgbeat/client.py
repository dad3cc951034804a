"""The REST client behind `pgbeat task`, `pgbeat runs` and `pgbeat upcoming`.

It talks to the API at PGBEAT_URL (default http://127.0.0.1:8000) with the key in
PGBEAT_API_KEY, prints tables (or the API's JSON with --json), and exits 1 with the
API's error message when a request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = {"succeeded", "failed", "timed_out", "abandoned", "cancelled", "skipped"}


class ApiError(Exception):
    """A request that failed: the API's status and message, or why it could not be reached."""


class Api:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        query = {
            k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items() if v is not None
        }
        try:
            async with self.session.request(method, self.url + path, json=body, params=query) as resp:
                text = await resp.text()
                data = json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiError(f"cannot reach the pgbeat API at {self.url}: {exc or type(exc).__name__}") from exc
        except json.JSONDecodeError as exc:
            raise ApiError(
                f"{method} {path}: the API answered {resp.status} with non-JSON: {text[:200]}"
            ) from exc
        if resp.status >= 400:
            detail = data.get("detail") if isinstance(data, dict) else text
            raise ApiError(f"{detail} (HTTP {resp.status})")
        return data


# ---------------------------------------------------------------- formatting


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


def schedule_text(schedule: dict[str, Any]) -> str:
    if "every" in schedule:
        return f"every {schedule['every']}"
    if "at" in schedule:
        return f"at {when(schedule['at'])}"
    return f"cron {schedule.get('cron')} ({schedule.get('timezone', 'UTC')})"


def table(rows: Iterable[dict[str, Any]], columns: dict[str, Callable[[dict[str, Any]], Any]]) -> str:
    cells = [[str(get(row)) for get in columns.values()] for row in rows]
    header = list(columns)
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *cells]]
    return "\n".join(lines)


TASK_COLUMNS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ID": lambda t: t["id"],
    "NAME": lambda t: t["name"],
    "KIND": lambda t: t["kind"],
    "SCHEDULE": lambda t: schedule_text(t["schedule"]),
    "STATUS": lambda t: t["status"],
    "NEXT RUN": lambda t: when(t["next_run_at"]),
}

RUN_COLUMNS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ID": lambda r: r["id"],
    "TASK": lambda r: f"{r['task_id']} {r['task_name']}",
    "STATE": lambda r: r["state"] + (f" (+{r['coalesced']})" if r.get("coalesced") else ""),
    "SCHEDULED": lambda r: when(r["scheduled_for"]),
    "STARTED": lambda r: when(r["started_at"]),
    "DURATION": lambda r: millis(r["duration_ms"]),
    "LATE": lambda r: millis(r["lateness_ms"]),
    "OUTCOME": lambda r: outcome(r)[:60],
}

UPCOMING_COLUMNS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "WHEN": lambda u: when(u["scheduled_for"]),
    "TASK": lambda u: f"{u['task_id']} {u['task_name']}",
    "KIND": lambda u: u["kind"],
    "SOURCE": lambda u: u["source"] + (f" run {u['run_id']}" if u.get("run_id") else ""),
}


def task_details(task: dict[str, Any]) -> str:
    lines = [
        f"task {task['id']}  {task['name']}  ({task['kind']}, {task['status']})",
        f"  schedule     {schedule_text(task['schedule'])}",
        f"  params       {json.dumps(task['params'])}",
        f"  timeout      {task['timeout']:g}s",
        f"  next run     {when(task['next_run_at'])}",
    ]
    if task.get("until"):
        lines.append(f"  until        {when(task['until'])}")
    if task.get("max_runs"):
        lines.append(f"  max runs     {task['max_runs']} ({task['fired']} fired)")
    for label, key in (("pending run", "pending_run"), ("last run", "last_run")):
        run = task.get(key)
        if run:
            lines.append(
                f"  {label:<12} {run['id']} {run['state']} scheduled {when(run['scheduled_for'])}"
                f" took {millis(run['duration_ms'])} {outcome(run)}".rstrip()
            )
    lines.append(f"  created      {when(task['created_at'])}, updated {when(task['updated_at'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def parse_param(text: str) -> tuple[str, Any]:
    """key=value; the value is JSON when it parses (seconds=2 -> 2), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def duration(text: str) -> str | float:
    """A duration for the API: a bare number is seconds."""
    try:
        return float(text)
    except ValueError:
        return text


def task_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.every is not None:
        body["schedule"] = {"every": duration(args.every)}
    elif args.at is not None:
        body["schedule"] = {"at": args.at}
    elif args.in_ is not None:
        body["schedule"] = {"in": duration(args.in_)}
    elif args.cron is not None:
        body["schedule"] = {"cron": args.cron}
    if args.timezone is not None:
        body.setdefault("schedule", {})["timezone"] = args.timezone
    if args.params:
        body["params"] = dict(args.params)
    for field in ("name", "timeout", "until", "max_runs", "overlap", "misfire"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.paused is not None:
        body["paused"] = args.paused
    return body


async def task_command(api: Api, args: argparse.Namespace) -> tuple[Any, str | None]:
    """Run one `pgbeat task` action: (the API's JSON, its text form)."""
    action = args.action
    if action == "add":
        task = await api.call("POST", "/tasks", {"kind": args.kind, **task_body(args)})
        return task, f"created task {task['id']}\n" + task_details(task)
    if action == "ls":
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = await api.call(
                "GET",
                "/tasks",
                kind=args.kind,
                status=args.status,
                name=args.name,
                limit=min(args.limit - len(items), 500),
                cursor=cursor,
            )
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None or len(items) >= args.limit:
                break
        return items, table(items, TASK_COLUMNS) if items else "no tasks"
    if action == "show":
        task = await api.call("GET", f"/tasks/{args.id}")
        return task, task_details(task)
    if action == "update":
        task = await api.call("PATCH", f"/tasks/{args.id}", task_body(args))
        return task, f"updated task {task['id']}\n" + task_details(task)
    if action in ("pause", "resume"):
        task = await api.call("POST", f"/tasks/{args.id}/{action}")
        return task, f"task {task['id']} {task['status']}, next run {when(task['next_run_at'])}"
    if action == "trigger":
        run = await api.call("POST", f"/tasks/{args.id}/trigger")
        return run, f"task {run['task_id']}: run {run['id']} queued for now"
    if action == "rm":
        await api.call("DELETE", f"/tasks/{args.id}")
        return {"deleted": args.id}, f"deleted task {args.id} (its history stays)"
    raise AssertionError(action)


async def runs_command(api: Api, args: argparse.Namespace) -> None:
    def fetch() -> Any:
        return api.call("GET", "/runs", task_id=args.task, state=args.state, kind=args.kind, limit=args.limit)

    runs = list(reversed((await fetch())["items"]))  # oldest first, like a log
    emit(runs, args.json, lambda: table(runs, RUN_COLUMNS) if runs else "no runs")
    if not args.follow:
        return
    # Follow: print each run once it has finished, as a log line (NDJSON with --json).
    shown = {run["id"] for run in runs if run["state"] in FINAL_STATES}
    deadline = time.monotonic() + args.follow_for if args.follow_for else None
    while deadline is None or time.monotonic() < deadline:
        await asyncio.sleep(args.interval)
        for run in reversed((await fetch())["items"]):
            if run["state"] in FINAL_STATES and run["id"] not in shown:
                shown.add(run["id"])
                if args.json:
                    print(json.dumps(run), flush=True)
                else:
                    print("  ".join(str(get(run)) for get in RUN_COLUMNS.values()), flush=True)


def emit(data: Any, as_json: bool, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2) if as_json else text(), flush=True)


async def dispatch(args: argparse.Namespace) -> None:
    async with Api(args.url, args.api_key) as api:
        if args.command == "task":
            data, text = await task_command(api, args)
            emit(data, args.json, lambda: text or "")
        elif args.command == "runs":
            await runs_command(api, args)
        elif args.command == "upcoming":
            path = f"/tasks/{args.task}/upcoming" if args.task else "/upcoming"
            params = {"count": args.limit} if args.task else {"limit": args.limit, "until": args.until}
            items = (await api.call("GET", path, **params))["items"]
            emit(items, args.json, lambda: table(items, UPCOMING_COLUMNS) if items else "nothing upcoming")


def run_client(args: argparse.Namespace, config: object = None) -> int:
    try:
        asyncio.run(dispatch(args))
    except ApiError as exc:
        print(f"pgbeat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------- argparse


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    common.add_argument(
        "--url", default=os.environ.get("PGBEAT_URL", DEFAULT_URL), help="API base URL (PGBEAT_URL)"
    )
    common.add_argument(
        "--api-key", default=os.environ.get("PGBEAT_API_KEY") or None, help="API key (PGBEAT_API_KEY)"
    )
    return common


def _schedule_options(p: argparse.ArgumentParser, required: bool) -> None:
    when_ = p.add_mutually_exclusive_group(required=required)
    when_.add_argument("--every", metavar="DURATION", help="interval: 30s, 2m, 1h30m or seconds")
    when_.add_argument("--at", metavar="ISO", help="once at a time with offset: 2027-08-08T17:35:00Z")
    when_.add_argument("--in", dest="in_", metavar="DURATION", help="once after a delay: 1h30m")
    when_.add_argument(
        "--cron",
        metavar="EXPR",
        help="standard cron: 'MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK' or @hourly, @daily, @weekly,"
        " @monthly, @yearly; an optional 6th field is seconds, written last ('0 9 * * 1-5 30' is"
        " 09:00:30 on weekdays; '*/15 * * * * *' is every second of minutes 0, 15, 30, 45)",
    )
    p.add_argument("--timezone", metavar="TZ", help="IANA time zone of --cron (default UTC)")
    p.add_argument("--name")
    p.add_argument("--param", dest="params", action="append", type=parse_param, metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, metavar="SECONDS")
    p.add_argument("--until", metavar="ISO", help="no slot after this time")
    p.add_argument("--max-runs", type=int, metavar="N")
    p.add_argument("--overlap", choices=["queue", "skip"])
    p.add_argument("--misfire", choices=["run_once", "skip"])


def add_commands(sub: argparse._SubParsersAction) -> None:
    common = _common()

    task = sub.add_parser("task", help="add, list, show, change and delete tasks (REST client)")
    actions = task.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("add", parents=[common], help="schedule a task")
    p.add_argument("kind", help="sleep, counter or http")
    _schedule_options(p, required=True)
    p.add_argument("--paused", action="store_const", const=True, default=None, help="create it paused")
    p = actions.add_parser("ls", parents=[common], help="list tasks")
    p.add_argument("--kind")
    p.add_argument("--status", choices=["active", "paused", "complete", "deleted"])
    p.add_argument("--name", help="part of the name")
    p.add_argument("--limit", type=int, default=100)
    p = actions.add_parser("show", parents=[common], help="one task with its last and pending run")
    p.add_argument("id", type=int)
    p = actions.add_parser("update", parents=[common], help="change a task (only what is given)")
    p.add_argument("id", type=int)
    _schedule_options(p, required=False)
    p.add_argument("--paused", type=lambda v: v.lower() in ("1", "true", "yes"), metavar="true|false")
    for action, what in (
        ("pause", "pause a task"),
        ("resume", "resume a paused task"),
        ("trigger", "run a task now"),
        ("rm", "delete a task (history stays)"),
    ):
        p = actions.add_parser(action, parents=[common], help=what)
        p.add_argument("id", type=int)
    task.set_defaults(func=run_client)

    p = sub.add_parser("runs", parents=[common], help="execution history, newest last (REST client)")
    p.add_argument("--task", type=int, metavar="ID")
    p.add_argument(
        "--state",
        choices=[
            "pending",
            "running",
            "succeeded",
            "failed",
            "timed_out",
            "abandoned",
            "cancelled",
            "skipped",
        ],
    )
    p.add_argument("--kind")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing runs as they finish")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--follow-for", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_client)

    p = sub.add_parser("upcoming", parents=[common], help="the next executions, soonest first (REST client)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--until", metavar="ISO")
    p.add_argument("--task", type=int, metavar="ID", help="one task's next executions")
    p.set_defaults(func=run_client)
