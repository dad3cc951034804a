"""The dashboard at /ui: server-rendered pages (Jinja2 templates, inline SVG charts) over
the API's own calls, one small script that refreshes the overview, and the API docs
served from assets inside the package.

Reads are keyset pages and bounded windows (the last hour; the last runs of the tasks
on a page), so a page costs the same with 100,000 tasks and millions of runs. Every
action goes through the function the JSON API calls (pgbeat.api.routes), so the
dashboard can do nothing the API could not.

Auth: open when the API is open. With API keys, a sign-in form takes a key and keeps a
session in an encrypted HttpOnly, SameSite=Strict cookie holding a fingerprint of the
key (never the key); removing a key from PGBEAT_API_KEYS ends its sessions. Every
form carries a CSRF token (Litestar's CSRF middleware, double-submit cookie).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import asyncpg
import msgspec
from litestar import Request, Response, Router, get, post
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import CacheControlHeader, ResponseHeader, State
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session.client_side import CookieBackendConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import Body, FromPath, FromQuery
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from markupsafe import Markup

from pgbeat import kinds, queries
from pgbeat.api import charts, ratelimit, routes, words
from pgbeat.api.errors import BadInput, bad_input_handler, postgres_error_handler
from pgbeat.api.models import ScheduleIn, TaskChanges
from pgbeat.config import Config

HERE = Path(__file__).parent
STATIC = "/ui/static"
# Everything a page needs comes from this origin; no inline script, no inline style.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
KINDS = tuple(kinds.names())
STATUSES = ("active", "paused", "complete", "deleted", "error")  # error: a task set aside (its data)
FAILED_STATES = ("failed", "timed_out", "abandoned")
TASKS_PER_PAGE = 50
RUNS_PER_PAGE = 25
STRIP_RUNS = 20
SESSION_HOURS = 12


# ---------------------------------------------------------------- secrets and sessions


def ui_secret(config: Config) -> bytes:
    """The key that signs CSRF tokens and encrypts sessions: PGBEAT_UI_SECRET when set,
    else derived from the API keys (every replica with the same keys agrees), else (an
    open API) random per process."""
    if config.ui_secret:
        material = config.ui_secret.encode()
    elif config.api_keys:
        material = "\n".join(sorted(config.api_keys)).encode()
    else:
        return secrets.token_bytes(32)
    return hmac.new(b"pgbeat-ui", material, hashlib.sha256).digest()


def key_fingerprint(key: str) -> str:
    return hashlib.sha256(b"pgbeat-ui-session\0" + key.encode()).hexdigest()


class Auth:
    """Who may use the dashboard: anyone on an open API, else a session signed in with a key."""

    def __init__(self, config: Config) -> None:
        self.keyed = bool(config.api_keys)
        self.keys = tuple(key.encode() for key in config.api_keys)
        self.fingerprints = frozenset(key_fingerprint(key) for key in config.api_keys)
        self.trusted_proxies = config.trusted_proxies

    def signed_in(self, request: Request) -> bool:
        return not self.keyed or request.session.get("key") in self.fingerprints

    def valid(self, presented: str) -> bool:
        candidate = presented.encode()
        valid = False
        for key in self.keys:  # constant time, every key
            valid |= hmac.compare_digest(candidate, key)
        return valid


def auth_of(request: Request) -> Auth:
    return request.route_handler.opt["ui_auth"]


async def require_sign_in(request: Request) -> Response | None:
    """Before every dashboard handler but the sign-in form's."""
    auth = auth_of(request)
    if request.route_handler.opt.get("public") or auth.signed_in(request):
        return None
    if request.headers.get("x-pgbeat-fragment"):
        return Response("signed out", status_code=401, media_type="text/plain")
    return Redirect(status_code=303, path=f"/ui/sign-in?{urlencode({'next': request.url.path})}")


# ---------------------------------------------------------------- template helpers


def utc(moment: datetime | None) -> str:
    return "—" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "—"
    delta = (moment - (now or datetime.now(UTC))).total_seconds()
    if abs(delta) < 1:
        return "now"
    text = words.duration(round(abs(delta)))
    return f"in {text}" if delta > 0 else f"{text} ago"


