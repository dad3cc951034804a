"""The client commands (`pgbeat task`, `runs`, `upcoming`, `status`, `completion`)
against a live `pgbeat api` process: output, --json, usage errors (exit 2), request
failures (exit 1), follow mode, pipes, and a real pseudo-terminal for colour."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pexpect
import pytest
import sqlsupport as sql

from pgbeat import __version__, cli

ESC = "\x1b["
pytestmark = pytest.mark.slow  # a real api process per test

pytestmark = pytest.mark.slow  # a real api process


@pytest.fixture
def api(fleet, monkeypatch) -> str:
    _, base = fleet.start_api(env={"PGBEAT_API_KEYS": "cli-key"})
    monkeypatch.setenv("PGBEAT_URL", base)
    monkeypatch.setenv("PGBEAT_API_KEY", "cli-key")
    monkeypatch.delenv("NO_COLOR", raising=False)
    return base


def pgbeat(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def pgbeat_json(capsys, *argv: str):
    """The --json output: one object, or a list of the objects printed one per line."""
    code, out, err = pgbeat(capsys, *argv, "--json")
    assert code == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    assert all(line.startswith("{") for line in out.splitlines()), out
    return objects


def one(objects: list):
    assert len(objects) == 1, objects
    return objects[0]


def command(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgbeat.cli", *argv], capture_output=True, text=True, **kw)


# ---------------------------------------------------------------- every API capability


def test_task_add_show_ls_update_and_rm(api, capsys):
    code, out, _ = pgbeat(
        capsys, "task", "add", "sleep", "--every", "30s", "--param", "seconds=2", "--name", "nap"
    )
    assert code == 0
    assert out.startswith("created task ") and "every 30s" in out and '{"seconds": 2}' in out
    task_id = int(out.split()[2])

    task = one(pgbeat_json(capsys, "task", "show", str(task_id)))
    assert task["params"] == {"seconds": 2} and task["name"] == "nap"  # seconds=2 parsed as JSON

    http = one(pgbeat_json(
        capsys, "task", "add", "http", "--cron", "*/5 * * * *", "--timezone", "Europe/Berlin",
        "--param", "url=https://example.com/health", "--timeout", "5", "--paused",
        "--max-retries", "3", "--retry-backoff", "2.5", "--misfire", "skip", "--misfire-grace", "30",
        "--overlap", "skip", "--max-runs", "9", "--until", "2031-01-01T00:00:00Z",
    ))  # fmt: skip
    assert http["params"]["url"] == "https://example.com/health" and http["paused"] is True
    assert http["schedule"] == {"cron": "*/5 * * * *", "timezone": "Europe/Berlin"} and http["timeout"] == 5
    assert (http["max_retries"], http["retry_backoff"], http["misfire"], http["overlap"]) == (
        3,
        2.5,
        "skip",
        "skip",
    )
    assert http["max_runs"] == 9 and http["until"] == "2031-01-01T00:00:00Z"
    once = one(pgbeat_json(capsys, "task", "add", "counter", "--in", "1h30m", "--param", 'counter="2024"'))
    assert once["schedule"]["at"].endswith("Z") and once["params"]["counter"] == "2024"
    at = one(pgbeat_json(capsys, "task", "add", "sleep", "--at", "2031-08-08T17:35:00Z"))
    assert at["next_run_at"] == "2031-08-08T17:35:00Z"
    grid = one(
        pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--start", "2031-01-01T00:00:00Z")
    )
    assert grid["schedule"]["start"] == "2031-01-01T00:00:00Z"

    code, out, _ = pgbeat(capsys, "task", "ls")
    lines = out.splitlines()
    assert code == 0 and re.split(r"\s{2,}", lines[0]) == [
        "ID", "NAME", "KIND", "SCHEDULE", "STATUS", "NEXT RUN", "LAST RUN", "LAST STATE"
    ]  # fmt: skip
    assert len(lines) == 6 and "cron */5 * * * * (Europe/Berlin)" in out and "paused" in out
    assert [t["id"] for t in pgbeat_json(capsys, "task", "ls", "--status", "paused")] == [http["id"]]
    assert [t["id"] for t in pgbeat_json(capsys, "task", "ls", "--paused", "true")] == [http["id"]]
    assert len(pgbeat_json(capsys, "task", "ls", "--limit", "2")) == 2
    assert [t["id"] for t in pgbeat_json(capsys, "task", "ls", "--kind", "http")] == [http["id"]]

    updated = one(
        pgbeat_json(capsys, "task", "update", str(task_id), "--every", "2m", "--name", "longer-nap")
    )
    assert updated["schedule"]["every"] == "2m" and updated["name"] == "longer-nap"
    cleared = one(
        pgbeat_json(capsys, "task", "update", str(http["id"]), "--max-runs", "none", "--until", "none")
    )
    assert cleared["max_runs"] is None and cleared["until"] is None
    # --timezone alone moves the task's own cron expression to that zone.
    moved = one(pgbeat_json(capsys, "task", "update", str(http["id"]), "--timezone", "Asia/Tokyo"))
    assert moved["schedule"] == {"cron": "*/5 * * * *", "timezone": "Asia/Tokyo"}

    code, out, _ = pgbeat(capsys, "task", "rm", str(task_id))
    assert code == 0 and f"deleted task {task_id}" in out
    code, out, _ = pgbeat(capsys, "task", "rm", str(grid["id"]), "--json")
    assert code == 0 and out == ""  # the API answers 204 No Content: --json prints nothing


def test_pause_resume_trigger_runs_and_upcoming(api, capsys, db_url):
    task = one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--param", "seconds=0"))
    tid = str(task["id"])
    code, out, _ = pgbeat(capsys, "task", "pause", tid)
    assert code == 0 and f"task {tid} paused" in out
    code, out, _ = pgbeat(capsys, "task", "resume", tid)
    assert code == 0 and f"task {tid} active" in out
    code, out, _ = pgbeat(capsys, "task", "trigger", tid)
    assert code == 0 and "queued for now" in out
    run_id = int(out.split()[3])

    long_result = {"status": 200, "response_ms": 12.5, "bytes": 1234, "url": "http://127.0.0.1/" + "x" * 80}
    with sql.connect(db_url) as conn:
        sql.claim(conn)
        sql.finish(conn, run_id, "succeeded", long_result)
        sql.release(conn, [task["id"]])

    code, out, _ = pgbeat(capsys, "runs", "--task", tid)
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["ID", "TASK", "STATE", "SCHEDULED"]
    assert row.split()[0] == str(run_id) and "succeeded" in row and row.endswith("…")
    # `runs show` prints the run whole: the result is not cut.
    code, out, _ = pgbeat(capsys, "runs", "show", str(run_id))
    assert code == 0 and "x" * 80 in out and '"status": 200' in out and "state          succeeded" in out
    assert one(pgbeat_json(capsys, "runs", "show", str(run_id)))["result"] == long_result
    runs = pgbeat_json(capsys, "runs", "--state", "succeeded", "--limit", "5")
    assert [r["id"] for r in runs] == [run_id]
    scheduled = runs[0]["scheduled_for"]
    assert [r["id"] for r in pgbeat_json(capsys, "runs", "--since", scheduled)] == [run_id]
    assert pgbeat_json(capsys, "runs", "--until", scheduled) == []

    code, out, _ = pgbeat(capsys, "upcoming", "--limit", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["WHEN", "TASK", "KIND", "SOURCE"] and len(lines) == 4
    upcoming = pgbeat_json(capsys, "upcoming", "--task", tid, "--limit", "2")
    assert [u["task_id"] for u in upcoming] == [task["id"], task["id"]]


# ---------------------------------------------------------------- follow


def _finish_all(db_url: str, count: int) -> list[int]:
    with sql.connect(db_url) as conn:
        claimed = sql.claim(conn, limit=count)
        for run in claimed:
            sql.finish(conn, run["run_id"], "succeeded", {"n": run["run_id"]})
        sql.release(conn, [run["task_id"] for run in claimed])
    return [run["run_id"] for run in claimed]


def test_runs_follow_never_drops_or_repeats_a_run(api, capsys, db_url):
    tasks = [one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h")) for _ in range(26)]
    earlier = [one(pgbeat_json(capsys, "task", "trigger", str(t["id"])))["id"] for t in tasks[:2]]
    finished_before = _finish_all(db_url, 2)
    assert sorted(finished_before) == sorted(earlier)
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgbeat.cli",
            "runs",
            "--follow",
            "--json",
            "--limit",
            "5",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        shown = [json.loads(follower.stdout.readline())["id"] for _ in range(2)]  # the finished ones
        assert shown == sorted(finished_before)
        # 24 runs fall due together and wait; more than --limit finish between two polls,
        # first while more than 20 are unfinished (re-read by paging), then fewer (by id).
        queued = [one(pgbeat_json(capsys, "task", "trigger", str(t["id"])))["id"] for t in tasks[2:]]
        time.sleep(0.5)  # the follower sees them pending first
        finished = _finish_all(db_url, 12)
        lines = [json.loads(follower.stdout.readline()) for _ in range(12)]
        assert sorted(run["id"] for run in lines) == sorted(finished)
        finished += _finish_all(db_url, 12)
        assert sorted(finished) == sorted(queued)
        lines += [json.loads(follower.stdout.readline()) for _ in range(12)]
        assert sorted(run["id"] for run in lines) == sorted(queued)
        assert all(run["state"] == "succeeded" and set(run) >= {"id", "task_id", "result"} for run in lines)
        # And nothing else follows: one more run is the next line.
        extra = one(pgbeat_json(capsys, "task", "trigger", str(tasks[0]["id"])))["id"]
        _finish_all(db_url, 1)
        assert json.loads(follower.stdout.readline())["id"] == extra
    finally:
        follower.terminate()
        follower.wait(10)


def test_follow_lines_are_aligned_with_the_header(api, capsys, db_url):
    tasks = [
        one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--name", name))
        for name in ("a", "a-much-longer-task-name")
    ]
    for task in tasks:
        pgbeat(capsys, "task", "trigger", str(task["id"]))
    _finish_all(db_url, 2)
    result = command("runs", "--follow", "--follow-for", "0.1", "--interval", "0.05")
    header, *lines = result.stdout.splitlines()
    assert len(lines) == 2 and ESC not in result.stdout
    for name in ("STATE", "SCHEDULED", "DURATION", "OUTCOME"):
        column = header.index(name)
        assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines), (name, lines)


# ---------------------------------------------------------------- usage errors


def test_usage_errors_exit_2_with_the_commands_usage(api, capsys):
    code, _, err = pgbeat(capsys, "task", "add", "sleep", "--evry", "30s")
    assert code == 2 and "unknown option --evry (did you mean --every?)" in err
    assert err.startswith("usage: pgbeat task add")
    code, _, err = pgbeat(capsys, "task", "ls", "--bogus")
    assert code == 2 and err.startswith("usage: pgbeat task ls") and "unknown option --bogus" in err
    code, _, err = pgbeat(capsys, "task", "update", "1", "--paused", "maybe")
    assert code == 2 and "'maybe' is not a boolean (use true or false)" in err
    code, _, err = pgbeat(capsys, "task", "update", "1")
    assert code == 2 and "nothing to change" in err and err.startswith("usage: pgbeat task update")
    code, _, err = pgbeat(capsys, "task", "add", "sleep")
    assert code == 2 and "one of the arguments --every --at --in --cron is required" in err
    code, _, err = pgbeat(capsys, "task", "add", "sleep", "--every", "1h", "--max-runs", "many")
    assert code == 2 and "'many' is not a whole number (or none)" in err


def test_json_before_or_after_the_command_and_url_without_scheme(api, capsys, monkeypatch):
    pgbeat(capsys, "task", "add", "sleep", "--every", "1h")
    before = pgbeat(capsys, "--json", "task", "ls")
    after = pgbeat(capsys, "task", "ls", "--json")
    assert before == after and json.loads(before[1])["kind"] == "sleep"
    monkeypatch.delenv("PGBEAT_URL")
    bare = api.removeprefix("http://")
    assert pgbeat(capsys, "task", "ls", "--json", "--url", bare) == after
    assert pgbeat(capsys, "--url", bare + "/", "--json", "task", "ls") == after


def test_version_help_and_examples():
    result = command("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pgbeat {__version__}"
    top = command("--help").stdout
    for part in ("pgbeat task add KIND", "environment:", "PGBEAT_URL", "exit status:", "examples:"):
        assert part in top

    def parsers(
        parser: argparse.ArgumentParser, path: str = "pgbeat"
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, f"{path} {name}")

    checked = 0
    for path, parser in parsers(cli.build_parser()):
        if path in ("pgbeat bench", "pgbeat chaos"):
            continue  # pgbeat_lab's own parsers
        text = parser.format_help()
        assert "examples:" in text and "pgbeat " in text.split("examples:")[1], path
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (path, action.dest)
            chosen = any(action in g._group_actions and g.required for g in parser._mutually_exclusive_groups)
            special = isinstance(action, argparse._HelpAction | argparse._VersionAction)
            if action.option_strings and not chosen and not special:
                # What --help prints after the option: its help, then its default.
                assert "default" in (parser._get_formatter()._get_help_string(action) or ""), (
                    path,
                    action.option_strings,
                )
                checked += 1
    assert checked > 60


# ---------------------------------------------------------------- failures name their cause


class NotPgbeat(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>Not Found</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_network_failures_name_their_cause(api, capsys, monkeypatch):
    monkeypatch.setenv("PGBEAT_API_KEY", "wrong")
    code, _, err = pgbeat(capsys, "task", "ls")
    assert code == 1 and "invalid API key (HTTP 401)" in err
    monkeypatch.setenv("PGBEAT_API_KEY", "cli-key")

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, _, err = pgbeat(capsys, "task", "ls", "--url", f"127.0.0.1:{port}")
    assert code == 1 and f"cannot connect to http://127.0.0.1:{port}: connection refused" in err

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code, _, err = pgbeat(capsys, "task", "ls", "--url", url, "--request-timeout", "0.5")
    assert code == 1 and f"no answer from {url} within 0.5 s" in err

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotPgbeat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, _, err = pgbeat(capsys, "task", "show", "1", "--url", url)
    finally:
        server.shutdown()
    assert (
        code == 1 and f"the server at {url} is not a pgbeat API (it answered HTTP 404 with text/html)" in err
    )

    code, _, err = pgbeat(capsys, "task", "ls", "--url", "http://no-such-host.invalid")
    assert code == 1 and "cannot resolve the host of http://no-such-host.invalid" in err


def test_unknown_ids_are_errors_everywhere(api, capsys):
    for argv in (["task", "show", "999"], ["runs", "--task", "999"], ["upcoming", "--task", "999"],
                 ["task", "pause", "999"], ["runs", "show", "999"]):  # fmt: skip
        code, out, err = pgbeat(capsys, *argv)
        assert code == 1 and out == "" and "999 not found (HTTP 404)" in err, argv


FAILURES = [
    (["task", "add", "sleep", "--every", "-5"], "schedule.every: must be positive (HTTP 422)"),
    (["task", "add", "sleep", "--cron", "99 * * * *"], "schedule.cron:"),
    (["task", "add", "sleep", "--at", "2001-01-01T00:00:00Z"], "schedule.at:"),
    (["task", "add", "sleep", "--every", "5", "--param", "seconds=x"], "params.seconds: must be a number"),
    (["runs", "--task", "0"], "HTTP 400"),
]


def test_failures_exit_1_with_the_apis_message(api, capsys):
    for argv, message in FAILURES:
        code, out, err = pgbeat(capsys, *argv)
        assert code == 1 and out == "", argv
        assert err.startswith("pgbeat: ") and message in err, (argv, err)


# ---------------------------------------------------------------- terminals and pipes

HOSTILE_NAME = "x\r\n\x1b[31mred\x07"


def test_control_characters_from_the_server_are_escaped(api, capsys):
    task = one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--name", HOSTILE_NAME))
    assert task["name"] == HOSTILE_NAME  # --json is the API's object, exactly
    for argv in (["task", "ls"], ["task", "show", str(task["id"])], ["upcoming"]):
        code, out, _ = pgbeat(capsys, *argv)
        assert code == 0 and "\x1b" not in out and "\r" not in out and "\x07" not in out
        assert "x\\r\\n\\e[31mred\\x07" in out


def test_a_closed_pipe_ends_the_command_quietly(api, capsys):
    for _ in range(30):
        pgbeat(capsys, "task", "add", "sleep", "--every", "1h", "--name", "n" * 200)
    result = subprocess.run(
        f"{sys.executable} -m pgbeat.cli task ls --json --limit 30 | head -c 10",
        shell=True, capture_output=True, text=True, executable="/bin/bash",
    )  # fmt: skip
    assert result.stdout == '{"id": 1, ' and result.stderr == ""
    # A stream that outlives its reader: the write after head exits fails, quietly.
    result = subprocess.run(
        f"{sys.executable} -m pgbeat.cli task ls --json -w 0.05 | head -c 10; echo \" ${{PIPESTATUS[0]}}\"",
        shell=True, capture_output=True, text=True, executable="/bin/bash", timeout=60,
    )  # fmt: skip
    assert result.stdout == '{"id": 1,  141\n' and result.stderr == ""


def _spawn(*argv: str, **env: str) -> pexpect.spawn:
    full_env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm-256color", **env}
    return pexpect.spawn(
        sys.executable, ["-m", "pgbeat.cli", *argv], env=full_env, encoding="utf-8", timeout=30,
        dimensions=(40, 200),
    )  # fmt: skip


def test_colour_on_a_terminal_none_with_no_color_or_a_pipe(api, capsys, db_url):
    task = one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--name", "coloured"))
    pgbeat(capsys, "task", "trigger", str(task["id"]))
    with sql.connect(db_url) as conn:
        claimed = sql.claim(conn)
        sql.finish(conn, claimed[0]["run_id"], "failed", error="boom")
        sql.release(conn, [task["id"]])

    tty = _spawn("runs")
    tty.expect(pexpect.EOF)
    tty.close()
    assert tty.exitstatus == 0
    text = tty.before
    assert f"{ESC}1mID" in text and f"{ESC}31mfailed" in text  # bold header, red failure
    # Colour codes wrap padded cells: columns line up as on a pipe.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\r\n", "\n")
    piped = command("runs")
    assert piped.returncode == 0 and ESC not in piped.stdout and plain == piped.stdout

    no_color = _spawn("runs", NO_COLOR="1")
    no_color.expect(pexpect.EOF)
    assert ESC not in no_color.before and "failed" in no_color.before
    assert ESC in command("runs", "--color", "always").stdout


def test_watch_redraws_on_a_terminal_until_ctrl_c(api, capsys):
    pgbeat(capsys, "task", "add", "sleep", "--every", "1h", "--name", "watched")
    tty = _spawn("task", "ls", "--watch", "0.2")
    for _ in range(3):
        tty.expect_exact("\x1b[H\x1b[2J")  # home + clear, like watch(1)
        tty.expect("every 0.2s: pgbeat task ls --watch 0.2")
        tty.expect("watched")
    tty.sendintr()
    tty.expect(pexpect.EOF)
    tty.close()
    assert tty.exitstatus == 0

    piped = subprocess.Popen(
        [sys.executable, "-m", "pgbeat.cli", "upcoming", "--limit", "1", "--watch", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        blocks = [piped.stdout.readline() for _ in range(8)]
    finally:
        piped.send_signal(signal.SIGINT)
        assert piped.wait(10) == 0
    assert sum(line.startswith("every 0.2s: pgbeat upcoming --limit 1") for line in blocks) >= 2
    assert not any(ESC in line for line in blocks)


def test_bash_completion_of_commands_options_and_values(tmp_path):
    script = tmp_path / "pgbeat.bash"
    script.write_text(command("completion", "bash").stdout)

    def complete(line: str) -> set[str]:
        words = line.split(" ")
        probe = (
            f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1};"
            " _pgbeat_complete; printf '%s\\n' \"${COMPREPLY[@]}\""
        )
        result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
        return set(result.stdout.split())

    assert {"task", "runs", "upcoming", "status", "serve"} <= complete("pgbeat ")
    assert complete("pgbeat task ") >= {"add", "ls", "show", "update", "pause", "resume", "trigger", "rm"}
    assert complete("pgbeat task add --ev") == {"--every"}
    assert complete("pgbeat task ls --status ") == {"active", "paused", "complete", "deleted"}
    assert complete("pgbeat runs --state fa") == {"failed"}
    assert "show" in complete("pgbeat runs ")
    zsh = command("completion", "zsh").stdout
    assert zsh.startswith("autoload -U +X bashcompinit && bashcompinit")


# ---------------------------------------------------------------- one meaning per word


def test_a_deleted_task_is_readable_and_never_changed(api, capsys, db_url):
    task = one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--name", "gone"))
    tid = str(task["id"])
    run = one(pgbeat_json(capsys, "task", "trigger", tid))
    code, _, _ = pgbeat(capsys, "task", "rm", tid)
    assert code == 0
    shown = one(pgbeat_json(capsys, "task", "show", tid))
    assert shown["status"] == "deleted" and shown["next_run_at"] is None
    assert shown["last_run"]["id"] == run["id"] and shown["last_run"]["state"] == "cancelled"
    assert [t["id"] for t in pgbeat_json(capsys, "task", "ls", "--status", "deleted")] == [task["id"]]
    assert pgbeat_json(capsys, "task", "ls") == []
    assert [r["id"] for r in pgbeat_json(capsys, "runs", "--task", tid)] == [run["id"]]
    assert pgbeat_json(capsys, "upcoming", "--task", tid) == []
    for action in (
        ["update", tid, "--name", "back"],
        ["pause", tid],
        ["resume", tid],
        ["trigger", tid],
        ["rm", tid],
    ):
        code, out, err = pgbeat(capsys, "task", *action)
        assert code == 1 and out == "" and f"task {tid} is deleted" in err and "(HTTP 409)" in err, action


def _fire_and_finish(db_url: str, task_id: int) -> None:
    """One slot of the task fires now, and its run succeeds."""
    with sql.connect(db_url) as conn:
        sql.make_due(conn, task_id, 1.0)
        assert sql.materialize(conn)
        (claimed,) = sql.claim(conn)
        sql.finish(conn, claimed["run_id"], "succeeded", {})
        sql.release(conn, [task_id])


def test_a_schedule_change_keeps_fired_so_max_runs_still_holds(api, capsys, db_url):
    task = one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--max-runs", "2"))
    tid = str(task["id"])
    for _ in range(2):
        _fire_and_finish(db_url, task["id"])
    done = one(pgbeat_json(capsys, "task", "show", tid))
    assert (done["fired"], done["status"], done["next_run_at"]) == (2, "complete", None)

    moved = one(pgbeat_json(capsys, "task", "update", tid, "--every", "30m"))
    assert (moved["fired"], moved["status"], moved["next_run_at"]) == (2, "complete", None)
    assert moved["schedule"]["every"] == "30m"
    code, out, _ = pgbeat(capsys, "task", "show", tid)
    assert code == 0 and "runs           2 fired of max 2" in out

    again = one(pgbeat_json(capsys, "task", "update", tid, "--reset-fired"))
    assert (again["fired"], again["status"]) == (0, "active") and again["next_run_at"] is not None
    _fire_and_finish(db_url, task["id"])
    cron = one(pgbeat_json(capsys, "task", "update", tid, "--cron", "@hourly"))
    assert cron["fired"] == 1 and cron["status"] == "active"  # 1 of 2: the new schedule goes on

    # The API takes 0 only: fired is a count of what happened, not a setting.
    request = urllib.request.Request(
        f"{api}/tasks/{tid}", data=b'{"fired": 1}', method="PATCH",
        headers={"Content-Type": "application/json", "Authorization": "Bearer cli-key"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and "fired" in refused.value.read().decode()


def test_status_shows_live_daemons_backlog_and_lateness(api, capsys, fleet, db_url):
    task = one(pgbeat_json(capsys, "task", "add", "sleep", "--every", "1h", "--param", "seconds=0"))
    pgbeat(capsys, "task", "trigger", str(task["id"]))
    status = one(pgbeat_json(capsys, "status"))
    assert status["runs"]["due"] == 1 and status["runs"]["pending"] == 1 and status["daemons"] == []
    assert status["tasks"] == {"active": 1} and status["database"] == "up"
    code, out, _ = pgbeat(capsys, "status")
    assert code == 0 and "1 run(s) due and waiting for a worker" in out
    assert "  ready        ready" in out  # GET /ready: the database answers, the schema is current
    assert "no scheduler or worker is running" in out

    fleet.start("worker")
    sql.wait_for(
        "the run to finish", lambda: sql.runs(sql.connect(db_url), task["id"])[0]["state"] == "succeeded"
    )
    status = one(pgbeat_json(capsys, "status"))
    assert [d["role"] for d in status["daemons"]] == ["worker"] and status["runs"]["due"] == 0
    assert status["lateness_ms"]["runs"] == 1 and status["lateness_ms"]["max"] >= 0
    code, out, _ = pgbeat(capsys, "status")
    lines = out.splitlines()
    assert code == 0 and any(line.split()[:2] == ["DAEMON", "ROLE"] for line in lines)
    assert any(" worker " in line for line in lines)
