"""Every bad-input row of the table in docs/protocols.md, against the live server: a 4xx with a JSON
``{"error": ...}`` naming the problem, and the server keeps answering correctly after it."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytestmark = pytest.mark.serve

JSON = {"content-type": "application/json"}
IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


def v2_body(shape, data, datatype="FP64", name="input-0"):
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


NPY = {"content-type": "application/x-npy"}
BINARY_HEADER = (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", '
                 b'"parameters": {"binary_data_size": 32}}]}')


def npy(rows) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array(rows))
    return buffer.getvalue()


CHURN_ROW = {"plan": "basic", "region": "north", "contract": "one-year", "tenure_months": 12,
             "monthly_charges": 30.5, "support_calls": 1, "paperless_billing": True}
CHURN_TYPES = {"plan": "BYTES", "region": "BYTES", "contract": "BYTES", "tenure_months": "INT64",
               "monthly_charges": "FP64", "support_calls": "INT64", "paperless_billing": "BOOL"}
CHURN_COLUMNS = [{"name": k, "shape": [1], "datatype": CHURN_TYPES[k], "data": [v]} for k, v in CHURN_ROW.items()]
BYTES_HEADER = json.dumps({"inputs": [{**{k: v for k, v in CHURN_COLUMNS[0].items() if k != "data"},
                                       "parameters": {"binary_data_size": 6}}, *CHURN_COLUMNS[1:]]}).encode()

# (table row, method, path, raw body or JSON, headers, status, fragment of the error)
CASES = [
    ("malformed JSON", "POST", "/v1/models/iris:predict", b'{"instances": [[1, 2,', JSON, 400, "malformed JSON"),
    ("NaN literal (not JSON)", "POST", "/v1/models/iris:predict", b'{"instances": [[NaN, 1, 2, 3]]}', JSON, 400, "malformed JSON"),
    ("Infinity literal (not JSON)", "POST", "/v2/models/iris/infer",
     b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [Infinity, 1, 2, 3]}]}', JSON, 400, "malformed JSON"),
    ("number too large for float64", "POST", "/v1/models/iris:predict", b'{"instances": [[1e999, 1, 2, 3]]}', JSON, 400, ""),
    ("wrong content type", "POST", "/v1/models/iris:predict", b'instances=1', {"content-type": "text/plain"}, 415, "content type"),
    ("content type without a media type", "POST", "/v1/models/iris:predict", b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}',
     {"content-type": "; charset=utf-8"}, 415, "content type"),
    ("body not a JSON object", "POST", "/v1/models/iris:predict", [1, 2], JSON, 400, "instances"),
    ("wrong feature count (V1)", "POST", "/v1/models/iris:predict", {"instances": [[1, 2, 3]]}, JSON, 400, "expected 4 features"),
    ("ragged rows", "POST", "/v1/models/iris:predict", {"instances": [IRIS_ROW, [1, 2]]}, JSON, 400, "different lengths"),
    ("unknown feature name", "POST", "/v1/models/iris:predict",
     {"instances": [{"sepal_length_cm": 1, "sepal_width_cm": 2, "petal_length_cm": 3, "petal_width_cm": 4, "colour": 1}]},
     JSON, 400, "unknown features ['colour']"),
    ("missing feature name", "POST", "/v1/models/iris:predict",
     {"instances": [{"sepal_length_cm": 1, "sepal_width_cm": 2, "petal_length_cm": 3}]}, JSON, 400, "missing features ['petal_width_cm']"),
    ("non-numeric string", "POST", "/v1/models/iris:predict", {"instances": [[5.1, "wide", 1.4, 0.2]]}, JSON, 400, "must be numbers"),
    ("null for a model without missing-value support", "POST", "/v1/models/iris:predict",
     {"instances": [[5.1, None, 1.4, 0.2]]}, JSON, 400, "missing values"),
    ("empty instances", "POST", "/v1/models/iris:predict", {"instances": []}, JSON, 400, "empty"),
    ("unknown output", "POST", "/v1/models/iris:predict",
     {"instances": [IRIS_ROW], "parameters": {"output": "logits"}}, JSON, 400, "unknown output"),
    ("probabilities of a regressor", "POST", "/v2/models/diabetes/infer",
     {**v2_body([1, 10], [0.0] * 10), "outputs": [{"name": "predict_proba"}]}, JSON, 400, "classification"),
    ("V2 shape/data mismatch", "POST", "/v2/models/iris/infer", v2_body([2, 4], IRIS_ROW), JSON, 400, "needs 8 values"),
    ("V2 wrong feature count", "POST", "/v2/models/iris/infer", v2_body([1, 3], [1, 2, 3]), JSON, 400, "expected shape [N, 4]"),
    ("V2 unknown datatype", "POST", "/v2/models/iris/infer", v2_body([1, 4], IRIS_ROW, "FP128"), JSON, 400, "unsupported datatype"),
    ("V2 data not of its datatype", "POST", "/v2/models/iris/infer", v2_body([1, 4], IRIS_ROW, "INT32"), JSON, 400, "does not match datatype"),
    ("V2 missing inputs", "POST", "/v2/models/iris/infer", {"outputs": []}, JSON, 400, "inputs"),
    # Found by fuzzing (tests/test_fuzz_*.py); each was a 500 before.
    ("V2 datatype not a string", "POST", "/v2/models/iris/infer", v2_body([1, 4], IRIS_ROW, ["FP64"]), JSON, 400,
     "unsupported datatype"),
    ("V2 shape numpy cannot build", "POST", "/v2/models/iris/infer", v2_body([1] * 70, [1.0]), JSON, 400,
     "not a usable tensor shape"),
    ("finite value overflowing inside the model", "POST", "/v1/models/iris:predict",
     b'{"instances": [[1.7976931348623157e308, 3.5, 1.4, 0.2]]}', JSON, 400, "too large for this model"),
    ("finite value overflowing inside a dedicated model", "POST", "/v1/models/diabetes:predict",
     b'{"instances": [[1.7976931348623157e308, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}', JSON, 400, "too large for this model"),
    # Binary bodies (docs/protocols.md): .npy and the V2 binary tensor extension.
    ("binary: body not .npy", "POST", "/v2/models/iris/infer", b"garbage", NPY, 400, "not a readable .npy"),
    ("binary: .npy of strings", "POST", "/v2/models/iris/infer", npy([["a", "b", "c", "d"]]), NPY, 400, "not numeric"),
    ("binary: .npy wrong feature count", "POST", "/v2/models/iris/infer", npy([[1.0, 2.0, 3.0]]), NPY, 400,
     "expected shape [N, 4]"),
    ("binary: header length not a number", "POST", "/v2/models/iris/infer", b'{"inputs": []}',
     {"inference-header-content-length": "twelve"}, 400, "byte count"),
    ("binary: tensor data cut short", "POST", "/v2/models/iris/infer", BINARY_HEADER + b"\0" * 31,
     {"inference-header-content-length": str(len(BINARY_HEADER))}, 400, "runs past the end"),
    # Mixed-type models (docs/your-own-model.md#what-is-refused).
    ("unseen category", "POST", "/v1/models/churn-xgb:predict", {"instances": [{**CHURN_ROW, "plan": "gold"}]}, JSON,
     400, "['gold'] never seen in training"),
    ("string in an integer column", "POST", "/v1/models/churn:predict",
     {"instances": [{**CHURN_ROW, "tenure_months": "12"}]}, JSON, 400, "expects integers"),
    ("number in a string column", "POST", "/v2/models/churn/infer",
     {"inputs": [*CHURN_COLUMNS[1:], {**CHURN_COLUMNS[0], "datatype": "INT64", "data": [3]}]}, JSON, 400,
     "expects strings"),
    ("BYTES element not UTF-8", "POST", "/v2/models/churn/infer", BYTES_HEADER + b"\x02\x00\x00\x00\xff\xfe",
     {"inference-header-content-length": str(len(BYTES_HEADER))}, 400, "not UTF-8"),
    ("CSV that cannot be parsed", "POST", "/v1/models/churn/invocations", b'plan,region\n"basic,north\n',
     {"content-type": "text/csv"}, 400, "malformed CSV"),
    ("MLflow body without a format", "POST", "/invocations", {"rows": []}, JSON, 400, "exactly one of"),
    ("unknown model (V1)", "POST", "/v1/models/tulip:predict", {"instances": [IRIS_ROW]}, JSON, 404, "not served"),
    ("unknown model (V2)", "POST", "/v2/models/tulip/infer", v2_body([1, 4], IRIS_ROW), JSON, 404, "not served"),
    ("unknown version", "POST", "/v2/models/iris/versions/99/infer", v2_body([1, 4], IRIS_ROW), JSON, 404, "no version '99'"),
    ("unknown model metadata", "GET", "/v2/models/tulip", None, {}, 404, "not served"),
    ("unknown path", "GET", "/v3/anything", None, {}, 404, "Not Found"),
    ("wrong method", "GET", "/v2/models/iris/infer", None, {}, 405, "Method Not Allowed"),
]


# The machine-readable reason each rejection carries (also the serve_app_input_errors label);
# the last two cases are answered by the web framework before a model is involved.
REASONS = {
    "malformed JSON": "malformed_json", "NaN literal (not JSON)": "malformed_json",
    "Infinity literal (not JSON)": "malformed_json", "number too large for float64": "malformed_json",
    "wrong content type": "unsupported_media_type", "content type without a media type": "unsupported_media_type", "body not a JSON object": "invalid_request",
    "wrong feature count (V1)": "wrong_shape", "ragged rows": "wrong_shape",
    "unknown feature name": "feature_names", "missing feature name": "feature_names",
    "non-numeric string": "wrong_type", "null for a model without missing-value support": "missing_value",
    "empty instances": "wrong_shape", "unknown output": "unknown_output",
    "probabilities of a regressor": "unknown_output", "V2 shape/data mismatch": "wrong_shape",
    "V2 wrong feature count": "wrong_shape", "V2 unknown datatype": "wrong_type",
    "V2 data not of its datatype": "wrong_type", "V2 missing inputs": "invalid_request",
    "V2 datatype not a string": "wrong_type", "V2 shape numpy cannot build": "wrong_shape",
    "finite value overflowing inside the model": "non_finite", "finite value overflowing inside a dedicated model": "non_finite",
    "binary: body not .npy": "malformed_binary", "binary: .npy of strings": "wrong_type",
    "binary: .npy wrong feature count": "wrong_shape", "binary: header length not a number": "malformed_binary",
    "binary: tensor data cut short": "malformed_binary",
    "unseen category": "unknown_category", "string in an integer column": "wrong_type",
    "number in a string column": "wrong_type", "BYTES element not UTF-8": "malformed_binary",
    "CSV that cannot be parsed": "malformed_csv", "MLflow body without a format": "invalid_request",
    "unknown model (V1)": "model_not_found", "unknown model (V2)": "model_not_found",
    "unknown version": "model_not_found", "unknown model metadata": "model_not_found",
    "unknown path": None, "wrong method": None,
}


def test_every_case_has_a_reason():
    assert set(REASONS) == {c[0] for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(http, case):
    _, method, path, body, headers, status, fragment = case
    kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    response = http.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert fragment in response.json()["error"]
    assert response.json().get("reason") == REASONS[case[0]]
    # ... and the server still serves correct answers right after.
    ok = http.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]})
    assert ok.status_code == 200 and ok.json() == {"predictions": [0]}


def test_oversized_body_is_413(http, serve_cluster):
    limit = serve_cluster.config["applications"][0]["args"]["max_request_bytes"]
    row = ",".join(["1.5"] * 4)
    n_rows = limit // len(row) + 10
    body = b'{"instances": [' + b",".join([f"[{row}]".encode()] * n_rows) + b"]}"
    assert len(body) > limit
    response = http.post("/v1/models/iris:predict", content=body, headers=JSON)
    assert response.status_code == 413, response.text[:300]
    assert "exceeds the limit" in response.json()["error"]
    assert http.post("/v1/models/iris:predict", json={"instances": [IRIS_ROW]}).status_code == 200


def test_missing_content_type_is_read_as_json(http):
    """Clients such as tritonclient send no content type at all: treat it as JSON."""
    response = http.post("/v1/models/iris:predict", content=b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}')
    assert response.status_code == 200, response.text
