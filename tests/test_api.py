"""The REST API in-process (Litestar's AsyncTestClient) against a real database:
every endpoint's success path and error paths (README, "REST API")."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import psycopg
import pytest
import sqlsupport as sql
from litestar import Litestar, get
from litestar.testing import AsyncTestClient

from pgbeat import db
from pgbeat.api.app import create_app
from pgbeat.api.creations import TaskCreations
from pgbeat.api.errors import EXCEPTION_HANDLERS
from pgbeat.config import Config

UTC_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
TASK_FIELDS = {
    "id", "name", "kind", "params", "schedule", "timeout", "paused", "next_run_at", "created_at",
    "updated_at",
}  # fmt: skip
RUN_FIELDS = {
    "id", "task_id", "kind", "scheduled_for", "started_at", "finished_at", "state", "attempt", "result",
    "error", "duration_ms", "lateness_ms", "coalesced",
}  # fmt: skip


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(db_url, Config())) as c:
        yield c


def ts(value: str) -> datetime:
    assert UTC_Z.match(value), value
    return datetime.fromisoformat(value)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def create(client: AsyncTestClient, **spec) -> dict:
    body = {"kind": "sleep", "schedule": {"every": "1h"}, **spec}
    resp = await client.post("/tasks", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


# ---------------------------------------------------------------- create


async def test_create_returns_201_location_and_the_task_json(client):
    resp = await client.post(
        "/tasks",
        json={
            "name": "ping",
            "kind": "http",
            "params": {"url": "https://httpbin.org/status/200"},
            "schedule": {"every": "30s"},
            "timeout": 10,
        },
    )
    assert resp.status_code == 201, resp.text
    task = resp.json()
    assert resp.headers["location"] == f"/tasks/{task['id']}"
    assert TASK_FIELDS <= set(task)
    assert task["name"] == "ping" and task["kind"] == "http" and task["timeout"] == 10
    assert task["params"]["url"] == "https://httpbin.org/status/200"
    assert task["schedule"]["every"] == "30s"
    assert task["paused"] is False and task["status"] == "active"
    created, next_run = ts(task["created_at"]), ts(task["next_run_at"])
    assert ts(task["updated_at"]) == created
    assert next_run - created == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("every", "seconds", "shown"),
    [
        ("30s", 30, "30s"),
        ("2m", 120, "2m"),
        ("1h30m", 5400, "1h30m"),
        ("every 2 minutes", 120, "2m"),
        (30, 30, "30s"),
    ],
)
async def test_every_accepts_durations_as_users_write_them(shared_client, every, seconds, shown):
    task = await create(shared_client, schedule={"every": every})
    assert task["schedule"]["every"] == shown
    assert ts(task["next_run_at"]) - ts(task["created_at"]) == timedelta(seconds=seconds)


async def test_at_in_and_cron_schedules(client):
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    task = await create(client, schedule={"at": iso(at)})
    assert ts(task["next_run_at"]) == at and ts(task["schedule"]["at"]) == at

    task = await create(client, schedule={"in": "1h30m45s"})
    assert ts(task["next_run_at"]) - ts(task["created_at"]) == timedelta(seconds=5445)

    task = await create(client, schedule={"cron": "30 9 * * *", "timezone": "Europe/Berlin"})
    assert task["schedule"] == {"cron": "30 9 * * *", "timezone": "Europe/Berlin"}
    nxt = ts(task["next_run_at"])
    assert nxt.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin")).strftime("%H:%M") == "09:30"
    assert timedelta(0) < nxt - datetime.now(UTC) <= timedelta(days=1)

    task = await create(client, schedule={"cron": "* * * * * */15"})  # 6th field: seconds
    assert ts(task["next_run_at"]).second in (0, 15, 30, 45)


async def test_until_and_max_runs_are_kept(client):
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)
    task = await create(client, schedule={"every": "1m"}, until=iso(until), max_runs=5, overlap="skip")
    assert ts(task["until"]) == until and task["max_runs"] == 5 and task["overlap"] == "skip"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"kind": "nope", "schedule": {"every": 5}}, 422, "kind"),
        ({"kind": "sleep", "schedule": {"cron": "61 * * * *"}}, 422, "schedule.cron"),
        ({"kind": "sleep", "schedule": {"cron": "* * *"}}, 422, "schedule.cron"),
        ({"kind": "sleep", "schedule": {"at": "2001-01-01T00:00:00Z"}}, 422, "schedule.at"),
        ({"kind": "sleep", "schedule": {"at": "2031-01-01T00:00:00"}}, 400, "schedule.at"),
        ({"kind": "sleep", "schedule": {"every": -5}}, 422, "schedule.every"),
        ({"kind": "sleep", "schedule": {"every": "soon"}}, 422, "schedule.every"),
        ({"kind": "sleep", "schedule": {"every": 1e300}}, 422, "schedule.every"),
        ({"kind": "sleep", "schedule": {"in": 0}}, 422, "schedule.in"),
        (
            {"kind": "sleep", "schedule": {"cron": "* * * * *", "timezone": "Mars/Olympus"}},
            422,
            "schedule.timezone",
        ),
        ({"kind": "sleep", "schedule": {"every": 5, "cron": "* * * * *"}}, 422, "schedule"),
        ({"kind": "sleep", "schedule": {}}, 422, "schedule"),
        ({"kind": "sleep", "schedule": {"every": 5, "timezone": "UTC"}}, 422, "schedule.timezone"),
        ({"kind": "sleep", "schedule": {"every": 5}, "params": {"seconds": "two"}}, 422, "params.seconds"),
        ({"kind": "sleep", "schedule": {"every": 5}, "params": {"seconds": -1}}, 422, "params.seconds"),
        ({"kind": "http", "schedule": {"every": 5}, "params": {"url": "ftp://x"}}, 422, "params.url"),
        ({"kind": "counter", "schedule": {"every": 5}, "params": {"step": 1.5}}, 422, "params.step"),
        ({"kind": "sleep", "schedule": {"every": 5}, "params": {"nope": 1}}, 422, "params.nope"),
        ({"kind": "sleep", "schedule": {"every": 5}, "timeout": 0}, 422, "timeout"),
        ({"kind": "sleep", "schedule": {"every": 5}, "timeout": "ten"}, 400, "timeout"),
        ({"kind": "sleep", "schedule": {"every": 5}, "name": ""}, 422, "name"),
        ({"kind": "sleep", "schedule": {"every": 5}, "until": "2001-01-01T00:00:00Z"}, 422, "until"),
        ({"kind": "sleep", "schedule": {"every": 5}, "max_runs": 0}, 422, "max_runs"),
        ({"kind": "sleep", "schedule": {"every": 5}, "overlap": "sometimes"}, 400, "overlap"),
        ({"kind": "sleep", "schedule": {"every": 5}, "colour": "red"}, 400, "colour"),
        ({"schedule": {"every": 5}}, 400, "kind"),
        ({"kind": "sleep"}, 400, "schedule"),
        ({"kind": "sleep", "schedule": {"every": 5, "often": True}}, 400, "schedule.often"),
        ({"kind": "sleep", "schedule": {"every": 5}, "max_runs": 10**30}, 422, "max_runs"),
    ],
)
async def test_bad_input_names_the_field_and_writes_nothing(
    shared_client, shared_db_url, body, status, field
):
    with sql.connect(shared_db_url) as conn:
        before = sql.row_counts(conn)
    resp = await shared_client.post("/tasks", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()
    assert error["status_code"] == status
    assert error["field"] == field, error
    assert error["detail"].startswith(field + ":") and len(error["detail"]) > len(field) + 5
    with sql.connect(shared_db_url) as conn:
        assert sql.row_counts(conn) == before


@pytest.mark.parametrize("every", ["100000 days", 1e300, "4000 days"])
async def test_a_duration_has_one_limit_for_the_api_and_psql(shared_client, shared_db_url, every):
    """The API reads the user's text; the range is the database's, whatever the entrance."""
    resp = await shared_client.post("/tasks", json={"kind": "sleep", "schedule": {"every": every}})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"] == "schedule.every: must be at most 10 years"
    seconds = every if isinstance(every, float) else int(every.split()[0]) * 86400
    with sql.connect(shared_db_url) as conn, pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        sql.create_task(conn, {"kind": "sleep", "schedule": {"every": seconds}})
    assert str(refused.value).startswith("schedule.every: must be at most 10 years")


async def test_concurrent_creates_share_transactions_and_each_gets_its_own_answer(db_url):
    """Creations that arrive together are written in shared calls (pgbeat.api.creations):
    the tasks of one call share a transaction, hence a created_at. A spec the database
    refuses fails alone: every other creation of its call still gets its task."""
    pool = await db.create_pool(db_url, max_size=4)
    try:
        creations = TaskCreations(pool)
        specs = [{"name": f"c{i}", "kind": "sleep", "schedule": {"every": 3600}} for i in range(60)]
        rows = await asyncio.gather(*(creations.create(spec, None) for spec in specs))
        assert [r["name"] for r in rows] == [s["name"] for s in specs]
        assert len({r["id"] for r in rows}) == 60
        with sql.connect(db_url) as conn:
            calls = conn.execute("SELECT count(DISTINCT created_at) AS n FROM pgbeat.tasks").fetchone()["n"]
        assert calls <= 3  # at most max_calls (2) in flight, then one for those queued behind them

        specs[17] = {"name": "bad", "kind": "nope", "schedule": {"every": 3600}}
        answers = await asyncio.gather(*(creations.create(s, None) for s in specs), return_exceptions=True)
        assert isinstance(answers[17], asyncpg.InvalidParameterValueError)
        assert answers[17].column_name == "kind"
        others = answers[:17] + answers[18:]
        assert [r["name"] for r in others] == [s["name"] for s in specs[:17] + specs[18:]]
        with sql.connect(db_url) as conn:
            names = [r["name"] for r in conn.execute("SELECT name FROM pgbeat.tasks ORDER BY id")]
        assert len(names) == 119 and "bad" not in names
    finally:
        await pool.close()


async def test_a_call_the_database_cannot_answer_fails_each_of_its_creations(db_url):
    """A lost session is not one spec's fault: every creation of that call gets the
    error, which the API answers with 503 (retry), none hangs, and later calls write."""
    name = "pgbeat-test-lost-session"
    pool = await db.create_pool(db_url, min_size=1, max_size=1, server_settings={"application_name": name})
    try:
        creations = TaskCreations(pool)
        with sql.connect(db_url) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", [name]
            )
        specs = [{"name": f"c{i}", "kind": "sleep", "schedule": {"every": 3600}} for i in range(10)]
        answers = await asyncio.wait_for(
            asyncio.gather(*(creations.create(s, None) for s in specs), return_exceptions=True), 30
        )
        failed = [a for a in answers if isinstance(a, Exception)]
        assert failed and all(isinstance(a, db.CONNECTION_ERRORS) for a in failed)

        @get("/lost", sync_to_thread=False)
        def lost() -> None:
            raise failed[0]

        async with AsyncTestClient(Litestar([lost], exception_handlers=EXCEPTION_HANDLERS)) as app:
            assert (await app.get("/lost")).status_code == 503
        created = [a["name"] for a in answers if not isinstance(a, Exception)]
        assert (await creations.create(specs[0], None))["name"] == "c0"
        with sql.connect(db_url) as conn:
            names = [r["name"] for r in conn.execute("SELECT name FROM pgbeat.tasks ORDER BY id")]
        assert names == [*created, "c0"]
    finally:
        await pool.close()


async def test_malformed_json_and_non_object_bodies_are_400(client):
    resp = await client.post("/tasks", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["status_code"] == 400
    resp = await client.post("/tasks", json=[1, 2])
    assert resp.status_code == 400


async def test_oversized_body_is_413(client):
    resp = await client.post(
        "/tasks", json={"kind": "sleep", "schedule": {"every": 5}, "name": "x" * 200_000}
    )
    assert resp.status_code == 413
    assert resp.json()["status_code"] == 413


# ---------------------------------------------------------------- read one


async def test_get_task_with_last_run_and_pending_run(client, db_url):
    task = await create(client, schedule={"every": "1h"}, params={"seconds": 0})
    resp = await client.get(f"/tasks/{task['id']}")
    assert resp.status_code == 200
    body = resp.json()
    assert body["last_run"] is None and body["pending_run"] is None
    assert {k: body[k] for k in TASK_FIELDS} == {k: task[k] for k in TASK_FIELDS}

    first = (await client.post(f"/tasks/{task['id']}/trigger")).json()
    with sql.connect(db_url) as conn:
        (claimed,) = sql.claim(conn)
        assert claimed["run_id"] == first["id"] if "run_id" in claimed else claimed["id"] == first["id"]
        sql.finish(conn, first["id"], "succeeded", {"slept": 0.0})
        sql.release(conn, [task["id"]])
    second = (await client.post(f"/tasks/{task['id']}/trigger")).json()

    body = (await client.get(f"/tasks/{task['id']}")).json()
    assert body["last_run"]["id"] == first["id"] and body["last_run"]["state"] == "succeeded"
    assert body["last_run"]["result"] == {"slept": 0.0}
    assert body["last_run"]["duration_ms"] >= 0 and body["last_run"]["lateness_ms"] >= 0
    ts(body["last_run"]["started_at"]), ts(body["last_run"]["finished_at"])
    assert body["pending_run"]["id"] == second["id"] and body["pending_run"]["state"] == "pending"


async def test_unknown_tasks_are_404_and_deleted_ones_readable_but_409_to_change(client):
    assert (await client.get("/tasks/999999")).status_code == 404
    task = await create(client)
    tid = task["id"]
    assert (await client.delete(f"/tasks/{tid}")).status_code == 204
    for method, path in [
        ("PATCH", "/tasks/999999"),
        ("DELETE", "/tasks/999999"),
        ("POST", "/tasks/999999/pause"),
        ("POST", "/tasks/999999/resume"),
        ("POST", "/tasks/999999/trigger"),
        ("GET", "/tasks/999999/upcoming"),
        ("GET", "/tasks/999999/runs"),
        ("GET", "/runs?task_id=999999"),
        ("GET", "/runs/999999"),
        ("GET", "/tasks/2147483647"),
    ]:
        resp = await client.request(method, path, json={"name": "x"} if method == "PATCH" else None)
        assert resp.status_code == 404, (method, path, resp.text)
        assert "not found" in resp.json()["detail"]
    # A deleted task: its record and history stay readable...
    shown = await client.get(f"/tasks/{tid}")
    assert shown.status_code == 200 and shown.json()["status"] == "deleted"
    assert (await client.get(f"/tasks/{tid}/runs")).json()["items"] == []
    assert (await client.get("/runs", params={"task_id": tid})).json()["items"] == []
    assert (await client.get(f"/tasks/{tid}/upcoming")).json()["items"] == []
    # ...and it is never changed.
    for method, path in [
        ("PATCH", f"/tasks/{tid}"),
        ("DELETE", f"/tasks/{tid}"),
        ("POST", f"/tasks/{tid}/pause"),
        ("POST", f"/tasks/{tid}/resume"),
        ("POST", f"/tasks/{tid}/trigger"),
    ]:
        resp = await client.request(method, path, json={"name": "x"} if method == "PATCH" else None)
        assert resp.status_code == 409, (method, path, resp.text)
        assert f"task {tid} is deleted" in resp.json()["detail"]


@pytest.mark.parametrize("path", ["/tasks/0", "/tasks/-1", "/tasks/2147483648", "/tasks/abc", "/runs/0"])
async def test_ids_out_of_range_are_client_errors(shared_client, path):
    resp = await shared_client.get(path)
    assert resp.status_code in (400, 404), resp.text


# ---------------------------------------------------------------- change


async def test_patch_changes_only_the_given_fields(client):
    task = await create(client, name="before", params={"seconds": 1}, timeout=30)
    resp = await client.patch(f"/tasks/{task['id']}", json={"name": "after", "params": {"seconds": 2}})
    assert resp.status_code == 200, resp.text
    changed = resp.json()
    assert changed["name"] == "after" and changed["params"] == {"seconds": 2}
    assert changed["timeout"] == 30 and changed["schedule"] == task["schedule"]
    assert changed["next_run_at"] == task["next_run_at"]
    assert ts(changed["updated_at"]) > ts(task["updated_at"])

    changed = (
        await client.patch(f"/tasks/{task['id']}", json={"schedule": {"every": "5m"}, "timeout": 5})
    ).json()
    assert changed["schedule"]["every"] == "5m" and changed["timeout"] == 5
    assert ts(changed["next_run_at"]) - ts(changed["updated_at"]) == timedelta(minutes=5)

    cron = (await client.patch(f"/tasks/{task['id']}", json={"schedule": {"cron": "0 0 1 1 *"}})).json()
    assert cron["schedule"] == {"cron": "0 0 1 1 *", "timezone": "UTC"}
    assert ts(cron["next_run_at"]).strftime("%m-%d %H:%M") == "01-01 00:00"


async def test_patch_null_clears_until_and_max_runs(client):
    until = iso(datetime.now(UTC) + timedelta(days=1))
    task = await create(client, until=until, max_runs=3)
    cleared = (await client.patch(f"/tasks/{task['id']}", json={"until": None, "max_runs": None})).json()
    assert cleared["until"] is None and cleared["max_runs"] is None


@pytest.mark.parametrize(
    ("changes", "status", "field"),
    [
        ({"kind": "http"}, 422, "kind"),
        ({"schedule": {"every": 0}}, 422, "schedule.every"),
        ({"schedule": {"cron": "not cron at all"}}, 422, "schedule.cron"),
        ({"params": {"seconds": "x"}}, 422, "params.seconds"),
        ({"paused": "yes"}, 400, "paused"),
        ({"unknown": 1}, 400, "unknown"),
    ],
)
async def test_patch_bad_input_changes_nothing(shared_client, changes, status, field):
    task = await create(shared_client)
    resp = await shared_client.patch(f"/tasks/{task['id']}", json=changes)
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field
    after = (await shared_client.get(f"/tasks/{task['id']}")).json()
    assert {k: after[k] for k in TASK_FIELDS} == {k: task[k] for k in TASK_FIELDS}


async def test_pause_resume_and_paused_patch(client, db_url):
    task = await create(client, schedule={"every": "1h"})
    run = (await client.post(f"/tasks/{task['id']}/trigger")).json()
    paused = await client.post(f"/tasks/{task['id']}/pause")
    assert paused.status_code == 200 and paused.json()["paused"] and paused.json()["status"] == "paused"
    assert (await client.get(f"/runs/{run['id']}")).json()["state"] == "cancelled"

    resumed = await client.post(f"/tasks/{task['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "active"
    assert resumed.json()["next_run_at"] == task["next_run_at"]

    patched = (await client.patch(f"/tasks/{task['id']}", json={"paused": True})).json()
    assert patched["paused"] is True
    patched = (await client.patch(f"/tasks/{task['id']}", json={"paused": False})).json()
    assert patched["paused"] is False

    created_paused = await create(client, paused=True)
    assert created_paused["status"] == "paused"


async def test_resuming_a_cron_task_after_its_slot_passed_moves_to_the_next_slot(client, db_url):
    task = await create(client, schedule={"cron": "*/5 * * * *"})
    await client.post(f"/tasks/{task['id']}/pause")
    with sql.connect(db_url) as conn:
        conn.execute(
            "UPDATE pgbeat.tasks SET next_run_at = now() - interval '1 hour' WHERE id = %s", (task["id"],)
        )
    resumed = (await client.post(f"/tasks/{task['id']}/resume")).json()
    nxt = ts(resumed["next_run_at"])
    assert nxt > datetime.now(UTC) and nxt.minute % 5 == 0 and nxt.second == 0
    await client.post(f"/tasks/{task['id']}/pause")
    with sql.connect(db_url) as conn:
        conn.execute(
            "UPDATE pgbeat.tasks SET next_run_at = now() - interval '1 hour' WHERE id = %s", (task["id"],)
        )
    patched = (await client.patch(f"/tasks/{task['id']}", json={"paused": False})).json()
    assert ts(patched["next_run_at"]) > datetime.now(UTC)


async def test_trigger_returns_202_and_the_pending_run(client):
    task = await create(client)
    resp = await client.post(f"/tasks/{task['id']}/trigger")
    assert resp.status_code == 202, resp.text
    run = resp.json()
    assert RUN_FIELDS <= set(run)
    assert run["task_id"] == task["id"] and run["state"] == "pending" and run["kind"] == "sleep"
    again = (await client.post(f"/tasks/{task['id']}/trigger")).json()
    assert again["id"] == run["id"]  # one pending run per task (Rule 3)


async def test_delete_is_204_future_runs_stop_and_history_stays(client):
    task = await create(client)
    run = (await client.post(f"/tasks/{task['id']}/trigger")).json()
    resp = await client.delete(f"/tasks/{task['id']}")
    assert resp.status_code == 204 and resp.content == b""
    history = (await client.get(f"/tasks/{task['id']}/runs")).json()
    assert [r["id"] for r in history["items"]] == [run["id"]]
    assert history["items"][0]["state"] == "cancelled"
    assert (await client.get(f"/runs/{run['id']}")).status_code == 200
    listed = (await client.get("/tasks")).json()["items"]
    assert task["id"] not in [t["id"] for t in listed]
    deleted = (await client.get("/tasks", params={"status": "deleted"})).json()["items"]
    assert [t["id"] for t in deleted] == [task["id"]]


@pytest.mark.parametrize(
    "bad",
    [
        {"schedule": {"every": 0.001}},
        {"schedule": {"cron": "61 * * * *"}},
        {"timeout": 0},
        {"params": {"seconds": "abc"}},
    ],
    ids=lambda v: str(v)[:40],
)
async def test_a_refused_change_writes_none_of_its_valid_fields(client, db_url, bad):
    """Rule 10: a change refused for one field writes nothing, not even the valid fields
    sent beside it (here a new name): the whole input is checked before any write."""
    task = await create(client, name="before")
    with sql.connect(db_url) as conn:
        before = sql.row_counts(conn)
    resp = await client.patch(f"/tasks/{task['id']}", json={"name": "after", **bad})
    assert resp.status_code == 422, resp.text
    with sql.connect(db_url) as conn:
        assert sql.row_counts(conn) == before
    assert (await client.get(f"/tasks/{task['id']}")).json()["name"] == "before"


# ---------------------------------------------------------------- lists


async def test_list_tasks_filters(client):
    a = await create(client, name="alpha-one", kind="sleep")
    b = await create(client, name="Beta", kind="counter", paused=True)
    c = await create(client, name="alpha-two", kind="http")

    async def ids(**params) -> list[int]:
        resp = await client.get("/tasks", params=params)
        assert resp.status_code == 200, resp.text
        return [t["id"] for t in resp.json()["items"]]

    assert await ids() == [a["id"], b["id"], c["id"]]
    assert await ids(kind="counter") == [b["id"]]
    assert await ids(status="paused") == [b["id"]]
    assert await ids(paused="false") == [a["id"], c["id"]]
    assert await ids(name="ALPHA") == [a["id"], c["id"]]
    assert await ids(status="complete") == []


async def test_list_tasks_keyset_pagination_is_stable_under_concurrent_inserts(client):
    created = [await create(client, name=f"t{i}") for i in range(7)]
    page = (await client.get("/tasks", params={"limit": 3})).json()
    seen = [t["id"] for t in page["items"]]
    assert seen == [t["id"] for t in created[:3]] and page["next_cursor"]
    late = [await create(client, name=f"late{i}") for i in range(2)]  # inserted between pages
    await client.delete(f"/tasks/{created[1]['id']}")  # and one already seen goes away
    while page["next_cursor"]:
        page = (await client.get("/tasks", params={"limit": 3, "cursor": page["next_cursor"]})).json()
        seen += [t["id"] for t in page["items"]]
    assert seen == [t["id"] for t in created + late]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "-5"}, "cursor"),
        ({"status": "sleeping"}, "status"),
    ],
)
async def test_list_tasks_bad_parameters_are_400(shared_client, params, field):
    resp = await shared_client.get("/tasks", params=params)
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field


async def test_list_runs_newest_first_with_filters_and_pagination(client, db_url):
    sleeper = await create(client, kind="sleep")
    counter = await create(client, kind="counter")
    with sql.connect(db_url) as conn:
        conn.execute(
            """INSERT INTO pgbeat.runs (task_id, kind, scheduled_for, due_at, state, started_at, finished_at)
               SELECT t.id, t.kind, now() - make_interval(mins => g), now() - make_interval(mins => g),
                      CASE WHEN g % 2 = 0 THEN 'succeeded' ELSE 'failed' END,
                      now() - make_interval(mins => g), now() - make_interval(mins => g)
                 FROM pgbeat.tasks t, generate_series(10, 1, -1) g"""
        )
    everything = (await client.get("/runs", params={"limit": 500})).json()
    ids = [r["id"] for r in everything["items"]]
    assert len(ids) == 20 and ids == sorted(ids, reverse=True) and everything["next_cursor"] is None

    pages, cursor = [], None
    while True:
        page = (
            await client.get("/runs", params={"limit": 6, **({"cursor": cursor} if cursor else {})})
        ).json()
        pages += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == ids

    async def runs(**params) -> list[dict]:
        resp = await client.get("/runs", params=params)
        assert resp.status_code == 200, resp.text
        return resp.json()["items"]

    assert {r["task_id"] for r in await runs(task_id=counter["id"])} == {counter["id"]}
    assert len(await runs(task_id=counter["id"])) == 10
    assert {r["state"] for r in await runs(state="failed")} == {"failed"}
    assert {r["kind"] for r in await runs(kind="sleep")} == {"sleep"}
    since = iso(datetime.now(UTC) - timedelta(minutes=3, seconds=30))
    recent = await runs(since=since)
    assert len(recent) == 6 and all(ts(r["scheduled_for"]) >= ts(since) for r in recent)
    older = await runs(until=since, task_id=sleeper["id"])
    assert len(older) == 7
    one = (await client.get(f"/tasks/{sleeper['id']}/runs", params={"state": "succeeded", "limit": 2})).json()
    assert len(one["items"]) == 2 and one["next_cursor"]
    assert all(r["task_id"] == sleeper["id"] and r["state"] == "succeeded" for r in one["items"])
    assert (await client.get("/runs", params={"state": "sleeping"})).status_code == 400


async def test_get_run(client):
    task = await create(client)
    run = (await client.post(f"/tasks/{task['id']}/trigger")).json()
    resp = await client.get(f"/runs/{run['id']}")
    assert resp.status_code == 200 and resp.json() == run
    assert RUN_FIELDS <= set(run)
    ts(run["scheduled_for"])


# ---------------------------------------------------------------- upcoming


async def test_upcoming_across_tasks_soonest_first(client):
    every = await create(client, name="every", schedule={"every": "10m"})
    cron = await create(client, name="cron", schedule={"cron": "0 * * * *"})
    once = await create(client, name="once", schedule={"in": "25m"})
    capped = await create(client, name="capped", schedule={"every": "7m"}, max_runs=2)
    until = iso(datetime.now(UTC) + timedelta(minutes=31))
    bounded = await create(client, name="bounded", schedule={"every": "15m"}, until=until)
    await create(client, name="paused", schedule={"every": "1m"}, paused=True)
    run = (await client.post(f"/tasks/{once['id']}/trigger")).json()

    resp = await client.get("/upcoming", params={"limit": 40})
    assert resp.status_code == 200, resp.text
    items = resp.json()["items"]
    times = [ts(u["scheduled_for"]) for u in items]
    assert times == sorted(times) and len(items) == 40
    by_task: dict[str, list[datetime]] = {}
    for u in items:
        by_task.setdefault(u["task_name"], []).append(ts(u["scheduled_for"]))
    assert "paused" not in by_task
    assert items[0]["source"] == "pending" and items[0]["run_id"] == run["id"]
    assert len(by_task["capped"]) == 2 and by_task["capped"][1] - by_task["capped"][0] == timedelta(minutes=7)
    assert len(by_task["bounded"]) == 2  # +15m and +30m; +45m is after until
    assert by_task["once"][-1] == ts(once["next_run_at"]) and len(by_task["once"]) == 2
    steps = {b - a for a, b in itertools.pairwise(by_task["every"])}
    assert steps == {timedelta(minutes=10)}
    assert all(t.minute == 0 and t.second == 0 for t in by_task["cron"])
    assert by_task["every"][0] == ts(every["next_run_at"]) and by_task["cron"][0] == ts(cron["next_run_at"])
    assert by_task["bounded"][0] == ts(bounded["next_run_at"]) and by_task["capped"][0] == ts(
        capped["next_run_at"]
    )

    soon = iso(datetime.now(UTC) + timedelta(minutes=21))
    limited = (await client.get("/upcoming", params={"limit": 500, "until": soon})).json()["items"]
    assert limited and all(ts(u["scheduled_for"]) <= ts(soon) for u in limited)
    assert (await client.get("/upcoming", params={"limit": 0})).status_code == 400


async def test_task_upcoming(client):
    task = await create(client, schedule={"cron": "*/10 * * * *", "timezone": "America/New_York"})
    resp = await client.get(f"/tasks/{task['id']}/upcoming", params={"count": 5})
    assert resp.status_code == 200
    times = [ts(u["scheduled_for"]) for u in resp.json()["items"]]
    assert len(times) == 5 and {b - a for a, b in itertools.pairwise(times)} == {timedelta(minutes=10)}
    assert (await client.get("/tasks/999999/upcoming")).status_code == 404
    assert (await client.get(f"/tasks/{task['id']}/upcoming", params={"count": 501})).status_code == 400


# ---------------------------------------------------------------- operations


async def test_health_ready_metrics_and_schema(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"

    await create(client)
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'pgbeat_tasks{status="active"} 1.0' in text
    for name in (
        "pgbeat_runs_pending ",
        "pgbeat_runs_running ",
        'pgbeat_runs_finished_recent{state="succeeded"}',
        'pgbeat_daemons_live{role="worker"}',
        "pgbeat_database_up 1.0",
        "pgbeat_api_requests_total",
    ):
        assert name in text, name

    schema = (await client.get("/schema/openapi.json")).json()
    assert {"/tasks", "/tasks/{task_id}", "/runs", "/runs/{run_id}", "/upcoming", "/health", "/ready"} <= set(
        schema["paths"]
    )


async def test_ready_is_503_while_migrations_are_pending(client, monkeypatch):
    from pgbeat import migrations

    monkeypatch.setattr(migrations, "pending", lambda url: ["0099_future"])
    client.app.state.schema_check.pending = None  # forget the cached answer
    client.app.state.schema_check.checked_at = 0
    resp = await client.get("/ready")
    assert resp.status_code == 503
    assert resp.json() == {
        "status": "not ready",
        "detail": "migrations pending (run pgbeat migrate)",
        "pending_migrations": ["0099_future"],
    }


# ---------------------------------------------------------------- auth and rate limit


async def test_api_keys(db_url, caplog):
    app = create_app(db_url, Config(api_keys=("first-key", "second-key")))
    async with AsyncTestClient(app) as c:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"X-API-Key": "wrong"},
            {"Authorization": "Basic x"},
        ):
            resp = await c.get("/tasks", headers=headers)
            assert resp.status_code == 401, headers
            assert resp.json()["status_code"] == 401 and "API key" in resp.json()["detail"]
        assert (await c.get("/tasks", headers={"Authorization": "Bearer first-key"})).status_code == 200
        assert (await c.get("/tasks", headers={"X-API-Key": "second-key"})).status_code == 200
        assert (
            await c.get("/tasks", headers={"X-API-Key": "s\u00e9cond".encode("latin-1")})
        ).status_code == 401
        for open_path in ("/health", "/ready", "/metrics", "/schema/openapi.json"):
            assert (await c.get(open_path)).status_code == 200, open_path
    assert "API is open" not in caplog.text


async def test_open_api_warns_at_startup(db_url, caplog):
    async with AsyncTestClient(create_app(db_url, Config())) as c:
        assert (await c.get("/tasks")).status_code == 200
    assert "PGBEAT_API_KEYS is not set" in caplog.text


async def test_rate_limit_per_key_is_429_with_standard_headers(db_url):
    app = create_app(db_url, Config(api_keys=("a", "b"), rate_limit_per_minute=3))
    async with AsyncTestClient(app) as c:
        for _ in range(3):
            ok = await c.get("/tasks", headers={"X-API-Key": "a"})
            assert ok.status_code == 200
            assert ok.headers["RateLimit-Limit"] == "3"
        limited = await c.get("/tasks", headers={"X-API-Key": "a"})
        assert limited.status_code == 429
        assert limited.headers["RateLimit-Remaining"] == "0" and int(limited.headers["RateLimit-Reset"]) > 0
        assert limited.json()["status_code"] == 429
        assert (await c.get("/tasks", headers={"X-API-Key": "b"})).status_code == 200  # per key
        assert (await c.get("/health")).status_code == 200  # probes are not limited


async def test_query_parameters_are_what_the_schema_says(client):
    """Times need an offset (as in bodies), "null" is no value, ids and cursors past
    the columns' range name nothing rather than fail."""
    for params in (
        {"since": "2026-11-23T00:00:00"},  # naive: whose clock?
        {"until": "0.5"},  # msgspec alone would read 1970
        {"since": "2026-13-01T00:00:00Z"},
        {"state": "null"},
        {"kind": "null"},
        {"task_id": "null"},
        {"kind": "ftp"},
    ):
        resp = await client.get("/runs", params=params)
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["field"] == next(iter(params)), resp.text
    assert (await client.get("/upcoming", params={"until": "2026-11-24"})).status_code == 400
    for moment in ("2026-11-23T10:00:00+02:00", "2026-11-23t10:00:00.123456789z", "2016-12-31T23:59:60Z"):
        assert (await client.get("/runs", params={"since": moment})).status_code == 200, moment
    assert (await client.get("/tasks", params={"name": "null"})).status_code == 200  # text may say null
    assert (await client.get("/runs", params={"task_id": 2**40})).status_code == 404  # never existed
    for cursor in ("1e3", str(2**63), "0", "-1"):
        assert (await client.get("/runs", params={"cursor": cursor})).status_code == 400, cursor
    assert (await client.get(f"/runs/{2**63}")).status_code == 404
    assert (await client.get(f"/tasks/{2**31}/runs")).status_code == 404