def when(moment: datetime | None) -> Markup:
    """A time as '3 min ago', its exact UTC time on hover and for machines."""
    if moment is None:
        return Markup("—")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        moment.isoformat(), utc(moment), ago(moment)
    )


def pretty_json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def register_helpers(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters.update(
        utc=utc,
        when=when,
        ms=words.milliseconds,
        schedule=words.schedule,
        error_class=words.error_class,
        error_message=words.error_message,
        json=pretty_json,
    )
    engine.engine.globals.update(static=STATIC, kinds=KINDS, statuses=STATUSES)


TEMPLATES = TemplateConfig(
    directory=HERE / "templates", engine=JinjaTemplateEngine, engine_callback=register_helpers
)


def page(name: str, request: Request, status_code: int = 200, **context: Any) -> Template:
    auth = auth_of(request)
    return Template(
        template_name=name,
        context={"signed_in": auth.keyed and auth.signed_in(request), **context},
        status_code=status_code,
    )


# ---------------------------------------------------------------- overview


class FinishedMinutes:
    """Runs finished per minute and their lateness over the last hour. A minute two
    minutes past no longer changes (a run's finished_at is its finish, committed
    within seconds), so each is read once per process and kept: a render reads the
    last three minutes, not the hour's runs (100,000 at 100,000 hourly tasks)."""

    SETTLE = timedelta(minutes=2)

    def __init__(self) -> None:
        self.settled: dict[datetime, asyncpg.Record | None] = {}

    async def last_hour(self, conn: asyncpg.Connection, now: datetime) -> list[asyncpg.Record]:
        current = now.replace(second=0, microsecond=0)
        start = current - timedelta(minutes=59)
        self.settled = {minute: row for minute, row in self.settled.items() if minute >= start}
        hour = [start + timedelta(minutes=i) for i in range(60)]
        unsettled = [m for m in hour if m not in self.settled]
        rows = {
            row["minute"]: row for row in await conn.fetch(queries.get("dashboard_minutes"), unsettled[0])
        }
        for minute in unsettled:
            if minute < current - self.SETTLE:
                self.settled[minute] = rows.get(minute)
        return [row for m in hour if (row := self.settled[m] if m in self.settled else rows.get(m))]


class StatusCounts:
    """Tasks by status, counted at most every few seconds per API process, however many
    overviews refresh: counting is a scan of the tasks table (100,000 rows: 75-180 ms
    on the 2-core bench host), and the overview refreshes every 5 s anyway."""

    TTL = 5.0

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.counted_at = -self.TTL

    async def get(self, conn: asyncpg.Connection) -> dict[str, int]:
        if time.monotonic() - self.counted_at >= self.TTL:
            self.counts = dict(await conn.fetchrow(queries.get("dashboard_status_counts")))
            self.counted_at = time.monotonic()
        return self.counts


async def overview_context(state: State) -> dict[str, Any]:
    pool: asyncpg.Pool = state.pool
    finished_minutes: FinishedMinutes = state.setdefault("ui_finished_minutes", FinishedMinutes())
    now = datetime.now(UTC)
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=59)
    async with pool.acquire() as conn:
        statuses = await state.setdefault("ui_status_counts", StatusCounts()).get(conn)
        minutes = await finished_minutes.last_hour(conn, now)
        failing = await conn.fetch(queries.get("dashboard_failing"))
        daemons = await conn.fetch(queries.get("dashboard_daemons"))
        backlog = await conn.fetchrow(queries.get("dashboard_backlog"))
    return {
        "now": now,
        "statuses": statuses,
        "failing": failing,
        "failing_count": failing[0]["failing"] if failing else 0,
        "daemons": daemons,
        "backlog": backlog,
        "runs_chart": charts.runs_per_minute(minutes, start),
        "lateness_chart": charts.lateness(minutes, start),
        "finished_last_hour": sum(row["succeeded"] + row["failed"] for row in minutes),
    }


@get("/", name="ui-overview")
async def overview(request: Request, state: State) -> Template:
    return page("overview.html", request, **await overview_context(state))


@get("/fragments/overview")
async def overview_fragment(request: Request, state: State) -> Template:
    return page("overview_live.html", request, **await overview_context(state))


