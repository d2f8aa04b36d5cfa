"""Binary V2 request bodies (serve_app/codecs/binary.py): ``application/x-npy`` and the V2
binary tensor extension give the same matrix, and the live server the same answers, as the
JSON path; unreadable bodies are 4xx with a reason (the live cases are in test_serve_errors.py).
"""

from __future__ import annotations

import io

import httpx
import math

import numpy as np
import orjson
import pytest

from serve_app.codecs import binary, v2
from serve_app.errors import REASONS, BadInput
from serve_app.metadata import Feature, ModelMetadata

IRIS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]])
FEATURES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]


@pytest.fixture(scope="module")
def meta() -> ModelMetadata:
    return ModelMetadata(name="iris", version="1", framework="sklearn", task="classification",
                         features=[Feature(f) for f in FEATURES],
                         artifact="model.skops", sha256="0" * 64, classes=[0, 1, 2])


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def extension_body(tensors: list[tuple[dict, bytes | None]], **request) -> tuple[bytes, str]:
    """A V2 binary-extension body: each tensor dict, with its raw bytes (None: JSON data)."""
    inputs = [{**t, "parameters": {"binary_data_size": len(raw)}} if raw is not None else t for t, raw in tensors]
    header = orjson.dumps({"inputs": inputs, **request})
    return header + b"".join(raw for _, raw in tensors if raw is not None), str(len(header))


def json_matrix(meta, X) -> np.ndarray:
    body = {"inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP64", "data": X.ravel().tolist()}]}
    return v2.decode_request(body, meta, False).inputs.matrix


@pytest.mark.parametrize("array", [
    IRIS, IRIS.astype(np.float32), IRIS.astype(">f8"), np.asfortranarray(IRIS), IRIS.astype(np.int16), IRIS[0],
], ids=["float64", "float32", "big-endian", "fortran-order", "int16", "one-row-1d"])
def test_npy_body_decodes_like_json(meta, array):
    decoded = v2.decode_request(binary.decode_body(npy_bytes(array), "application/x-npy", None), meta, False)
    X, expected = decoded.inputs.matrix, json_matrix(meta, np.atleast_2d(array).astype(np.float64))
    assert X.dtype == np.float64 and decoded.outputs == ("predict",)
    np.testing.assert_array_equal(X, expected)


def test_npy_float64_body_is_not_copied(meta):
    body = npy_bytes(IRIS)
    X = v2.decode_request(binary.decode_body(body, "application/x-npy", None), meta, False).inputs.matrix
    assert np.shares_memory(X, np.frombuffer(body, dtype=np.uint8))


def test_npy_outputs_come_from_the_query(meta):
    request = binary.decode_body(npy_bytes(IRIS), "application/x-npy", None, "predict_proba, predict")
    assert v2.decode_request(request, meta, False).outputs == ("predict_proba", "predict")


def test_extension_matrix_and_per_feature_columns_decode_like_json(meta):
    whole, length = extension_body([({"name": "x", "shape": [3, 4], "datatype": "FP32"},
                                     IRIS.astype("<f4").tobytes())], id="r1")
    decoded = v2.decode_request(binary.decode_body(whole, "", length), meta, False)
    np.testing.assert_array_equal(decoded.inputs.matrix, json_matrix(meta, IRIS.astype(np.float32).astype(np.float64)))
    assert decoded.request_id == "r1"
    # one binary tensor per feature, the last one as JSON data beside them
    columns = [({"name": f, "shape": [3], "datatype": "FP64"}, IRIS[:, i].astype("<f8").tobytes())
               for i, f in enumerate(FEATURES[:3])]
    columns.append(({"name": FEATURES[3], "shape": [3], "datatype": "FP64", "data": IRIS[:, 3].tolist()}, None))
    body, length = extension_body(columns)
    np.testing.assert_array_equal(v2.decode_request(binary.decode_body(body, "", length), meta, False).inputs.matrix, IRIS)