async def test_cron_slots_follow_the_database_clock_when_the_api_host_lags(client, db_url, monkeypatch):
    """Rule 7: the stored functions refuse a first cron slot already past on the
    database's clock, so the API computes the slot it writes from that clock: a host
    whose clock is an hour behind still creates, reschedules and resumes every-second
    cron tasks, on their next slot."""
    import pgbeat.api.routes as routes

    class LaggingClock(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return datetime.now(tz) - timedelta(hours=1)

    monkeypatch.setattr(routes, "datetime", LaggingClock)
    every_second = {"cron": "* * * * * *"}

    def database_now() -> datetime:
        with sql.connect(db_url) as conn:
            return conn.execute("SELECT now() AS now").fetchone()["now"]

    before = database_now()
    task = await create(client, schedule=every_second)
    assert before < ts(task["next_run_at"]) <= database_now() + timedelta(seconds=1)
    assert (await client.post(f"/tasks/{task['id']}/pause")).status_code == 200
    resumed = await client.post(f"/tasks/{task['id']}/resume")
    assert resumed.status_code == 200, resumed.text
    assert ts(resumed.json()["next_run_at"]) > before
    changed = await client.patch(f"/tasks/{task['id']}", json={"schedule": {"cron": "*/2 * * * * *"}})
    assert changed.status_code == 200, changed.text
    assert ts(changed.json()["next_run_at"]) > before
