"""The Open Inference Protocol over gRPC against the live server (HAProxy's h2 frontend, each
replica's own gRPC server), driven by clients this project did not write: Triton's
``tritonclient.grpc`` and its compiled stubs for typed contents, and grpcio itself for bytes
no client would send. Every answer is compared with the REST answer for the same rows."""

from __future__ import annotations

import random
from collections import Counter

import grpc
import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import FLEET
from serve_app.tools.train import TABLE_MODELS, table_split

pytestmark = pytest.mark.serve

MAIN = {"application": "models"}  # the test cluster runs three applications: name one
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def client(serve_cluster):
    with triton.InferenceServerClient(url=serve_cluster.grpc_target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(serve_cluster):
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def rest(serve_cluster):
    with httpx.Client(base_url=serve_cluster.url, timeout=60) as http:
        yield http


def rows_of(name: str, n: int = 8) -> np.ndarray:
    from sklearn import datasets

    loader = {"iris": datasets.load_iris, "breast-cancer": datasets.load_breast_cancer,
              "diabetes": datasets.load_diabetes, "wine": datasets.load_wine}[name]
    return loader().data[:n]


def rest_v2(rest, path: str, X: np.ndarray, outputs=("predict",)) -> dict:
    body = {"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64", "data": X.ravel().tolist()}],
            "outputs": [{"name": o} for o in outputs]}
    answer = rest.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}


# -- server -----------------------------------------------------------------------------------
def test_server_health_and_metadata(client):
    assert client.is_server_live(headers=MAIN) and client.is_server_ready(headers=MAIN)
    metadata = client.get_server_metadata(headers=MAIN, as_json=True)
    assert metadata["name"] == "serve-app" and "model_repository" in metadata["extensions"]
    assert client.is_model_ready("iris", headers=MAIN)


# -- numeric models: raw contents (tritonclient's default), versioned and not -----------------
NUMERIC = [("iris", True), ("breast-cancer", True), ("diabetes", False), ("wine", True)]


@pytest.mark.parametrize("name, classifier", NUMERIC)
@pytest.mark.parametrize("version", ["", "1"], ids=["unversioned", "version-1"])
@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
def test_numeric_models_answer_as_over_rest(client, rest, name, classifier, version, datatype):
    X = rows_of(name).astype(np.float64 if datatype == "FP64" else np.float32)
    item = triton.InferInput("input-0", list(X.shape), datatype)
    item.set_data_from_numpy(X)
    outputs = ["predict", "predict_proba"] if classifier else ["predict"]
    result = client.infer(name, [item], model_version=version, headers=MAIN,
                          outputs=[triton.InferRequestedOutput(o) for o in outputs])
    path = f"/v2/models/{name}/versions/{version}/infer" if version else f"/v2/models/{name}/infer"
    expected = rest_v2(rest, path, X.astype(np.float64), outputs)
    for output in outputs:
        np.testing.assert_allclose(result.as_numpy(output), expected[output], rtol=1e-12)
    assert result.get_response().model_version == "1"


@pytest.mark.parametrize("name, classifier", NUMERIC[:3])
def test_typed_contents_answer_typed_contents(stub, rest, name, classifier):
    """fp64_contents in, typed contents out (not raw): the protocol's other form."""
    X = rows_of(name)
    request = pb.ModelInferRequest(model_name=name, id="typed-1")
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=list(X.shape))
    tensor.contents.fp64_contents.extend(X.ravel().tolist())
    response = stub.ModelInfer(request, metadata=tuple(MAIN.items()))
    assert response.id == "typed-1" and not response.raw_output_contents
    (predict,) = [o for o in response.outputs if o.name == "predict"]
    got = list(predict.contents.int64_contents if classifier else predict.contents.fp64_contents)
    np.testing.assert_allclose(got, rest_v2(rest, f"/v2/models/{name}/infer", X)["predict"], rtol=1e-12)


# -- mixed-type models: BYTES columns, raw and typed ----------------------------------------
def churn_rows(n: int = 12) -> pd.DataFrame:
    return table_split("churn").X_test.dropna(subset=["region"]).head(n)  # no null BYTES over gRPC


def column_datatype(values: pd.Series) -> str:
    if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values):
        return "BYTES"
    if pd.api.types.is_bool_dtype(values):
        return "BOOL"
    return "INT64" if pd.api.types.is_integer_dtype(values) else "FP64"