# ---------------------------------------------------------------- tasks


def _choice(value: str, allowed: tuple[str, ...], field: str) -> str | None:
    if value and value not in allowed:
        raise HTTPException(f"{field}: must be one of {', '.join(allowed)}", status_code=400)
    return value or None


@get("/tasks")
async def tasks(
    request: Request,
    state: State,
    name: FromQuery[str] = "",
    kind: FromQuery[str] = "",
    status: FromQuery[str] = "",
    after: FromQuery[str] = "",
) -> Template:
    filters = {
        "name": name.strip(),
        "kind": _choice(kind, KINDS, "kind"),
        "status": _choice(status, STATUSES, "status"),
    }
    try:
        after_id = routes.parse_cursor(after, routes.MAX_INT4)
    except BadInput as exc:
        raise HTTPException(str(exc), status_code=400) from None
    rows = await state.pool.fetch(
        queries.get("list_tasks"),
        filters["kind"],
        filters["status"],
        None,
        filters["name"] or None,
        after_id,
        TASKS_PER_PAGE,
    )
    listed = [routes.task_from_row(row) for row in rows]
    recent: dict[int, list] = {task.id: [] for task in listed}
    for run in await state.pool.fetch(queries.get("dashboard_recent_runs"), list(recent), STRIP_RUNS):
        recent[run["task_id"]].append(run)
    shown = {key: value for key, value in filters.items() if value}
    cursor = routes.next_cursor(rows, TASKS_PER_PAGE)
    return page(
        "tasks.html",
        request,
        tasks=[
            {
                "task": task,
                "strip": charts.history_strip(recent[task.id], STRIP_RUNS),
                "last": next((r for r in recent[task.id] if r["state"] not in ("pending", "running")), None),
            }
            for task in listed
        ],
        filters=filters,
        first_page=bool(after),
        next_url=f"/ui/tasks?{urlencode({**shown, 'after': cursor})}" if cursor else None,
        first_url=f"/ui/tasks?{urlencode(shown)}",
        done=request.query_params.get("done"),
    )


async def task_context(pool: asyncpg.Pool, task_id: int, before: str | None) -> dict[str, Any]:
    task = await routes.get_task(pool, task_id)
    try:
        before_id = routes.parse_cursor(before, routes.MAX_INT8)
    except BadInput as exc:
        raise HTTPException(str(exc), status_code=400) from None
    rows = await pool.fetch(queries.get("task_runs"), task_id, None, before_id, RUNS_PER_PAGE)
    cursor = routes.next_cursor(rows, RUNS_PER_PAGE)
    return {
        "task": task,
        "upcoming": await routes.task_upcoming(pool, task_id, 10) if task.status == "active" else [],
        "runs": [routes.run_from_row(row) for row in rows],
        "older_url": f"/ui/tasks/{task_id}?before={cursor}#history" if cursor else None,
        "newest_url": f"/ui/tasks/{task_id}#history" if before else None,
        "params": pretty_json(task.params),
    }


DONE = {
    "paused": "Paused: its pending run, if any, is cancelled.",
    "resumed": "Resumed at its next slot.",
    "triggered": "Triggered: a run is pending now.",
    "rescheduled": "Schedule changed.",
    "deleted": "Deleted: its future runs are cancelled, its history stays.",
}


@get("/tasks/{task_id:int}")
async def task_page(
    request: Request, state: State, task_id: routes.TaskId, before: FromQuery[str | None] = None
) -> Template:
    context = await task_context(state.pool, task_id, before)
    return page("task.html", request, done=DONE.get(request.query_params.get("done", "")), **context)


FormData = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


