"""Fuzzing the live server (Ray Serve + HAProxy, the session's test cluster).

Two generators, both counted:
- schemathesis reads the served ``/openapi.json`` and generates requests for every operation,
  inside and outside the schema (its positive and negative modes), with model names drawn
  from the served models as often as from thin air, so bodies reach the real decoders;
- hypothesis builds raw bodies no schema describes: truncated JSON, nesting far beyond any
  parser's limit, numbers beyond float64, NaN/Infinity literals, wrong content types, random
  bytes, invalid UTF-8 and bodies over ``max_request_bytes``; and, for the mixed-type demos
  (string, category, int, float and bool columns), their customer rows in every protocol's
  form (V1 records and rows, V2 columns as JSON and with BYTES in the binary extension,
  MLflow's split, records and CSV) with random edits.

Every response must be below 500; every error must be JSON with an ``"error"`` message of
bounded size. Afterwards the server must still answer correct predictions.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import struct
from collections import Counter

import httpx
import pandas as pd
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from serve_app.errors import MAX_MESSAGE_CHARS, REASONS
from serve_app.tools.train import TABLE_MODELS, table_split
from test_fuzz_codecs import mutated

pytestmark = pytest.mark.serve

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
# diabetes: a dedicated deployment. Not wine: conftest serves it for the batching test alone.
SERVED = ("iris", "breast-cancer", "diabetes")
SCHEMA_EXAMPLES = 60  # per operation and mode (operations with few possible inputs run fewer)
RAW_EXAMPLES = 400
MIN_LIVE_CASES = 1000
statuses: Counter[str] = Counter()  # "<generator> <status>" -> responses


def check_response(status: int, content_type: str, content: bytes, generator: str) -> None:
    statuses[f"{generator} {status}"] += 1
    assert status < 500, f"{status}: {content[:500]!r}"
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, content[:300])
        assert len(content) < MAX_MESSAGE_CHARS + 500, f"error body of {len(content)} bytes"
        body = httpx.Response(status, content=content).json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
        assert body.get("reason") in (None, *REASONS), body


# -- schemathesis against /openapi.json -----------------------------------------------------
# schemathesis' own pytest plugin (schemathesis.pytest.from_fixture) fails under pytest 9.2
# ("'Function' object has no attribute '_nodeid'"), so each operation's strategy drives a
# plain hypothesis test here: the same generated cases, counted per operation and mode.
def test_openapi_operations_never_answer_5xx(serve_cluster):
    """Positive and negative cases for every documented operation: below 500, errors as JSON."""
    schema = schemathesis.openapi.from_url(f"{serve_cluster.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/models/{name}:predict", "POST /v2/models/{name}/infer"} <= {op.label for op in operations}
    with requests.Session() as session:
        for operation in operations:
            fuzz_operation(operation, serve_cluster.url, session)


def fuzz_operation(operation, base_url: str, session: requests.Session) -> None:
    """Every generation mode that applies to ``operation``, as one hypothesis run each."""
    # Negative cases need something the schema constrains: a body (a path's name is any string).
    negative = (GenerationMode.NEGATIVE,) if len(operation.body) else ()
    for mode in (GenerationMode.POSITIVE, *negative):
        @given(case=operation.as_strategy(generation_mode=mode),
               model=st.sampled_from(SERVED) | st.none(), version=st.sampled_from(["1", None]))
        @settings(max_examples=SCHEMA_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case, model, version):
            if model is not None and "name" in case.path_parameters:
                case.path_parameters["name"] = model  # a served model: the body reaches its decoder
            if version is not None and "version" in case.path_parameters:
                case.path_parameters["version"] = version
            response = case.call(base_url=base_url, session=session, timeout=60)
            content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: lists
            check_response(response.status_code, content_type, response.content, "schemathesis")
            statuses[f"operation {operation.label} {mode}"] += 1

        call()


# -- hypothesis: raw bodies -----------------------------------------------------------------
# (path, the served model's feature count)
ENDPOINTS = (("/v1/models/iris:predict", 4), ("/v1/models/diabetes:predict", 10), ("/v2/models/iris/infer", 4),
             ("/v2/models/diabetes/versions/1/infer", 10), ("/v2/models/breast-cancer/infer", 30))


def valid_body(path: str, n_features: int) -> bytes:
    """A correct request for the endpoint; its numbers include 5.1 and 3.5 for the edits."""
    row = ", ".join(["5.1", "3.5"] + ["0.2"] * (n_features - 2))
    if path.startswith("/v1/"):
        return b'{"instances": [[%s], [%s]], "parameters": {"output": "predict"}}' % (row.encode(), row.encode())
    return (b'{"id": "r", "inputs": [{"name": "input-0", "shape": [1, %d], "datatype": "FP64", "data": [%s]}], '
            b'"outputs": [{"name": "predict"}]}' % (n_features, row.encode()))


JSON = {"content-type": "application/json"}
# Not JSON, or beyond float64 (orjson reads both as malformed): 400.
NOT_NUMBERS = [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"1e999", b"-1e999", b"1E400",
               b"1" * 400, b"0x10", b"1_000", b"+1", b".5", b"01", b"1.", b"--1", b"1e", b"\"5\""]
# JSON numbers at the edges of float64 and beyond 64-bit integers: accepted.
EDGE_NUMBERS = [b"18446744073709551616", b"1e-999", b"-0", b"5e-324", b"-9223372036854775809"]
# Finite, but may overflow inside a model (a scaler's division): accepted, or 400 non_finite.
HUGE_NUMBERS = [b"1.7976931348623157e308", b"-1e308", b"-" + b"9" * 300]
CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/xml", "application/octet-stream", "image/png", "}{", "application/jsonx"]


@st.composite
def raw_requests(draw):
    """(kind, path, headers, body, statuses allowed)."""
    path, n_features = draw(st.sampled_from(ENDPOINTS))
    protocol = "v1" if path.startswith("/v1") else "v2"
    valid = valid_body(path, n_features)
    kind = draw(st.sampled_from(["truncated", "deep", "number", "content-type", "random", "utf8", "spliced"]))
    if kind == "truncated":
        body = valid[: draw(st.integers(0, len(valid) - 1))]
        return kind, path, JSON, body, {400}
    if kind == "deep":  # orjson's depth limit is 1024; far beyond, and around it
        depth = draw(st.integers(1000, 1100) | st.integers(1, 100_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = opener * depth + b"1" + closer * draw(st.sampled_from([depth, 0, depth // 2]))
        wrapper = b'{"instances": %s}' if protocol == "v1" else (
            b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": %s}]}')
        return kind, path, JSON, draw(st.sampled_from([inner, wrapper % inner])), {400}
    if kind == "number":  # a literal JSON does not have, a number beyond float64, or an edge case
        literal, expected = draw(st.sampled_from(
            [(n, {400}) for n in NOT_NUMBERS] + [(n, {200}) for n in EDGE_NUMBERS] + [(n, {200, 400}) for n in HUGE_NUMBERS]))
        return kind, path, JSON, valid.replace(b"3.5", literal, 1), expected
    if kind == "content-type":
        content_type = draw(st.sampled_from(CONTENT_TYPES) | st.text(
            st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30))
        assume(content_type.split(";")[0].strip().lower() != "application/json"
               and not content_type.split(";")[0].strip().lower().endswith("+json"))
        return kind, path, {"content-type": content_type}, valid, {415}
    if kind == "random":
        return kind, path, JSON, draw(st.binary(max_size=3000)), {400}
    if kind == "utf8":  # invalid UTF-8 and a byte-order mark
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"]))
        body = draw(st.sampled_from([valid.replace(b"5.1", b'"' + bad + b'"', 1), b"\xef\xbb\xbf" + valid,
                                     valid.replace(b"input-0", bad, 1).replace(b"instances", b"inst" + bad, 1)]))
        return kind, path, JSON, body, {400}
    # spliced: random bytes inserted into a valid body
    at = draw(st.integers(0, len(valid)))
    body = valid[:at] + draw(st.binary(min_size=1, max_size=20)) + valid[at:]
    return kind, path, JSON, body, {200, 400}


@pytest.fixture(scope="module")
def client(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url, timeout=60) as http:
        yield http


@given(request=raw_requests())
@settings(max_examples=RAW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_raw_bodies_are_4xx_json(client, request):
    kind, path, headers, body, allowed = request
    response = client.post(path, content=body, headers=headers)
    check_response(response.status_code, response.headers.get("content-type", ""), response.content, "raw")
    assert response.status_code in allowed, (kind, body[:200], response.text[:300])
    statuses[f"raw-kind {kind}"] += 1


@pytest.mark.parametrize("path", ["/v1/models/iris:predict", "/v2/models/diabetes/infer"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_oversized_bodies_are_413(client, serve_cluster, path, framing):
    """Over ``max_request_bytes`` (the app's args): 413 whether the size is declared up front
    or only discovered while reading a chunked body."""
    limit = serve_cluster.config["applications"][0]["args"].get("max_request_bytes", 16 * 1024 * 1024)
    chunk = b"[" + b"1.5," * 16383 + b"1.5],"  # 64 KiB of rows, never valid JSON on its own
    n_chunks = limit // len(chunk) + 2
    body_parts = [b'{"instances": ['] + [chunk] * n_chunks
    if framing == "content-length":
        response = client.post(path, content=b"".join(body_parts), headers=JSON)
    else:
        response = client.post(path, content=iter(body_parts), headers=JSON)
    check_response(response.status_code, response.headers.get("content-type", ""), response.content, "oversized")
    assert response.status_code == 413 and response.json()["reason"] == "payload_too_large", response.text[:300]


def test_endless_chunked_body_is_cut_off_at_the_limit(serve_cluster):
    """A chunked body that never ends: the server answers 413 once the limit is passed, without
    waiting for (or buffering) the rest. The client sends a little over the limit, never the
    final chunk, and waits for the answer; a server that read to the end would never give one
    (the socket timeout only keeps such a regression from hanging the suite)."""
    limit = serve_cluster.config["applications"][0]["args"].get("max_request_bytes", 16 * 1024 * 1024)
    url = httpx.URL(serve_cluster.url)
    chunk = b"[1.5, 1.5, 1.5, 1.5]," * 3000
    with socket.create_connection((url.host, url.port), timeout=120) as conn:
        conn.sendall(b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" % url.host.encode())
        conn.sendall(b'f\r\n{"instances": [\r\n')
        sent = 0
        try:
            while sent <= limit + 1024 * 1024:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: read its answer
        answer = b""
        while b"payload_too_large" not in answer:
            data = conn.recv(65536)
            assert data, f"connection closed after {sent} bytes sent, having answered {answer!r}"
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    statuses["oversized 413"] += 1


def test_a_request_that_breaks_the_model_fails_alone(serve_cluster):
    """A finite value that overflows inside iris's scaler, sent among concurrent good requests
    that share its batch: it gets its 400, and every other request its prediction (before the
    fix, the whole batch got 500s). Three rounds, as batching depends on arrival times."""
    bad = b'{"instances": [[1.7976931348623157e308, 3.5, 1.4, 0.2]]}'

    async def round_trip():
        async with httpx.AsyncClient(base_url=serve_cluster.url, timeout=60,
                                     limits=httpx.Limits(max_connections=40)) as http:
            good = [http.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]}) for _ in range(30)]
            return await asyncio.gather(
                *good[:15], http.post("/v1/models/iris:predict", content=bad, headers=JSON), *good[15:])

    for _ in range(3):
        responses = asyncio.run(round_trip())
        rejected = responses.pop(15)
        assert rejected.status_code == 400 and rejected.json()["reason"] == "non_finite", rejected.text
        assert [(r.status_code, r.json()) for r in responses] == [(200, {"predictions": [0]})] * 30
        statuses["isolation 400"] += 1


# -- hypothesis: mixed-type tables ----------------------------------------------------------
MIXED_ROWS: list[dict] | None = None


def mixed_rows() -> list[dict]:
    """Real rows of the demos' customer table (strings, categories, ints, floats, bools, nulls)."""
    global MIXED_ROWS
    if MIXED_ROWS is None:
        MIXED_ROWS = json.loads(table_split("churn").X_test.head(20).to_json(orient="records"))
    return MIXED_ROWS


def v2_datatype(dtype) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "BOOL"
    if pd.api.types.is_integer_dtype(dtype):
        return "INT64"
    return "FP64" if pd.api.types.is_float_dtype(dtype) else "BYTES"


def v2_columns(rows: list[dict]) -> dict:
    names = list(rows[0])
    dtypes = table_split("churn").X_test.dtypes
    return {"inputs": [{"name": n, "datatype": v2_datatype(dtypes[n]), "shape": [len(rows)],
                        "data": [r.get(n) for r in rows]} for n in names], "parameters": {"content_type": "pd"}}


def binary_bytes_body(strings: list[bytes], declared: int) -> tuple[bytes, dict]:
    """One BYTES column in the binary extension (4-byte little-endian length before each element),
    its declared size possibly wrong."""
    raw = b"".join(struct.pack("<I", len(s)) + s for s in strings)
    header = json.dumps({"inputs": [{"name": "plan", "datatype": "BYTES", "shape": [len(strings)],
                                     "parameters": {"binary_data_size": max(len(raw) + declared, 0)}}]}).encode()
    return header + raw, {"content-type": "application/octet-stream",
                          "inference-header-content-length": str(len(header))}


@st.composite
def mixed_requests(draw):
    """(path, headers, body) for a mixed-type demo in one protocol's form, nearly valid."""
    name = draw(st.sampled_from(sorted(TABLE_MODELS)))
    rows = copy.deepcopy(draw(st.lists(st.sampled_from(mixed_rows()), min_size=1, max_size=4)))  # edited below
    form = draw(st.sampled_from(["v1-records", "v1-rows", "v2-columns", "v2-binary-bytes", "mlflow-split",
                                 "mlflow-records", "mlflow-csv"]))
    statuses[f"mixed-form {form}"] += 1
    if form == "v2-binary-bytes":
        strings = draw(st.lists(st.binary(max_size=12) | st.sampled_from([b"basic", b"premium"]), min_size=1,
                                max_size=4))
        body, headers = binary_bytes_body(strings, draw(st.integers(-4, 4)))
        return f"/v2/models/{name}/infer", headers, body
    if form == "mlflow-csv":
        names = list(rows[0])
        lines = [",".join(names)] + [",".join("" if r[n] is None else str(r[n]) for n in names) for r in rows]
        text = "\n".join(lines)
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=6)) + text[at:]
        return f"/v1/models/{name}/invocations", {"content-type": "text/csv"}, text.encode("utf-8", "surrogatepass")
    if form == "v1-records":
        valid, path = {"instances": rows}, f"/v1/models/{name}:predict"
    elif form == "v1-rows":
        valid, path = {"instances": [list(r.values()) for r in rows]}, f"/v1/models/{name}:predict"
    elif form == "v2-columns":
        valid, path = v2_columns(rows), f"/v2/models/{name}/infer"
    elif form == "mlflow-split":
        valid = {"dataframe_split": {"columns": list(rows[0]), "data": [list(r.values()) for r in rows]}}
        path = f"/v1/models/{name}/invocations"
    else:
        valid, path = {"dataframe_records": rows}, f"/v1/models/{name}/invocations"
    body = draw(mutated(st.just(valid)))
    return path, JSON, json.dumps(body, allow_nan=True, default=str).encode()