def column_array(values: pd.Series, datatype: str) -> np.ndarray:
    return {"BYTES": lambda: values.astype(object).to_numpy(), "BOOL": lambda: values.to_numpy(dtype=bool),
            "INT64": lambda: values.to_numpy(dtype=np.int64), "FP64": lambda: values.to_numpy(dtype=np.float64)}[datatype]()


def rest_labels(rest, name: str, rows: pd.DataFrame) -> tuple[list, np.ndarray]:
    records = orjson.loads(rows.to_json(orient="records"))
    labels = rest.post(f"/v1/models/{name}:predict", json={"instances": records})
    proba = rest.post(f"/v1/models/{name}:predict", json={"instances": records,
                                                          "parameters": {"output": "predict_proba"}})
    assert labels.status_code == 200 and proba.status_code == 200, (labels.text, proba.text)
    return labels.json()["predictions"], np.asarray(proba.json()["predictions"])


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_mixed_type_columns_raw_through_tritonclient(client, rest, name):
    rows = churn_rows()
    inputs = []
    for column in rows.columns:
        datatype = column_datatype(rows[column])
        item = triton.InferInput(column, [len(rows)], datatype)
        item.set_data_from_numpy(column_array(rows[column], datatype))
        inputs.append(item)
    result = client.infer(name, inputs, headers=MAIN, outputs=[triton.InferRequestedOutput("predict"),
                                                               triton.InferRequestedOutput("predict_proba")])
    labels, proba = rest_labels(rest, name, rows)
    assert [v.decode() for v in result.as_numpy("predict")] == labels
    np.testing.assert_allclose(result.as_numpy("predict_proba"), proba, rtol=1e-12)
    assert next(o for o in result.get_response().outputs if o.name == "predict").datatype == "BYTES"


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_mixed_type_columns_as_typed_contents(stub, rest, name):
    rows = churn_rows()
    request = pb.ModelInferRequest(model_name=name)
    for column in rows.columns:
        datatype = column_datatype(rows[column])
        tensor = request.inputs.add(name=column, datatype=datatype, shape=[len(rows), 1])
        values = column_array(rows[column], datatype).tolist()
        field = {"BYTES": "bytes_contents", "BOOL": "bool_contents", "INT64": "int64_contents",
                 "FP64": "fp64_contents"}[datatype]
        getattr(tensor.contents, field).extend([v.encode() for v in values] if datatype == "BYTES" else values)
    response = stub.ModelInfer(request, metadata=tuple(MAIN.items()))
    (predict,) = [o for o in response.outputs if o.name == "predict"]
    assert [v.decode() for v in predict.contents.bytes_contents] == rest_labels(rest, name, rows)[0]


def test_model_metadata_lists_the_columns_and_their_categories(client, serve_cluster):
    metadata = client.get_model_metadata("churn", headers=MAIN, as_json=True)
    inputs = {t["name"]: t["datatype"] for t in metadata["inputs"]}
    assert inputs["plan"] == "BYTES" and inputs["tenure_months"] == "INT64"
    # The Open Inference Protocol's `properties` (Triton's message has no such field): read
    # with the protocol's own message.
    from serve_app.grpc import open_inference_grpc_pb2 as oip

    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                   request_serializer=oip.ModelMetadataRequest.SerializeToString,
                                   response_deserializer=oip.ModelMetadataResponse.FromString)
        properties = call(oip.ModelMetadataRequest(name="churn"), metadata=tuple(MAIN.items())).properties
    assert orjson.loads(properties["inputs.plan"])["categories"] == ["basic", "premium", "standard"]
    assert orjson.loads(properties["content_type"]) == "pd" and orjson.loads(properties["example"])


# -- versions, canary, shadow, the long tail, the repository ----------------------------------
FLEET_APP = {"application": "fleet"}