async def _act(request: Request, state: State, task_id: int, action: str, form: dict[str, str]) -> Response:
    """Take one action through the API's own call; refused input re-renders the task
    page with the API's error (its 4xx status and the field it names)."""
    pool = state.pool
    try:
        if action == "pause":
            await routes.pause_task(pool, task_id)
        elif action == "resume":
            await routes.resume_task(pool, task_id)
        elif action == "trigger":
            await routes.trigger_task(pool, task_id)
        elif action == "delete":
            await routes.delete_task(pool, task_id)
            return Redirect(status_code=303, path=f"/ui/tasks?done={quote('deleted')}")
        elif action == "schedule":
            await routes.update_task(
                pool, task_id, TaskChanges(schedule=schedule_from_form(form)), state.input_limits
            )
    except (BadInput, asyncpg.PostgresError) as exc:
        handler = bad_input_handler if isinstance(exc, BadInput) else postgres_error_handler
        answer = handler(request, exc)  # type: ignore[arg-type]
        if answer.status_code >= 500:
            raise
        if answer.status_code == 404:
            raise NotFoundException(answer.content.detail) from None
        context = await task_context(pool, task_id, None)
        return page(
            "task.html", request, status_code=answer.status_code, error=answer.content, form=form, **context
        )
    done = {"pause": "paused", "resume": "resumed", "trigger": "triggered", "schedule": "rescheduled"}[action]
    return Redirect(status_code=303, path=f"/ui/tasks/{task_id}?done={done}")


def schedule_from_form(form: dict[str, str]) -> ScheduleIn:
    kind, value = form.get("form", ""), form.get("value", "").strip()
    if kind not in ("every", "cron", "at", "in"):
        raise BadInput("schedule", "choose every, cron, at or in")
    if not value:
        raise BadInput(f"schedule.{kind}", "is required")
    doc: dict[str, Any] = {kind: value}
    if kind == "cron" and form.get("timezone", "").strip():
        doc["timezone"] = form["timezone"].strip()
    try:
        return msgspec.convert(doc, ScheduleIn)
    except msgspec.ValidationError as exc:
        raise BadInput(f"schedule.{kind}", str(exc)) from None


@post("/tasks/{task_id:int}/{action:str}", status_code=303)
async def task_action(
    request: Request, state: State, task_id: routes.TaskId, action: FromPath[str], data: FormData
) -> Response:
    if action not in ("pause", "resume", "trigger", "delete", "schedule"):
        raise NotFoundException(f"no action {action!r}")
    return await _act(request, state, task_id, action, data)


# ---------------------------------------------------------------- runs


@get("/runs/{run_id:int}")
async def run_page(request: Request, state: State, run_id: routes.RunId) -> Template:
    run = await routes.get_run(state.pool, run_id)
    return page(
        "run.html",
        request,
        run=run,
        error_class=words.error_class(run.state, run.error, run.result),
        result=pretty_json(run.result) if run.result is not None else None,
    )


# ---------------------------------------------------------------- sign in and out


def _safe_next(target: str | None) -> str:
    """Only a dashboard path: never an open redirect."""
    if target and target.startswith("/ui") and "//" not in target and "\\" not in target:
        return target
    return "/ui"


@get("/sign-in", opt={"public": True})
async def sign_in_form(request: Request, next: FromQuery[str | None] = None) -> Response:
    auth = auth_of(request)
    if auth.signed_in(request):
        return Redirect(status_code=303, path=_safe_next(next))
    return page("sign_in.html", request, next=_safe_next(next))


@post("/sign-in", opt={"public": True}, status_code=303)
async def sign_in(request: Request, data: FormData) -> Response:
    auth = auth_of(request)
    presented = data.get("key", "")
    if not auth.keyed:
        return Redirect(status_code=303, path="/ui")
    # Failed sign-ins count with the API's failed authentications, per client address.
    failures: ratelimit.FixedWindows = request.app.state.auth_failures
    address = ratelimit.client_address(request.scope, auth.trusted_proxies)
    blocked_for = failures.blocked_for(address)
    if blocked_for is not None:
        raise ratelimit.too_many("too many failed authentications from this address", blocked_for)
    if not presented or not auth.valid(presented):
        failures.hit(address)
        return page(
            "sign_in.html",
            request,
            status_code=401,
            error="That key is not valid.",
            next=_safe_next(data.get("next")),
        )
    request.set_session({"key": key_fingerprint(presented)})
    return Redirect(status_code=303, path=_safe_next(data.get("next")))


@post("/sign-out", opt={"public": True}, status_code=303)
async def sign_out(request: Request) -> Response:
    if auth_of(request).keyed:
        request.clear_session()
    return Redirect(status_code=303, path="/ui/sign-in")


