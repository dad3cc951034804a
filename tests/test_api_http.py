"""HTTP as real clients speak it, against a real `pgbeat api` process (uvicorn over a
socket): JSON-only bodies and no cross-site writes, CORS by configured origins, HEAD,
OPTIONS, compression."""

from __future__ import annotations

import gzip
import http.client
import json
from urllib.parse import urlsplit

import pytest
import sqlsupport as sql

pytestmark = pytest.mark.slow  # real api processes

ALLOWED = "https://app.example"


@pytest.fixture
def api(fleet) -> str:
    _, base = fleet.start_api(env={"PGBEAT_CORS_ORIGINS": f"{ALLOWED}, https://other.example"})
    return base


def request(base: str, method: str, path: str, body: bytes | str | None = None, **headers: str):
    """One request with exactly these headers (names with _ for -); returns (status, headers, body)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def task_count(db_url: str) -> int:
    with sql.connect(db_url) as conn:
        return conn.execute("SELECT count(*) AS n FROM pgbeat.tasks").fetchone()["n"]


SPEC = json.dumps({"kind": "sleep", "schedule": {"every": "1h"}})


def test_a_body_that_is_not_json_is_415_and_writes_nothing(api, db_url):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml", None):
        headers = {"Content_Type": content_type} if content_type else {}
        status, _, body = request(api, "POST", "/tasks", SPEC, **headers)
        assert status == 415, (content_type, body)
        error = json.loads(body)
        assert error["field"] == "Content-Type" and "application/json" in error["detail"]
    # An HTML form with no fields still says what it is: refused before the handler runs.
    form = "application/x-www-form-urlencoded"
    status, _, _ = request(api, "POST", "/tasks/1/trigger", "", Content_Type=form)
    assert status == 415
    assert task_count(db_url) == 0

    json_utf8 = "application/json; charset=utf-8"
    status, headers, body = request(api, "POST", "/tasks", SPEC, Content_Type=json_utf8)
    assert status == 201, body
    task = json.loads(body)
    assert headers["location"] == f"/tasks/{task['id']}"
    # A body-less action needs no Content-Type (curl -X POST).
    assert request(api, "POST", f"/tasks/{task['id']}/pause")[0] == 200


def test_cross_site_writes_are_refused_unless_the_origin_is_allowed(api, db_url):
    _, _, body = request(api, "POST", "/tasks", SPEC, Content_Type="application/json")
    task_id = json.loads(body)["id"]
    for path in (f"/tasks/{task_id}/trigger", f"/tasks/{task_id}/pause"):
        status, _, body = request(api, "POST", path, Origin="https://evil.example")
        assert status == 403, body
        assert json.loads(body)["field"] == "Origin"
        # "null" is what sandboxed frames and file: pages send
        assert request(api, "POST", path, Origin="null")[0] == 403
    status, _, _ = request(api, "DELETE", f"/tasks/{task_id}", Origin="https://evil.example")
    assert status == 403
    with sql.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) AS n FROM pgbeat.runs").fetchone()["n"] == 0
        assert conn.execute("SELECT paused FROM pgbeat.tasks").fetchone()["paused"] is False

    # The configured origin may, and is told so; so may a page of this server itself.
    status, headers, _ = request(api, "POST", f"/tasks/{task_id}/pause", Origin=ALLOWED)
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    host = urlsplit(api).netloc
    assert request(api, "POST", f"/tasks/{task_id}/resume", Origin=f"http://{host}", Host=host)[0] == 200
    # Reading cross-site is not a write; the browser hides the answer (no CORS header).
    status, headers, _ = request(api, "GET", "/tasks", Origin="https://evil.example")
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_preflight_by_configured_origins(api, fleet):
    status, headers, _ = request(
        api,
        "OPTIONS",
        "/tasks",
        Origin=ALLOWED,
        Access_Control_Request_Method="POST",
        Access_Control_Request_Headers="content-type, x-api-key",
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == ALLOWED
    assert {"POST", "PATCH", "DELETE", "GET"} <= set(headers["access-control-allow-methods"].split(", "))
    assert {"content-type", "x-api-key", "authorization"} <= set(
        headers["access-control-allow-headers"].lower().split(", ")
    )
    status, headers, _ = request(
        api, "OPTIONS", "/tasks", Origin="https://evil.example", Access_Control_Request_Method="POST"
    )
    assert status >= 400 and "access-control-allow-origin" not in headers

    # Off by default: an api without PGBEAT_CORS_ORIGINS answers no CORS header at all.
    _, plain = fleet.start_api()
    status, headers, _ = request(
        plain, "OPTIONS", "/tasks", Origin=ALLOWED, Access_Control_Request_Method="POST"
    )
    assert not any(name.startswith("access-control-") for name in headers)
    assert request(plain, "POST", "/tasks/1/trigger", Origin=ALLOWED)[0] == 403


def test_options_allow_lists_every_method_and_head_works_wherever_get_does(api):
    expected = {
        "/tasks": "GET, HEAD, OPTIONS, POST",
        "/tasks/1": "DELETE, GET, HEAD, OPTIONS, PATCH",
        "/tasks/1/pause": "OPTIONS, POST",
        "/tasks/1/runs": "GET, HEAD, OPTIONS",
        "/runs": "GET, HEAD, OPTIONS",
        "/health": "GET, HEAD, OPTIONS",
    }
    for path, allow in expected.items():
        status, headers, _ = request(api, "OPTIONS", path)
        assert (status, headers["allow"]) == (204, allow), path
    status, headers, _ = request(api, "PUT", "/tasks/1")
    assert (status, headers["allow"]) == (405, expected["/tasks/1"])

    request(api, "POST", "/tasks", SPEC, Content_Type="application/json")
    paths = ["/health", "/ready", "/metrics", "/tasks", "/tasks/1", "/runs", "/upcoming"]
    paths.append("/schema/openapi.json")
    for path in paths:
        get_status, get_headers, get_body = request(api, "GET", path)
        status, headers, body = request(api, "HEAD", path)
        assert (status, body) == (get_status, b""), path
        assert headers["content-type"] == get_headers["content-type"], path
        if path != "/metrics":  # (its counters move between the two requests)
            assert int(headers["content-length"]) == len(get_body), path
    assert request(api, "HEAD", "/tasks/999")[0] == 404
    assert request(api, "HEAD", "/tasks/1/pause")[0] == 405


def test_gzip_when_asked_and_above_the_threshold(api):
    for path in ("/metrics", "/schema/openapi.json"):
        status, headers, body = request(api, "GET", path, Accept_Encoding="gzip")
        assert status == 200 and headers["content-encoding"] == "gzip", path
        assert "accept-encoding" in headers["vary"].lower()
        plain = request(api, "GET", path)[2]
        assert len(body) < len(plain) / 3, path
        if path != "/metrics":
            assert gzip.decompress(body) == plain
    # Not asked, or too small to be worth it: sent as it is.
    assert "content-encoding" not in request(api, "GET", "/schema/openapi.json")[1]
    status, headers, body = request(api, "GET", "/health", Accept_Encoding="gzip")
    assert "content-encoding" not in headers and json.loads(body) == {"status": "ok"}


def requests_counted(base: str, key: str) -> dict[tuple[str, str], float]:
    """`pgbeat_api_requests_total` for /tasks, by (method, status code)."""
    _, _, body = request(base, "GET", "/metrics", Authorization=f"Bearer {key}")
    counted = {}
    for line in body.decode().splitlines():
        if line.startswith("pgbeat_api_requests_total{") and 'path="/tasks"' in line:
            labels, value = line.rsplit(" ", 1)
            method = labels.split('method="')[1].split('"')[0]
            status = labels.split('status_code="')[1].split('"')[0]
            counted[(method, status)] = float(value)
    return counted


def test_metrics_count_refusals_by_their_real_status(fleet):
    """401, 415 and 429 come from middleware, not from a route: they are counted as what
    the client got, not as 200 (Rule 17's limits are visible in the metrics)."""
    _, base = fleet.start_api(env={"PGBEAT_API_KEYS": "k1", "PGBEAT_RATE_LIMIT": "4"})
    statuses = [request(base, "GET", "/tasks", Authorization="Bearer wrong")[0] for _ in range(2)]
    statuses += [
        request(base, "POST", "/tasks", SPEC, Content_Type="text/plain", Authorization="Bearer k1")[0]
    ]
    statuses += [request(base, "GET", "/tasks", Authorization="Bearer k1")[0] for _ in range(6)]
    assert statuses == [401, 401, 415, 200, 200, 200, 200, 429, 429]
    assert requests_counted(base, "k1") == {
        ("GET", "401"): 2,
        ("POST", "415"): 1,
        ("GET", "200"): 4,
        ("GET", "429"): 2,
    }


def test_requests_in_progress_carry_no_status(api):
    """A request in flight has no status yet: the gauge is by method and path only, so a
    POST that ends 201 is not shown as a 200 in flight, and it is back to 0 once answered."""
    assert request(api, "POST", "/tasks", SPEC, Content_Type="application/json")[0] == 201
    _, _, body = request(api, "GET", "/metrics")
    in_progress = {}
    for line in body.decode().splitlines():
        if line.startswith("pgbeat_api_requests_in_progress{"):
            labels, value = line.rsplit(" ", 1)
            pairs = dict(pair.split("=", 1) for pair in labels.split("{", 1)[1].rstrip("}").split(","))
            assert set(pairs) == {"method", "path", "app_name"}, line
            in_progress[(pairs["method"].strip('"'), pairs["path"].strip('"'))] = float(value)
    assert in_progress[("POST", "/tasks")] == 0
    # The scrape itself is in flight while the page is written.
    assert in_progress[("GET", "/metrics")] == 1
