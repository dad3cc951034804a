"""The dashboard in a real headless Chromium (Debian's, driven by Playwright; nothing is
downloaded) against real pgbeat processes (api, scheduler, worker) with real tasks and
runs: every page loads under the CSP with no console error and no failed request,
each action is confirmed and changes the database, sign-in and sign-out with keys,
CSRF refusal, and the offline API docs. Screenshots at 1280 and 390 px go to
$PGBEAT_UI_ARTEFACTS (default: the system's temporary directory, pgbeat-ui/)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect
from sqlsupport import query, wait_for

from pgbeat.api.dashboard import CSP
from pgbeat_lab.fleet import free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTEFACTS = Path(os.environ.get("PGBEAT_UI_ARTEFACTS") or Path(tempfile.gettempdir()) / "pgbeat-ui")
KEYS = ("first-key-4f1c", "second-key-9a2e")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
    ),
]


def call(base: str, method: str, path: str, body: dict | None = None, key: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"} | ({"X-API-Key": key} if key else {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, method=method, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


class Watch:
    """Every console error, page error, failed request and unexpected HTTP error of a page."""

    def __init__(self, page) -> None:
        self.problems: list[str] = []
        self.expected_status: set[int] = set()
        page.on("console", self.on_console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", self.on_failed)
        page.on("response", self.on_response)

    def on_console(self, message) -> None:
        # (Chromium logs every 4xx document as a console error; an expected one is no problem.)
        status = re.search(r"responded with a status of (\d+)", message.text)
        if message.type == "error" and not (status and int(status.group(1)) in self.expected_status):
            self.problems.append(f"console: {message.text}")

    def on_failed(self, request) -> None:
        # (A navigation may abort the icon's load; the icon itself is checked to load.)
        if not (request.url.endswith("/favicon.svg") and "ERR_ABORTED" in (request.failure or "")):
            self.problems.append(f"failed: {request.url} {request.failure}")

    def on_response(self, response) -> None:
        if response.status >= 400 and response.status not in self.expected_status:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def check(self) -> None:
        assert self.problems == []


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def start(fleet, keys: tuple[str, ...] = ()) -> str:
    env = {"PGBEAT_API_KEYS": ",".join(keys)} if keys else {}
    fleet.start("scheduler", env=env)
    fleet.start("worker", "--concurrency", "4", env=env)
    _, base = fleet.start_api(env=env)
    return base


def make_tasks(base: str, db_url: str, key: str | None = None) -> dict[str, int]:
    closed_port = free_port()  # nothing listens there: the http task fails, quickly
    specs = {
        "ping": {"kind": "sleep", "params": {"seconds": 0.01}, "schedule": {"every": "1s"}},
        "broken": {
            "kind": "http",
            "params": {"url": f"http://127.0.0.1:{closed_port}/"},
            "schedule": {"every": "1s"},
        },
        "nightly": {"kind": "counter", "schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin"}},
        "hourly": {"kind": "sleep", "schedule": {"every": "1h"}},
    }
    ids = {
        name: call(base, "POST", "/tasks", {"name": name, **spec}, key)["id"] for name, spec in specs.items()
    }
    wait_for(
        "ping to succeed and broken to fail",
        lambda: query(
            db_url,
            "SELECT count(*) FILTER (WHERE task_id = %s AND state = 'succeeded') >= 2"
            " AND count(*) FILTER (WHERE task_id = %s AND state = 'failed') >= 2 AS ok FROM pgbeat.runs",
            ids["ping"],
            ids["broken"],
        )[0]["ok"],
    )
    return ids


def task_row(db_url: str, task_id: int) -> dict[str, Any]:
    return query(db_url, "SELECT * FROM pgbeat.tasks WHERE id = %s", task_id)[0]


def shoot(page, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    width = page.viewport_size["width"]
    page.screenshot(path=str(ARTEFACTS / f"{name}-{width}.png"), full_page=True)


def act(page, button: str, accept: bool = True) -> None:
    """Press an action's button and answer its confirmation."""
    page.once("dialog", lambda dialog: dialog.accept() if accept else dialog.dismiss())
    if accept:
        with page.expect_navigation():
            page.get_by_role("button", name=button, exact=True).click()
    else:
        page.get_by_role("button", name=button, exact=True).click()