# ---------------------------------------------------------------- errors as pages


def html_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        status, detail = exc.status_code, exc.detail
    else:
        answer = postgres_error_handler(request, exc) if isinstance(exc, asyncpg.PostgresError) else None
        status = answer.status_code if answer else 500
        detail = answer.content.detail if answer else "internal error"
    return page("error.html", request, status_code=status, status=status, detail=detail)


# ---------------------------------------------------------------- API docs, offline


class OfflineSwagger(SwaggerRenderPlugin):
    """Swagger UI from the assets vendored in pgbeat/api/static/swagger-ui (VENDORED.md):
    no CDN, and no inline script, so its page runs under the same kind of CSP."""

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        title = Markup.escape(openapi_schema["info"]["title"])
        return (
            Markup(
                '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                '<meta http-equiv="Content-Security-Policy" content="{csp}">'
                "<title>{title} API</title>"
                '<link rel="icon" type="image/png" href="{static}/swagger-ui/favicon-32x32.png">'
                '<link rel="stylesheet" href="{css}"><link rel="stylesheet" href="{static}/api-docs.css">'
                '</head><body><nav class="docs-nav"><a href="/ui">← pgbeat dashboard</a></nav>'
                '<div id="swagger-ui" data-spec-url="{spec}"></div>'
                '<script src="{js}"></script><script src="{static}/api-docs.js"></script>'
                "</body></html>"
            )
            .format(
                # (frame-ancestors only works as a header, which Litestar's docs routes do not set)
                csp=CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'").replace(
                    "; frame-ancestors 'none'", ""
                ),
                title=title,
                static=STATIC,
                css=self.css_url,
                js=self.js_url,
                spec=self.get_openapi_json_route(request),
            )
            .encode()
        )


def api_docs() -> OfflineSwagger:
    return OfflineSwagger(
        path=["/", "/swagger"],
        js_url=f"{STATIC}/swagger-ui/swagger-ui-bundle.js",
        css_url=f"{STATIC}/swagger-ui/swagger-ui.css",
        standalone_preset_js_url=f"{STATIC}/swagger-ui/swagger-ui-bundle.js",
    )


# ---------------------------------------------------------------- wiring


def route_handlers(config: Config) -> list[Router]:
    """The dashboard's router and its static files (scripts, styles, Swagger UI)."""
    secret = ui_secret(config)
    middleware = [
        DefineMiddleware(
            CSRFMiddleware,
            config=CSRFConfig(
                secret=secret.hex(),
                cookie_name="pgbeat_csrf",
                cookie_path="/ui",
                cookie_httponly=True,
                cookie_samesite="strict",
                header_name="x-pgbeat-csrf",
            ),
        )
    ]
    if config.api_keys:
        session = CookieBackendConfig(
            secret=secret,
            key="pgbeat_session",
            path="/ui",
            httponly=True,
            samesite="strict",
            max_age=SESSION_HOURS * 3600,
        )
        # As a function of the app: Litestar deep-copies a router, and the session's
        # cipher cannot be copied (a function is shared, not copied).
        middleware.insert(0, lambda app: session.middleware(app))
    dashboard = Router(
        path="/ui",
        route_handlers=[
            overview,
            overview_fragment,
            tasks,
            task_page,
            task_action,
            run_page,
            sign_in_form,
            sign_in,
            sign_out,
        ],
        middleware=middleware,
        before_request=require_sign_in,
        response_headers=[
            ResponseHeader(name="Content-Security-Policy", value=CSP),
            ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
            ResponseHeader(name="Referrer-Policy", value="same-origin"),
            ResponseHeader(name="Cache-Control", value="no-store"),
        ],
        exception_handlers={HTTPException: html_error, asyncpg.PostgresError: html_error},
        include_in_schema=False,
        opt={"ui_auth": Auth(config)},
    )
    static = create_static_files_router(
        path=STATIC,
        directories=[HERE / "static"],
        include_in_schema=False,
        cache_control=CacheControlHeader(no_cache=True),  # revalidated: an upgrade is seen at once
    )
    return [dashboard, static]