def test_canary_split_sticks_to_the_request_id_and_shows_the_version(stub):
    X = np.array([IRIS_ROW])
    request = pb.ModelInferRequest(model_name="iris", raw_input_contents=[X.astype("<f8").tobytes()])
    request.inputs.add(name="input-0", datatype="FP64", shape=[1, 4])
    seen = Counter()
    for i in range(60):
        _, call = stub.ModelInfer.with_call(request, metadata=(*FLEET_APP.items(), ("x-request-id", f"r{i}")))
        version = dict(call.trailing_metadata())["model-version"]
        again = dict(stub.ModelInfer.with_call(request, metadata=(
            *FLEET_APP.items(), ("x-request-id", f"r{i}")))[1].trailing_metadata())["model-version"]
        assert again == version  # sticky
        seen[version] += 1
    assert set(seen) == {"1", "2"} and seen["1"] > seen["2"], seen  # 80/20; the shadow never answers


def test_long_tail_models_answer_over_grpc(client, serve_cluster):
    X = rows_of("iris")
    item = triton.InferInput("input-0", list(X.shape), "FP64")
    item.set_data_from_numpy(X)
    result = client.infer("tail-03", [item], headers=FLEET_APP)
    with httpx.Client(base_url=serve_cluster.url + FLEET, timeout=60) as rest:
        expected = rest_v2(rest, "/v2/models/tail-03/infer", X)["predict"]
    np.testing.assert_array_equal(result.as_numpy("predict"), expected)


def test_repository_index_and_load(client):
    index = client.get_model_repository_index(headers=FLEET_APP, as_json=True)["models"]
    assert {"name": "iris", "version": "2", "state": "READY"}.items() <= next(
        m for m in index if m["name"] == "iris" and m["version"] == "2").items()
    client.load_model("diabetes", headers=FLEET_APP)  # reloads in every replica; raises on failure
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("no-such-model", headers=FLEET_APP)
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_explanations_over_grpc(client, rest):
    X = rows_of("breast-cancer", 3)
    item = triton.InferInput("input-0", list(X.shape), "FP64")
    item.set_data_from_numpy(X)
    result = client.infer("breast-cancer", [item], headers=MAIN,
                          outputs=[triton.InferRequestedOutput("contributions")])
    expected = rest_v2(rest, "/v2/models/breast-cancer/infer", X, ("contributions",))["contributions"]
    # FP32 contributions: JSON writes each as its shortest float32 text, gRPC sends the bits.
    np.testing.assert_allclose(result.as_numpy("contributions"), expected, rtol=1e-6)
    assert "explanation" in result.get_response().parameters


