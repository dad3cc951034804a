"""`pgbeat bench` smoke runs: every scenario with tiny sizes, so the bench code cannot rot.
These check that the figures are produced and sane, not that targets are met."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgbeat import cli
from pgbeat_lab import bench

TINY = {
    "burst": ["--size", "40"],
    "steady": ["--size", "10", "--duration", "3"],
    "latency": ["--size", "10", "--duration", "2"],
    "scale": ["--size", "300", "--api-tasks", "50", "--duration", "3", "--clients", "4", "--every", "30"],
    "idle": ["--size", "50", "--duration", "2"],
    "api": ["--size", "20", "--duration", "1", "--clients", "4"],
    "history": ["--size", "4000", "--duration", "1"],
    "ui": ["--size", "200", "--duration", "4"],
}


@pytest.fixture
def server_url(pg_server, monkeypatch) -> str:
    url = pg_server.url("postgres")
    monkeypatch.setenv("PGBEAT_DATABASE_URL", url)
    return url


def figures(path: Path) -> list[dict[str, float | None]]:
    results = json.loads(path.read_text())
    for result in results:
        assert result["floor"]["tps"] > 0
        assert 0 < result["floor"]["latency_p50_ms"] <= result["floor"]["latency_p99_ms"]
        assert 0.05 < result["python_loop_s"] < 60  # the host's speed, printed beside the floor
    return [{f["name"]: f["value"] for f in result["figures"]} for result in results]


def run(scenario: str, tmp_path: Path, *extra: str) -> dict[str, float | None]:
    [result] = run_rounds(scenario, tmp_path, *extra)
    return result


def run_rounds(scenario: str, tmp_path: Path, *extra: str) -> list[dict[str, float | None]]:
    out = tmp_path / "bench.json"
    args = ["bench", scenario, *TINY[scenario], "--floor-seconds", "1", "--concurrency", "8", *extra]
    assert cli.main([*args, "--json", str(out), "--logs", str(tmp_path / "logs")]) == 0
    return figures(out)


@pytest.mark.slow
def test_burst(server_url, tmp_path):
    f = run("burst", tmp_path)
    assert f["runs finished"] == f["runs succeeded"] == f["counter total"] == 40
    assert f["runs started under a task lock"] == 40
    assert f["runs/s (due -> all finished)"] > 0
    assert (
        f["WAL bytes per run"] > 0 and f["PostgreSQL CPU ms per run"] > 0 and f["daemon CPU ms per run"] > 0
    )


@pytest.mark.slow
def test_steady(server_url, tmp_path):
    f = run("steady", tmp_path)
    assert f["slots expected"] == 30
    assert 0 < f["slots run"] <= 30
    assert 0 <= f["lateness p50"] <= f["lateness p99"] <= f["lateness max"]


@pytest.mark.slow
def test_latency(server_url, tmp_path):
    f = run("latency", tmp_path)
    assert f["scheduled runs"] > 0
    assert 100 <= f["trigger calls"] <= 200
    assert 0 < f["triggered runs started"] <= f["trigger calls"]
    assert 0 <= f["trigger -> started p50"] <= f["trigger -> started p99"]


@pytest.mark.slow
def test_scale(server_url, tmp_path):
    f = run("scale", tmp_path)
    assert f["tasks"] == 300
    assert f["API create errors"] == 0 and f["GET /upcoming errors"] == 0
    assert f["tasks created via API/s"] > 0 and f["tasks created via SQL/s"] > 0
    assert 0 < f["GET /upcoming p50"] <= f["GET /upcoming p99"]
    assert f["scheduler-0 RSS"] > 10 and f["worker-0 RSS"] > 10
    assert f["worker-0 RSS growth over the window"] is not None


@pytest.mark.slow
def test_idle(server_url, tmp_path):
    f = run("idle", tmp_path)
    assert f["transactions/s, all daemons"] >= 0
    assert f["CPU s over the window, all daemons"] >= 0


@pytest.mark.slow
def test_api(server_url, tmp_path):
    f = run("api", tmp_path)
    assert f["GET errors"] == 0 and f["POST errors"] == 0
    assert f["GET /tasks/{id} req/s"] > 0 and f["POST /tasks req/s"] > 0
    assert 0 < f["GET /tasks/{id} p50"] <= f["GET /tasks/{id} p99"]


@pytest.mark.slow
def test_history(server_url, tmp_path):
    f = run("history", tmp_path)
    assert f["GET errors"] == 0
    assert 0 < f["GET /runs p50"] <= f["GET /runs p99"]
    assert 0 < f["GET /tasks/{id}/runs p50"] <= f["GET /tasks/{id}/runs p99"]
    # 40 days of history, 30 kept, by whole days: the days that ended before the cutoff go.
    assert 700 <= f["runs in days past 30 days"] <= 1001
    assert f["runs pruned"] == f["runs in days past 30 days"]
    assert f["day partitions dropped (3 steps each)"] >= 9
    # Burst with runs by day and in one table, both with every run finished.
    assert f["burst by day vs one table"] > 0
    assert f["runs triggered"] >= 100 and f["triggered runs started"] == f["runs triggered"]
    assert f["runs table + indexes before"] > 0 and f["runs table + indexes after"] > 0


@pytest.mark.slow
def test_ui(server_url, tmp_path):
    f = run("ui", tmp_path)
    assert f["page errors"] == 0
    assert f["tasks"] == 200 and f["runs of history"] == 4000
    for page in ("overview", "tasks", "tasks by name", "a task", "a task, older runs", "a run"):
        assert 0 < f[f"{page} p50"] <= f[f"{page} p99"]


@pytest.mark.slow
def test_burst_beside_pgqueuer_alternates_and_compares(server_url, tmp_path):
    rounds = run_rounds("burst", tmp_path, "--peer", "pgqueuer", "--rounds", "2")
    assert len(rounds) == 2
    for f in rounds:
        assert f["runs succeeded"] == f["counter total"] == 40
        assert f["pgqueuer jobs done"] == 40 and f["pgqueuer jobs/s (batch_size 100)"] > 0
        assert f["runs/s vs pgqueuer"] == pytest.approx(
            f["runs/s (due -> all finished)"] / f["pgqueuer jobs/s (batch_size 100)"]
        )


@pytest.mark.slow
def test_latency_beside_pgqueuer(server_url, tmp_path):
    f = run("latency", tmp_path, "--peer", "pgqueuer", "--rounds", "1")
    assert 0 < f["pgqueuer enqueue -> start p50"] <= f["pgqueuer enqueue -> start p99"]
    assert f["trigger p99 vs pgqueuer p99"] == pytest.approx(
        f["trigger -> started p99"] / f["pgqueuer enqueue -> start p99"]
    )
    assert f["lateness p99 vs pgqueuer p99"] is not None


def test_peer_mode_refuses_scenarios_it_has_no_peer_for(server_url):
    with pytest.raises(SystemExit, match="--peer runs with burst or latency"):
        cli.main(["bench", "steady", "--peer", "pgqueuer"])


def test_percentile():
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench.percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_figure_ratio_and_target():
    floor = bench.Floor(1, 1, tps=2000, latency_p50_ms=0.5, latency_p99_ms=2)
    f = bench.Figure("runs/s", 10_000, "runs/s", ">= 10000", "tps")
    f.judge(floor)
    assert f.ratio == 5 and f.met is True
    g = bench.Figure("lateness p99", 30, "ms", "<= 20", "p99")
    g.judge(floor)
    assert g.ratio == 15 and g.met is False
