"""The HTTP API against a real local Ray Serve: KServe V1, Open Inference Protocol V2
(driven by Triton's own client too), OpenAPI docs, and correctness of every answer against
the model loaded straight from the store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import datasets

from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

pytestmark = pytest.mark.serve

IRIS = datasets.load_iris().data
CANCER = datasets.load_breast_cancer().data
DIABETES = datasets.load_diabetes().data


@pytest.fixture(scope="module")
def local(serve_cluster):
    """The served models loaded in-process from the same store: the reference answers."""
    store = ModelStore(str(serve_cluster.store))
    return {name: load_runtime(store, name) for name in ("iris", "breast-cancer", "diabetes")}


def test_v1_lists_models(http, serve_cluster):
    declared = [m["name"] for m in serve_cluster.config["applications"][0]["args"]["models"]]
    assert {"iris", "breast-cancer", "diabetes"} <= set(declared)
    assert http.get("/v1/models").json() == {"models": sorted(declared)}


def test_v1_model_metadata(http, local):
    body = http.get("/v1/models/breast-cancer").json()
    assert body["ready"] is True
    assert body["framework"] == "xgboost" and body["task"] == "classification"
    assert body["classes"] == [0, 1]
    assert [f["name"] for f in body["features"]] == local["breast-cancer"].meta.feature_names
    assert body["sha256"] == local["breast-cancer"].meta.sha256


@pytest.mark.parametrize("name,X", [("iris", IRIS[::15]), ("breast-cancer", CANCER[::60]),
                                    ("diabetes", DIABETES[::50])])
def test_v1_predict_matches_model(http, local, name, X):
    response = http.post(f"/v1/models/{name}:predict", json={"instances": X.tolist()})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["predictions"], local[name].predict(X), rtol=1e-6)


def test_v1_named_features_and_probabilities(http, local):
    names = local["iris"].meta.feature_names
    rows = [dict(zip(names, row)) for row in IRIS[[0, 60, 120]].tolist()]
    response = http.post("/v1/models/iris:predict",
                         json={"instances": rows, "parameters": {"output": "predict_proba"}})
    assert response.status_code == 200, response.text
    proba = np.asarray(response.json()["predictions"])
    np.testing.assert_allclose(proba, local["iris"].predict_proba(IRIS[[0, 60, 120]]), rtol=1e-6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_v1_null_is_missing_for_xgboost(http, local):
    row = CANCER[0].tolist()
    row[3] = None
    response = http.post("/v1/models/breast-cancer:predict", json={"instances": [row]})
    assert response.status_code == 200, response.text
    X = CANCER[:1].copy()
    X[0, 3] = np.nan
    assert response.json()["predictions"] == local["breast-cancer"].predict(X).tolist()


def test_v2_server_endpoints(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    meta = http.get("/v2").json()
    assert meta["name"] == "serve-app" and "version" in meta


def test_v2_model_metadata_and_ready(http):
    meta = http.get("/v2/models/iris").json()
    assert meta["inputs"][0]["shape"] == [-1, 4]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"predict": [-1], "predict_proba": [-1, 3]}
    assert http.get("/v2/models/iris/versions/1").json() == meta
    assert http.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    assert http.get("/v2/models/diabetes/versions/1/ready").status_code == 200
    regressor = http.get("/v2/models/diabetes").json()
    assert [o["name"] for o in regressor["outputs"]] == ["predict"]


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64"])
def test_v2_infer_datatypes_nested_and_flat(http, local, datatype):
    X = np.round(IRIS[::25]).astype(np.float64) if datatype.startswith("INT") else IRIS[::25]
    for data in (X.tolist(), X.reshape(-1).tolist()):
        body = {"id": "req-1", "inputs": [{"name": "input-0", "shape": list(X.shape),
                                             "datatype": datatype, "data": data}],
                "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}
        if datatype.startswith("INT"):
            body["inputs"][0]["data"] = np.asarray(data).astype(int).tolist()
        response = http.post("/v2/models/iris/versions/1/infer", json=body)
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["id"] == "req-1" and out["model_name"] == "iris" and out["model_version"] == "1"
        outputs = {o["name"]: o for o in out["outputs"]}
        expected_X = X.astype(np.float32).astype(np.float64) if datatype == "FP32" else X
        assert outputs["predict"]["datatype"] == "INT64"
        assert outputs["predict"]["data"] == local["iris"].predict(expected_X).tolist()
        assert outputs["predict_proba"]["shape"] == [len(X), 3]


def test_v2_bool_and_columnar_inputs(http, local):
    names = local["diabetes"].meta.feature_names
    X = DIABETES[:5]
    inputs = [{"name": n, "shape": [5], "datatype": "FP64", "data": X[:, j].tolist()}
              for j, n in reversed(list(enumerate(names)))]  # any order: matched by name
    response = http.post("/v2/models/diabetes/infer", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["datatype"] == "FP64" and out["shape"] == [5]
    np.testing.assert_allclose(out["data"], local["diabetes"].predict(X), rtol=1e-6)
    bools = np.array([[True, False, True, True]])
    response = http.post("/v2/models/iris/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "BOOL", "data": bools.tolist()}]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == local["iris"].predict(bools.astype(float)).tolist()


@pytest.mark.parametrize("model,X", [("breast-cancer", CANCER[::40]), ("diabetes", DIABETES[::40])])
def test_v2_with_tritonclient(serve_url, local, model, X):
    """A V2 client this project did not write: Triton's HTTP client, JSON tensors."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(serve_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model)
    metadata = client.get_model_metadata(model)
    assert metadata["inputs"][0]["shape"] == [-1, X.shape[1]]
    tensor = triton.InferInput("input-0", list(X.shape), "FP64")
    tensor.set_data_from_numpy(X, binary_data=False)
    wanted = ["predict", "predict_proba"] if local[model].meta.is_classifier else ["predict"]
    result = client.infer(model, [tensor],
                          outputs=[triton.InferRequestedOutput(n, binary_data=False) for n in wanted])
    np.testing.assert_allclose(result.as_numpy("predict"), local[model].predict(X), rtol=1e-6)
    if "predict_proba" in wanted:
        np.testing.assert_allclose(result.as_numpy("predict_proba"), local[model].predict_proba(X),
                                   rtol=1e-5)
        assert result.as_numpy("predict_proba").shape == (len(X), 2)


def test_openapi_docs(http):
    spec = http.get("/openapi.json").json()
    for path in ("/v1/models/{name}:predict", "/v2/models/{name}/infer", "/v2/health/ready"):
        assert path in spec["paths"]
    body = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert "inputs" in body["application/json"]["schema"]["properties"]
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