@pytest.mark.slow
def test_dashboard_pages_and_actions(fleet, db_url, chromium):
    base = start(fleet)
    ids = make_tasks(base, db_url)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = Watch(page)

    # Overview: the CSP header, counts, the failing task first, live daemons, the charts.
    response = page.goto(base + "/ui")
    assert response.status == 200
    assert response.headers["content-security-policy"] == CSP
    failing = page.locator("section[aria-labelledby=h-failing]")
    assert failing.get_by_role("link", name="broken").is_visible()
    assert "ClientConnectorError" in failing.inner_text()
    assert failing.locator(".class").first.inner_text() == "connect"  # the class the http kind recorded
    daemons = page.locator("section[aria-labelledby=h-daemons] tbody").inner_text()
    assert "scheduler" in daemons and "worker" in daemons
    assert page.locator("svg.chart rect.bar").count() >= 1
    assert page.locator("svg.chart circle.p99").count() >= 1
    # It refreshes itself without a reload.
    page.evaluate("window.notReloaded = true")
    updated = page.locator(".updated").inner_text()
    expect(page.locator(".updated")).not_to_have_text(updated, timeout=20000)
    assert page.evaluate("window.notReloaded") is True
    shoot(page, "overview")

    # Tasks: filters by name, kind and status; schedules in words; history strips.
    page.goto(base + "/ui/tasks")
    table = page.locator("table.tasks tbody")
    assert table.locator("tr").count() == 4
    assert "at 09:00 on weekdays, Europe/Berlin" in table.inner_text()
    assert "every 1 s" in table.inner_text()
    assert page.locator("svg.strip rect.s-failed").count() >= 1
    shoot(page, "tasks")
    page.get_by_label("Name").fill("PIN")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"name=PIN"))
    assert table.locator("tr").count() == 1 and "ping" in table.inner_text()
    page.goto(base + "/ui/tasks")
    page.get_by_label("Kind").select_option("http")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"kind=http"))
    assert table.locator("tr").count() == 1 and "broken" in table.inner_text()

    # A task: definition, the next 10 slots, history; each action through the API's calls.
    hourly = ids["hourly"]
    page.goto(f"{base}/ui/tasks/{hourly}")
    assert "every 1 h" in page.locator("dl.facts").inner_text()
    assert page.locator("ol.upcoming li").count() == 10
    act(page, "Pause", accept=False)  # declined: nothing happens
    assert task_row(db_url, hourly)["paused"] is False
    act(page, "Pause")
    assert task_row(db_url, hourly)["paused"] is True
    assert "Paused" in page.get_by_role("status").inner_text()
    act(page, "Resume")
    assert task_row(db_url, hourly)["paused"] is False
    act(page, "Trigger now")
    wait_for(
        "the triggered run", lambda: query(db_url, "SELECT 1 FROM pgbeat.runs WHERE task_id = %s", hourly)
    )
    page.get_by_label("Form").select_option("cron")
    page.get_by_label("Value").fill("30 6 * * *")
    page.get_by_label("Time zone").fill("Asia/Tokyo")
    act(page, "Change schedule")
    row = task_row(db_url, hourly)
    assert (row["cron"], row["timezone"], row["every"]) == ("30 6 * * *", "Asia/Tokyo", None)
    assert "at 06:30 daily, Asia/Tokyo" in page.locator("dl.facts").inner_text()
    # Refused input: the API's 422 and its field, nothing written.
    watch.expected_status = {422}
    page.get_by_label("Value").fill("61 * * * *")
    act(page, "Change schedule")
    assert "Refused (422): schedule.cron" in page.get_by_role("alert").inner_text()
    assert task_row(db_url, hourly)["cron"] == "30 6 * * *"
    watch.expected_status = set()
    shoot(page, "task")

    # A run: result, error and its class, lateness, worker, timings.
    failed = query(
        db_url, "SELECT id FROM pgbeat.runs WHERE task_id = %s AND state = 'failed' LIMIT 1", ids["broken"]
    )
    page.goto(f"{base}/ui/runs/{failed[0]['id']}")
    facts = page.locator("dl.facts").inner_text()
    assert "ClientConnectorError" in facts and "Lateness" in facts and "Worker" in facts
    assert page.locator("dl.facts .class").inner_text() == "connect"
    shoot(page, "run")

    # Delete, from the task page.
    page.goto(f"{base}/ui/tasks/{hourly}")
    act(page, "Delete")
    assert task_row(db_url, hourly)["deleted_at"] is not None
    assert page.url.endswith("/ui/tasks?done=deleted")
    page.goto(f"{base}/ui/tasks/{hourly}")  # still readable, no longer changeable
    assert "Deleted" in page.locator("main").inner_text()
    assert page.get_by_role("button", name="Delete").count() == 0

    # The API docs, from the package (the browser has no other source).
    page.goto(base + "/ui")
    with page.expect_navigation():
        page.get_by_role("link", name="API docs").click()
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() >= 10
    shoot(page, "docs")

    # Keyboard: the first Tab reaches the skip link, which leads to the content.
    page.goto(base + "/ui/tasks")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"

    # Narrow screens.
    page.set_viewport_size({"width": 390, "height": 844})
    for name, path in [("overview", "/ui"), ("tasks", "/ui/tasks"), ("task", f"/ui/tasks/{ids['broken']}")]:
        page.goto(base + path)
        shoot(page, name)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    watch.check()
    context.close()