# -- errors: every REST refusal has its gRPC status -------------------------------------------
def infer_request(name="iris", shape=(1, 4), datatype="FP64", raw: bytes | None = None, **contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    tensor = request.inputs.add(name="input-0", datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.append(raw)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def churn_request(model: str = "churn", **changes) -> pb.ModelInferRequest:
    row = {"plan": "basic", "region": "north", "contract": "one-year", "tenure_months": 12,
           "monthly_charges": 30.5, "support_calls": 1, "paperless_billing": True, **changes}
    request = pb.ModelInferRequest(model_name=model)
    for key, value in row.items():
        if value is _DROP:
            continue
        if isinstance(value, bytes):
            request.inputs.add(name=key, datatype="BYTES", shape=[1]).contents.bytes_contents.append(value)
        elif isinstance(value, str):
            request.inputs.add(name=key, datatype="BYTES", shape=[1]).contents.bytes_contents.append(value.encode())
        elif isinstance(value, bool):
            request.inputs.add(name=key, datatype="BOOL", shape=[1]).contents.bool_contents.append(value)
        elif isinstance(value, int):
            request.inputs.add(name=key, datatype="INT64", shape=[1]).contents.int64_contents.append(value)
        else:
            request.inputs.add(name=key, datatype="FP64", shape=[1]).contents.fp64_contents.append(value)
    return request


_DROP = object()
ROW = np.array([IRIS_ROW], "<f8").tobytes()
# (case, request, status, reason, fragment)
ERRORS = [
    ("unknown model", infer_request("tulip", raw=ROW), grpc.StatusCode.NOT_FOUND, "model_not_found", "tulip"),
    ("unknown version", pb.ModelInferRequest(model_name="iris", model_version="9", inputs=infer_request(raw=ROW).inputs,
                                             raw_input_contents=[ROW]), grpc.StatusCode.NOT_FOUND, "model_not_found", "9"),
    ("wrong feature count", infer_request(shape=(1, 3), fp64_contents=[1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT,
     "wrong_shape", "[N, 4]"),
    ("shape and data disagree", infer_request(fp64_contents=[1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT,
     "wrong_shape", "needs 4 values"),
    ("raw bytes not a whole number of values", infer_request(raw=b"\x00" * 31), grpc.StatusCode.INVALID_ARGUMENT,
     "wrong_shape", "31 raw bytes"),
    ("contents in the wrong field", infer_request(int64_contents=[1, 2, 3, 4]), grpc.StatusCode.INVALID_ARGUMENT,
     "wrong_type", "fp64_contents"),
    ("unsupported datatype", infer_request(datatype="FP8", raw=ROW), grpc.StatusCode.INVALID_ARGUMENT, "wrong_type",
     "FP8"),
    ("FP16 as typed contents", infer_request(datatype="FP16", fp32_contents=IRIS_ROW), grpc.StatusCode.INVALID_ARGUMENT,
     "wrong_type", "raw_input_contents"),
    ("Infinity", infer_request(fp64_contents=[float("inf"), 1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT,
     "non_finite", "Infinity"),
    ("NaN for a model without missing values", infer_request(fp64_contents=[float("nan"), 1, 2, 3]),
     grpc.StatusCode.INVALID_ARGUMENT, "missing_value", "missing"),
    ("negative shape", infer_request(shape=(-1, 4), raw=ROW), grpc.StatusCode.INVALID_ARGUMENT, "invalid_request",
     "shape"),
    ("no inputs", pb.ModelInferRequest(model_name="iris"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_request",
     "inputs"),
    ("unknown output", pb.ModelInferRequest(model_name="iris", inputs=infer_request(raw=ROW).inputs, raw_input_contents=[ROW],
                                            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="colour")]),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown_output", "colour"),
    ("unseen category", churn_request("churn-xgb", plan="gold"), grpc.StatusCode.INVALID_ARGUMENT, "unknown_category", "'gold'"),
    ("number in a string column", churn_request(plan=3), grpc.StatusCode.INVALID_ARGUMENT, "wrong_type", "plan"),
    ("string in a numeric column", churn_request(tenure_months="long"), grpc.StatusCode.INVALID_ARGUMENT,
     "wrong_type", "tenure_months"),
    ("BYTES not UTF-8", churn_request(plan=b"\xff\xfe"), grpc.StatusCode.INVALID_ARGUMENT, "malformed_binary",
     "UTF-8"),
    ("missing column", churn_request(plan=_DROP), grpc.StatusCode.INVALID_ARGUMENT, "feature_names", "plan"),
    ("unknown column", churn_request(colour="red"), grpc.StatusCode.INVALID_ARGUMENT, "feature_names", "colour"),
]


@pytest.mark.parametrize("case, request_, code, reason, fragment", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_is_its_grpc_status_with_the_reason(stub, case, request_, code, reason, fragment):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_, metadata=tuple(MAIN.items()))
    error = caught.value
    assert error.code() == code, (error.code(), error.details())
    assert fragment in error.details(), error.details()
    assert dict(error.trailing_metadata() or ()).get("reason") == reason


def test_the_token_is_read_from_the_authorization_metadata(stub, serve_cluster):
    request = infer_request(raw=ROW)
    guarded = (("application", "guarded"),)
    for metadata in (guarded, (*guarded, ("authorization", "Bearer wrong"))):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
    ok = stub.ModelInfer(request, metadata=(*guarded, ("authorization", f"Bearer {serve_cluster.api_token}")))
    assert ok.outputs[0].name == "predict"
    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=guarded).live  # probes need no token


def test_a_model_beyond_its_timeout_is_deadline_exceeded(stub, serve_cluster):
    X = rows_of("breast-cancer", 1)
    request = infer_request("breast-cancer", shape=X.shape, raw=X.astype("<f8").tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=(("application", "guarded"),
                                           ("authorization", f"Bearer {serve_cluster.api_token}")))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "0.3 s" in caught.value.details()


def test_an_oversized_message_is_resource_exhausted(stub, serve_cluster):
    limit = serve_cluster.config["applications"][0]["args"]["max_request_bytes"]
    rows = limit // 32 + 1000
    request = infer_request(shape=(rows, 4), raw=np.zeros((rows, 4), "<f8").tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(MAIN.items()))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()


# -- fuzz: bytes and messages no client sends -------------------------------------------------
def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        at = rng.randrange(len(data) + 1)
        if kind < 0.4 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif kind < 0.7:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del data[at:at + rng.randint(1, 8)]
    return bytes(data)


def test_random_and_malformed_messages_never_get_internal_or_unknown(serve_cluster, stub):
    """Random bytes and byte-level mutations of valid requests (numeric raw and typed, BYTES
    columns) sent straight to every RPC: a status the protocol defines for a client's mistake,
    or an answer; never INTERNAL or UNKNOWN. The server answers correctly afterwards."""
    rng = random.Random(7)
    valid = [infer_request(raw=ROW).SerializeToString(), infer_request(fp64_contents=IRIS_ROW).SerializeToString(),
             churn_request().SerializeToString(),
             pb.ModelMetadataRequest(name="churn").SerializeToString(),
             pb.ModelReadyRequest(name="iris", version="1").SerializeToString()]
    methods = ["ModelInfer", "ModelInfer", "ModelInfer", "ModelMetadata", "ModelReady"]
    codes = Counter()
    with grpc.insecure_channel(serve_cluster.grpc_target) as channel:
        calls = {m: channel.unary_unary(f"/inference.GRPCInferenceService/{m}") for m in set(methods)
                 | {"ServerMetadata", "RepositoryIndex"}}
        for i in range(600):
            if i % 5 == 0:
                method, body = rng.choice(sorted(calls)), bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
            else:
                index = rng.randrange(len(valid))
                method, body = methods[index], mutate(valid[index], rng)
            try:
                calls[method](body, metadata=tuple(MAIN.items()), timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
                assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                    method, body[:80], error.details())
    assert codes["OK"] > 5 and codes["INVALID_ARGUMENT"] > 100, codes  # some mutations stay valid
    result = stub.ModelInfer(infer_request(raw=ROW), metadata=tuple(MAIN.items()))
    assert np.frombuffer(result.raw_output_contents[0], "<i8").tolist() == [0]


# -- metrics ----------------------------------------------------------------------------------
def test_grpc_requests_are_counted_with_their_protocol(serve_cluster, stub):
    def count(code):
        return serve_cluster.metric_total("ray_serve_app_requests_total", model="iris", protocol="grpc", code=code)

    before_ok, before_bad = count("200"), count("400")
    stub.ModelInfer(infer_request(raw=ROW), metadata=tuple(MAIN.items()))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request(fp64_contents=[1, 2, 3]), metadata=tuple(MAIN.items()))
    import time

    for _ in range(60):  # counters are flushed a few times a second, scraped every second
        if count("200") > before_ok and count("400") > before_bad:
            return
        time.sleep(0.5)
    pytest.fail(f"gRPC requests not counted: 200 {before_ok}->{count('200')}, 400 {before_bad}->{count('400')}")


# -- the docs' example ------------------------------------------------------------------------
def test_the_docs_python_example_runs_and_prints_what_it_says(serve_cluster, rest):
    """docs/grpc.md's tritonclient example, as written, against this cluster: only the address
    changes, and a tritonclient plugin adds the ``application`` metadata this cluster's three
    applications need (``make serve`` runs one)."""
    import contextlib
    import io
    import re

    from conftest import ROOT

    text = (ROOT / "docs" / "grpc.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'InferenceServerClient("localhost:9000")' in snippet
    snippet = snippet.replace('InferenceServerClient("localhost:9000")',
                              f'InferenceServerClient("{serve_cluster.grpc_target}")')
    snippet = snippet.replace("\nrows = ", "\nclient.register_plugin(_Application())\nrows = ", 1)

    class _Application:
        def __call__(self, request):
            request.headers["application"] = "models"

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "docs/grpc.md", "exec"), {"_Application": _Application})
    lines = printed.getvalue().splitlines()
    expected = re.findall(r"print\(.*\)  # (.*)", snippet)
    assert lines[:2] == expected[:2], (lines, expected)
    row = {"plan": "premium", "region": "south", "contract": "month-to-month", "tenure_months": 3,
           "monthly_charges": 92.5, "support_calls": 4, "paperless_billing": True}
    label = rest.post("/v1/models/churn:predict", json={"instances": [row]}).json()["predictions"][0]
    assert lines[2] == expected[2] == f"[b'{label}']", (lines, expected, label)