@given(request=mixed_requests())
@settings(max_examples=RAW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_mixed_type_bodies_are_answers_or_4xx_json(client, request):
    """Strings, categories, nulls and numbers in the wrong places, BYTES that are not UTF-8 or
    whose lengths lie, CSV with stray characters: a prediction or a 4xx JSON error, never a 5xx."""
    path, headers, body = request
    response = client.post(path, content=body, headers=headers)
    check_response(response.status_code, response.headers.get("content-type", ""), response.content, "mixed")


def test_server_is_healthy_after_fuzzing(client):
    """Runs last in this module: the generators produced their cases, none got a 5xx, and
    every kind of model still answers correct predictions."""
    schemathesis_cases = sum(n for k, n in statuses.items() if k.startswith("schemathesis "))
    raw_cases = sum(n for k, n in statuses.items() if k.startswith("raw "))
    if not schemathesis_cases or not raw_cases:
        pytest.fail(f"run this module as a whole: the fuzz tests above must run first ({statuses})")
    assert schemathesis_cases + raw_cases >= MIN_LIVE_CASES, statuses
    assert not [k for k in statuses if k.split()[-1].startswith("5")], statuses
    # Cases reached the models (200s) as well as every way of being refused.
    assert statuses["schemathesis 200"] > 50 and statuses["raw 400"] > 100, statuses
    assert len([k for k in statuses if k.startswith("raw-kind ")]) == 7, statuses
    # The mixed-type demos were reached in every form, and both answered and refused.
    assert len([k for k in statuses if k.startswith("mixed-form ")]) == 7, statuses
    assert statuses["mixed 200"] > 20 and statuses["mixed 400"] > 20, statuses

    assert client.get("/-/healthz").status_code == 200
    v1 = client.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]})
    assert v1.status_code == 200 and v1.json() == {"predictions": [0]}, v1.text
    v2 = client.post("/v2/models/iris/infer", json={"inputs": [
        {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW}]})
    assert v2.status_code == 200 and v2.json()["outputs"][0]["data"] == [0], v2.text
    dedicated = client.post("/v1/models/diabetes:predict", json={"instances": [[0.0] * 10]})
    assert dedicated.status_code == 200 and isinstance(dedicated.json()["predictions"][0], float)