@pytest.mark.slow
def test_sign_in_sessions_and_csrf(fleet, db_url, chromium):
    base = start(fleet, KEYS)
    ids = make_tasks(base, db_url, key=KEYS[0])
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = Watch(page)

    # Signed out: every page leads to the sign-in form; the JSON API still wants its header.
    page.goto(f"{base}/ui/tasks/{ids['ping']}")
    assert "/ui/sign-in" in page.url
    assert page.get_by_role("heading", name="Sign in").is_visible()
    watch.expected_status = {401}
    page.get_by_label("API key").fill("not-a-key")
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert "not valid" in page.get_by_role("alert").inner_text()
    watch.expected_status = set()

    page.get_by_label("API key").fill(KEYS[1])
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert page.url == f"{base}/ui/tasks/{ids['ping']}"  # back where the visitor was going
    cookies = {c["name"]: c for c in context.cookies()}
    session = cookies["pgbeat_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert cookies["pgbeat_csrf"]["httpOnly"] and cookies["pgbeat_csrf"]["sameSite"] == "Strict"
    # The key is never in a URL, a page or a cookie.
    assert KEYS[1] not in page.url and KEYS[1] not in page.content()
    assert all(KEYS[1] not in c["value"] for c in cookies.values())

    # Actions work with the session (and its CSRF token)...
    act(page, "Pause")
    assert task_row(db_url, ids["ping"])["paused"] is True
    # ...and not without the token, though the cookies go along.
    refused = page.request.post(f"{base}/ui/tasks/{ids['ping']}/resume", form={"x": "1"})
    assert refused.status == 403
    assert task_row(db_url, ids["ping"])["paused"] is True
    # The session does not open the JSON API.
    assert page.request.get(f"{base}/tasks").status == 401

    with page.expect_navigation():
        page.get_by_role("button", name="Sign out").click()
    assert "/ui/sign-in" in page.url
    page.goto(base + "/ui")
    assert "/ui/sign-in" in page.url
    watch.check()
    context.close()
