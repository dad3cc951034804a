"""The API as a real `pgbeat api` process: HTTP over a socket, API keys from the
environment, concurrent writers, a clean SIGTERM (the OpenAPI contract: test_openapi.py)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import sqlsupport as sql

pytestmark = pytest.mark.slow  # a real api process

KEY = "test-key-123"


async def call(session: aiohttp.ClientSession, method: str, path: str, body=None) -> tuple[int, dict]:
    async with session.request(method, path, json=body) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else {}


def test_real_process_serves_the_api_with_keys_and_stops_cleanly_on_sigterm(fleet):
    proc, base = fleet.start_api(env={"PGBEAT_API_KEYS": f"other,{KEY}"})

    async def scenario() -> None:
        async with aiohttp.ClientSession(base) as anonymous:
            assert (await call(anonymous, "GET", "/tasks"))[0] == 401
            assert (await call(anonymous, "GET", "/health"))[0] == 200
            status, ready = await call(anonymous, "GET", "/ready")
            assert (status, ready["status"]) == (200, "ready")
        async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {KEY}"}) as session:
            body = {"name": "ping", "kind": "sleep", "params": {"seconds": 0}, "schedule": {"every": "30s"}}
            async with session.post("/tasks", json=body) as resp:
                assert resp.status == 201
                assert resp.headers["Location"] == f"/tasks/{(await resp.json())['id']}"
                assert "RateLimit-Limit" in resp.headers
            status, task = await call(session, "GET", resp.headers["Location"])
            assert status == 200 and task["name"] == "ping" and task["next_run_at"].endswith("Z")

    asyncio.run(scenario())
    assert proc.terminate() == 0
    log_lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    assert any(line.get("event") == "api_stopped" for line in log_lines)
    assert not any(line.get("event") == "api_open" for line in log_lines)


def test_open_api_says_so_in_its_log(fleet):
    proc, _ = fleet.start_api()
    assert proc.terminate() == 0
    assert proc.events("api_open")


def test_concurrent_creates_and_patches_leave_consistent_rows(fleet, db_url):
    _, base = fleet.start_api()
    creates, patchers = 120, 4

    async def scenario() -> tuple[list[dict], dict[int, list[dict]]]:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(base, connector=connector) as session:
            targets = []
            for i in range(patchers):
                status, task = await call(
                    session,
                    "POST",
                    "/tasks",
                    {"name": f"target{i}", "kind": "sleep", "schedule": {"every": 60}},
                )
                assert status == 201
                targets.append(task)

            async def create(i: int) -> dict:
                body = {"name": f"task{i}", "kind": "counter", "schedule": {"every": f"{i + 1}s"}}
                status, task = await call(session, "POST", "/tasks", body)
                assert status == 201, task
                return task

            async def patch(task: dict, i: int) -> dict:
                changes = {"name": f"{task['name']}-{i}", "schedule": {"every": 10 + i}, "paused": i % 2 == 0}
                status, changed = await call(session, "PATCH", f"/tasks/{task['id']}", changes)
                assert status == 200, changed
                return changed

            async def trigger(task: dict) -> None:
                status, body = await call(session, "POST", f"/tasks/{task['id']}/trigger")
                assert status == 202, body

            results = await asyncio.gather(
                *(create(i) for i in range(creates)),
                *(patch(t, i) for t in targets for i in range(10)),
                *(trigger(t) for t in targets for _ in range(5)),
            )
        created = results[:creates]
        patches: dict[int, list[dict]] = {}
        for changed in results[creates : creates + patchers * 10]:
            patches.setdefault(changed["id"], []).append(changed)
        return created, patches

    created, patches = asyncio.run(scenario())
    assert len({t["id"] for t in created}) == creates
    with sql.connect(db_url) as conn:
        rows = {r["id"]: r for r in conn.execute("SELECT * FROM pgbeat.api_tasks").fetchall()}
        assert len(rows) == creates + patchers
        for task in created:
            assert rows[task["id"]]["name"] == task["name"]
        for task_id, answers in patches.items():
            row = rows[task_id]
            # The row is what one of the patches returned, whole: never a mix of two.
            state = (row["name"], row["paused"], row["schedule"]["every"])
            assert state in {(a["name"], a["paused"], a["schedule"]["every"]) for a in answers}
            i = int(row["schedule"]["every"].rstrip("s")) - 10
            assert row["name"].endswith(f"-{i}") and row["paused"] == (i % 2 == 0)
        pending = conn.execute(
            "SELECT task_id, count(*) AS n FROM pgbeat.runs WHERE state = 'pending' GROUP BY task_id"
        ).fetchall()
        assert all(p["n"] == 1 for p in pending)