def test_binary_outputs_round_trip():
    request = {"outputs": [{"name": "predict", "parameters": {"binary_data": True}}, {"name": "predict_proba"}]}
    assert binary.binary_outputs(request) == {"predict"}
    assert binary.binary_outputs({"parameters": {"binary_data_output": True}}) == {"predict"}
    proba = np.array([[0.9, 0.1], [0.2, 0.8]])
    response = {"model_name": "m", "outputs": [
        {"name": "predict", "shape": [2], "datatype": "INT64", "data": np.array([0, 1])},
        {"name": "predict_proba", "shape": [2, 2], "datatype": "FP64", "data": proba.ravel()}]}
    body, length = binary.encode_response(response, {"predict", "predict_proba"})
    header = orjson.loads(body[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [16, 32] and all("data" not in o for o in header["outputs"])
    np.testing.assert_array_equal(np.frombuffer(body[length:length + 16], "<i8"), [0, 1])
    np.testing.assert_array_equal(np.frombuffer(body[length + 16:], "<f8").reshape(2, 2), proba)


class Trap:
    """Unpickling this would flip ``Trap.sprung``: an object .npy must never get that far."""

    sprung = False

    def __reduce__(self):
        return (setattr, (Trap, "sprung", True))


BAD = [
    ("not .npy", b"garbage", "application/x-npy", None, "malformed_binary"),
    ("truncated .npy", npy_bytes(IRIS)[:-5], "application/x-npy", None, "malformed_binary"),
    ("trailing bytes after .npy", npy_bytes(IRIS) + b"x", "application/x-npy", None, "malformed_binary"),
    ("strings .npy", npy_bytes(np.array([["a", "b", "c", "d"]])), "application/x-npy", None, "wrong_type"),
    ("complex .npy", npy_bytes(IRIS.astype(np.complex128)), "application/x-npy", None, "wrong_type"),
    ("object .npy (a pickle)", npy_bytes(np.array([Trap()], dtype=object), allow_pickle=True),
     "application/x-npy", None, "wrong_type"),
    ("length not a number", b'{"inputs": []}', "", "twelve", "malformed_binary"),
    ("length beyond the body", b'{"inputs": []}', "", "999", "malformed_binary"),
    ("JSON header cut short", b'{"inputs": []}', "", "5", "malformed_json"),
    ("binary data cut short", None, "", None, "malformed_binary"),
    ("bytes after the last tensor", None, "", None, "malformed_binary"),
    ("size not a whole number of values", None, "", None, "wrong_shape"),
    ("binary BYTES tensor", None, "", None, "wrong_type"),  # strings for a numeric model
    ("negative size", None, "", None, "malformed_binary"),
]


def _bad_extension(name: str) -> tuple[bytes, str]:
    x = {"name": "x", "shape": [1, 4], "datatype": "FP64"}
    if name == "binary data cut short":
        body, length = extension_body([(x, b"\0" * 32)])
        return body[:-1], length
    if name == "bytes after the last tensor":
        body, length = extension_body([(x, b"\0" * 32)])
        return body + b"\0", length
    if name == "size not a whole number of values":
        return extension_body([(x, b"\0" * 31)])
    if name == "binary BYTES tensor":
        return extension_body([({**x, "datatype": "BYTES"}, b"\x01\0\0\0a" * math.prod(x["shape"]))])
    header = orjson.dumps({"inputs": [{**x, "parameters": {"binary_data_size": -8}}]})
    return header, str(len(header))


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_binary_body_is_a_bad_input_with_a_reason(meta, case):
    name, body, content_type, length, reason = case
    if body is None:
        body, length = _bad_extension(name)
    with pytest.raises(BadInput) as caught:
        v2.decode_request(binary.decode_body(body, content_type, length), meta, False)
    assert caught.value.reason == reason and reason in REASONS
    assert not Trap.sprung


def test_object_npy_would_really_unpickle():
    """The trap is real: numpy's own loader, allowed to, springs it."""
    np.load(io.BytesIO(npy_bytes(np.array([Trap()], dtype=object), allow_pickle=True)), allow_pickle=True)
    assert Trap.sprung
    Trap.sprung = False


# -- against the live server ---------------------------------------------------------------------
@pytest.mark.serve
@pytest.mark.parametrize("model", ["iris", "breast-cancer"])
def test_live_binary_answers_equal_json_answers(http, model):
    from sklearn.datasets import load_breast_cancer, load_iris

    X = (load_iris if model == "iris" else load_breast_cancer)().data[:50].astype(np.float64)
    outputs = [{"name": "predict"}, {"name": "predict_proba"}]
    as_json = http.post(f"/v2/models/{model}/infer", json={"inputs": [
        {"name": "x", "shape": list(X.shape), "datatype": "FP64", "data": X.ravel().tolist()}], "outputs": outputs})
    assert as_json.status_code == 200, as_json.text
    expected = {o["name"]: o for o in as_json.json()["outputs"]}

    as_npy = http.post(f"/v2/models/{model}/infer?outputs=predict,predict_proba", content=npy_bytes(X),
                       headers={"content-type": "application/x-npy"})
    assert as_npy.status_code == 200, as_npy.text
    assert {o["name"]: o for o in as_npy.json()["outputs"]} == expected

    body, length = extension_body([({"name": "x", "shape": list(X.shape), "datatype": "FP64"},
                                    X.astype("<f8").tobytes())],
                                  outputs=[{"name": "predict", "parameters": {"binary_data": True}},
                                           {"name": "predict_proba"}])
    as_binary = http.post(f"/v2/models/{model}/infer", content=body,
                          headers={"Inference-Header-Content-Length": length,
                                   "content-type": "application/octet-stream"})
    assert as_binary.status_code == 200, as_binary.text
    header_length = int(as_binary.headers["inference-header-content-length"])
    header = orjson.loads(as_binary.content[:header_length])
    got = {o["name"]: o for o in header["outputs"]}
    assert got["predict_proba"] == expected["predict_proba"]
    labels = np.frombuffer(as_binary.content[header_length:], dtype="<i8")
    assert got["predict"]["parameters"]["binary_data_size"] == labels.nbytes
    assert labels.tolist() == expected["predict"]["data"]


@pytest.mark.serve
def test_tritonclient_binary_tensors_by_default(serve_url):
    """Triton's HTTP client sends inputs and asks for outputs as binary data by default."""
    import tritonclient.http as triton

    X = IRIS.astype(np.float32)
    client = triton.InferenceServerClient(url=serve_url.removeprefix("http://"))
    tensor = triton.InferInput("input-0", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=True)
    outputs = [triton.InferRequestedOutput("predict", binary_data=True),
               triton.InferRequestedOutput("predict_proba", binary_data=True)]
    result = client.infer("iris", [tensor], outputs=outputs)
    reference = httpx.post(f"{serve_url}/v2/models/iris/infer", json={
        "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": X.ravel().tolist()}],
        "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}).json()
    expected = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in reference["outputs"]}
    np.testing.assert_array_equal(result.as_numpy("predict"), expected["predict"])
    np.testing.assert_array_equal(result.as_numpy("predict_proba"), expected["predict_proba"])
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 3 * 8
