"""Structured logs from the live cluster: every response carries an X-Request-ID (the
client's own when it sent one); the replica's JSON log has an access line for each request
worth reading (errors, client-traced requests; the test app samples none of the rest) and a
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


def traceparent(sampled: bool = True) -> tuple[str, str]:
    """A W3C traceparent header value and its trace id."""
    trace_id = uuid.uuid4().hex
    return f"00-{trace_id}-{uuid.uuid4().hex[:16]}-{'01' if sampled else '00'}", trace_id


def test_client_request_id_is_returned_and_a_sampled_trace_logged(serve_cluster, http):
    request_id = f"test-{uuid.uuid4().hex}"
    header, trace_id = traceparent()
    response = http.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]},
                         headers={"X-Request-ID": request_id, "traceparent": header})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    (access,) = log_records(serve_cluster, request_id, wanted=1)
    assert access["levelname"] == "INFO"
    assert access["message"].startswith("POST /v1/models/iris:predict 200 ")
    assert access["application"] == "models" and access["deployment"].endswith("ModelServer")
    assert (access["model"], access["protocol"], access["status_code"]) == ("iris", "v1", 200)
    assert access["model_version"] and access["trace_id"] == trace_id
    assert 0 < access["latency_ms"] < 30_000


def test_ordinary_success_leaves_no_access_line(serve_cluster, http):
    """Serve's every-request access log is off; with sample_rate 0 an ordinary 200 (its own
    X-Request-ID, an unsampled traceparent or none) is not logged, while a sampled trace after
    it is (so the log was flushed when we looked)."""
    untraced = []
    for i in range(12):
        headers = [{}, {"X-Request-ID": f"test-{uuid.uuid4().hex}"}, {"traceparent": traceparent(False)[0]}][i % 3]
        response = http.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]}, headers=headers)
        assert response.status_code == 200
        untraced.append(response.headers["x-request-id"])
    traced = [f"test-{uuid.uuid4().hex}" for _ in range(4)]
    for request_id in traced:  # several, so both ingress replicas most likely log one
        assert http.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]},
                         headers={"X-Request-ID": request_id, "traceparent": traceparent()[0]}).status_code == 200
    for request_id in traced:
        assert log_records(serve_cluster, request_id, wanted=1), request_id
    for request_id in untraced:
        assert log_records(serve_cluster, request_id, wanted=1, timeout=0) == [], request_id


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
