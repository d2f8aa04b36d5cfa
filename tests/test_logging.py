"""Structured logs from the live cluster: every response carries an X-Request-ID (the
client's own when it sent one), and the replica's JSON log has an access line per request and a
WARNING line per rejected request, each with that request id."""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytestmark = pytest.mark.serve

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


def log_records(serve_cluster, request_id: str, wanted: int, timeout: float = 60) -> list[dict]:
    """The JSON records of the replica logs that carry ``request_id`` (at least ``wanted``)."""
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for path in (serve_cluster.session_dir / "logs" / "serve").glob("replica_*.log"):
            for line in path.read_text().splitlines():
                if request_id in line:
                    record = json.loads(line)  # every line is JSON
                    if record.get("request_id") == request_id:
                        records.append(record)
        if len(records) >= wanted or time.monotonic() > deadline:
            return records
        time.sleep(1)


def test_client_request_id_is_returned_and_logged(serve_cluster, http):
    request_id = f"test-{uuid.uuid4().hex}"
    response = http.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]},
                         headers={"X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    (access,) = log_records(serve_cluster, request_id, wanted=1)
    assert access["levelname"] == "INFO"
    assert access["message"].startswith("POST /v1/models/{name}:predict 200 ")
    assert access["application"] == "models" and access["deployment"].endswith("ModelServer")


def test_rejected_request_logs_a_warning_with_reason(serve_cluster, http):
    request_id = f"test-{uuid.uuid4().hex}"
    response = http.post("/v2/models/iris/infer", content=b'{"inputs": [',
                         headers={"X-Request-ID": request_id, "content-type": "application/json"})
    assert response.status_code == 400
    assert response.headers["x-request-id"] == request_id
    records = log_records(serve_cluster, request_id, wanted=2)
    by_level = {r["levelname"]: r for r in records}
    assert set(by_level) == {"WARNING", "INFO"}, records
    warning = by_level["WARNING"]
    assert (warning["model"], warning["protocol"], warning["reason"], warning["status_code"]) == \
        ("iris", "v2", "malformed_json", 400)
    assert " 400 " in by_level["INFO"]["message"]


def test_every_response_has_a_request_id(http):
    ids = set()
    for method, path in [("POST", "/v1/models/iris:predict"), ("GET", "/v2/models/tulip"),
                         ("GET", "/no/such/path"), ("GET", "/v2/health/ready")]:
        kwargs = {"json": {"instances": [IRIS_ROW]}} if method == "POST" else {}
        response = http.request(method, path, **kwargs)
        assert response.headers.get("x-request-id"), f"{method} {path}: no x-request-id"
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 4, "a fresh id per request when the client sends none"
