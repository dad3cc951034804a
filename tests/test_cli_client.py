"""`pgbeat task`, `pgbeat runs` and `pgbeat upcoming` against a live `pgbeat api` process:
their output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sqlsupport as sql

from pgbeat import cli

pytestmark = pytest.mark.slow  # a real api process


@pytest.fixture
def api(fleet, monkeypatch) -> str:
    _, base = fleet.start_api(env={"PGBEAT_API_KEYS": "cli-key"})
    monkeypatch.setenv("PGBEAT_URL", base)
    monkeypatch.setenv("PGBEAT_API_KEY", "cli-key")
    return base


def pgbeat(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def pgbeat_json(capsys, *argv: str):
    code, out, err = pgbeat(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_task_add_show_ls_update_and_rm(api, capsys):
    code, out, _ = pgbeat(
        capsys, "task", "add", "sleep", "--every", "30s", "--param", "seconds=2", "--name", "nap"
    )
    assert code == 0
    assert out.startswith("created task ") and "every 30s" in out and '{"seconds": 2}' in out
    task_id = int(out.split()[2])

    task = pgbeat_json(capsys, "task", "show", str(task_id))
    assert task["params"] == {"seconds": 2} and task["name"] == "nap"  # seconds=2 parsed as JSON

    http = pgbeat_json(
        capsys, "task", "add", "http", "--cron", "*/5 * * * *", "--timezone", "Europe/Berlin",
        "--param", "url=https://example.com/health", "--timeout", "5", "--paused",
    )  # fmt: skip
    assert http["params"]["url"] == "https://example.com/health" and http["paused"] is True
    assert http["schedule"] == {"cron": "*/5 * * * *", "timezone": "Europe/Berlin"} and http["timeout"] == 5
    once = pgbeat_json(capsys, "task", "add", "counter", "--in", "1h30m", "--param", "counter=hits")
    assert once["schedule"]["at"].endswith("Z")
    at = pgbeat_json(capsys, "task", "add", "sleep", "--at", "2031-08-08T17:35:00Z")
    assert at["next_run_at"] == "2031-08-08T17:35:00Z"

    code, out, _ = pgbeat(capsys, "task", "ls")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "NAME", "KIND", "SCHEDULE", "STATUS", "NEXT", "RUN"]
    assert len(lines) == 5 and "cron */5 * * * * (Europe/Berlin)" in out and "paused" in out
    assert [t["id"] for t in pgbeat_json(capsys, "task", "ls", "--status", "paused")] == [http["id"]]
    assert len(pgbeat_json(capsys, "task", "ls", "--limit", "2")) == 2

    updated = pgbeat_json(capsys, "task", "update", str(task_id), "--every", "2m", "--name", "longer-nap")
    assert updated["schedule"]["every"] == "2m" and updated["name"] == "longer-nap"

    code, out, _ = pgbeat(capsys, "task", "rm", str(task_id))
    assert code == 0 and f"deleted task {task_id}" in out
    code, _, err = pgbeat(capsys, "task", "show", str(task_id))
    assert code == 1 and f"task {task_id} not found (HTTP 404)" in err


def test_pause_resume_trigger_runs_and_upcoming(api, capsys, db_url):
    task = pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--param", "seconds=0")
    tid = str(task["id"])
    code, out, _ = pgbeat(capsys, "task", "pause", tid)
    assert code == 0 and f"task {tid} paused" in out
    code, out, _ = pgbeat(capsys, "task", "resume", tid)
    assert code == 0 and f"task {tid} active" in out
    code, out, _ = pgbeat(capsys, "task", "trigger", tid)
    assert code == 0 and "queued for now" in out
    run_id = int(out.split()[3])

    with sql.connect(db_url) as conn:
        sql.claim(conn)
        sql.finish(conn, run_id, "succeeded", {"slept": 0.0})
        sql.release(conn, [task["id"]])

    code, out, _ = pgbeat(capsys, "runs", "--task", tid)
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["ID", "TASK", "STATE", "SCHEDULED"]
    assert row.split()[0] == str(run_id) and "succeeded" in row and '{"slept": 0.0}' in row
    runs = pgbeat_json(capsys, "runs", "--state", "succeeded", "--limit", "5")
    assert [r["id"] for r in runs] == [run_id]

    code, out, _ = pgbeat(capsys, "upcoming", "--limit", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["WHEN", "TASK", "KIND", "SOURCE"] and len(lines) == 4
    upcoming = pgbeat_json(capsys, "upcoming", "--task", tid, "--limit", "2")
    assert [u["task_id"] for u in upcoming] == [task["id"], task["id"]]


def test_runs_follow_prints_runs_as_they_finish(api, capsys, db_url):
    task = pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h")
    run = pgbeat_json(capsys, "task", "trigger", str(task["id"]))
    follower = subprocess.Popen(
        [sys.executable, "-m", "pgbeat.cli", "runs", "--follow", "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = json.loads(_read_json_document(follower))  # the current page
        assert [r["id"] for r in first] == [run["id"]]
        with sql.connect(db_url) as conn:
            sql.claim(conn)
            sql.finish(conn, run["id"], "failed", error="boom")
            sql.release(conn, [task["id"]])
        line = json.loads(follower.stdout.readline())
        assert line["id"] == run["id"] and line["state"] == "failed" and line["error"] == "boom"
    finally:
        follower.terminate()
        follower.wait(10)


def _read_json_document(proc: subprocess.Popen) -> str:
    lines = [proc.stdout.readline()]
    while lines[-1].rstrip() not in ("]", "[]"):
        lines.append(proc.stdout.readline())
    return "".join(lines)


FAILURES = [
    (["task", "add", "sleep", "--every", "-5"], "schedule.every: must be positive (HTTP 422)"),
    (["task", "add", "nope", "--every", "5"], "kind: unknown kind"),
    (["task", "add", "sleep", "--cron", "99 * * * *"], "schedule.cron:"),
    (["task", "add", "sleep", "--at", "2001-01-01T00:00:00Z"], "schedule.at:"),
    (["task", "add", "sleep", "--every", "5", "--param", "seconds=x"], "params.seconds: must be a number"),
    (["task", "pause", "424242"], "task 424242 not found (HTTP 404)"),
    (["runs", "--task", "0"], "HTTP 400"),
]


def test_failures_exit_1_with_the_apis_message(api, capsys):
    for argv, message in FAILURES:
        code, out, err = pgbeat(capsys, *argv)
        assert code == 1 and out == "", argv
        assert err.startswith("pgbeat: ") and message in err, (argv, err)


def test_wrong_key_and_unreachable_api_exit_1(api, capsys, monkeypatch):
    monkeypatch.setenv("PGBEAT_API_KEY", "wrong")
    code, _, err = pgbeat(capsys, "task", "ls")
    assert code == 1 and "invalid API key (HTTP 401)" in err
    code, _, err = pgbeat(capsys, "task", "ls", "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach the pgbeat API at http://127.0.0.1:9" in err


def test_real_exit_code_of_the_console_script(api):
    result = subprocess.run(
        [sys.executable, "-m", "pgbeat.cli", "task", "show", "999999"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "not found" in result.stderr
    result = subprocess.run([sys.executable, "-m", "pgbeat.cli", "task", "ls", "--json"], capture_output=True)
    assert result.returncode == 0 and json.loads(result.stdout) == []
