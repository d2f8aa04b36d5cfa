"""Explanations over HTTP: V1 ``:explain`` and the V2 ``contributions``/``bias`` outputs, for an
in-process model, an XGBoost model and a dedicated one (through its handle): bias plus the
contributions equal the margin of the model loaded from the store."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris

from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

pytestmark = pytest.mark.serve

DATA = {"iris": load_iris, "breast-cancer": load_breast_cancer, "diabetes": load_diabetes}


@pytest.mark.parametrize("name", ["iris", "breast-cancer", "diabetes"])
def test_v1_explain_is_additive_to_the_margin(http, serve_cluster, name):
    runtime = load_runtime(ModelStore(str(serve_cluster.store)), name)
    X = DATA[name]().data[::40]
    response = http.post(f"/v1/models/{name}:explain", json={"instances": X.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = runtime.explain(X)
    assert (body["method"], body["margin"], body["outputs"]) == \
        (expected.method, expected.margin_kind, expected.outputs)
    margin = runtime.margin(X)
    assert len(body["explanations"]) == len(X)
    for row, explanation in enumerate(body["explanations"]):
        for k, output in enumerate(body["outputs"]):
            part = explanation[output]
            assert list(part["contributions"]) == runtime.meta.feature_names
            total = part["bias"] + sum(part["contributions"].values())
            assert total == pytest.approx(margin[row, k], rel=1e-4, abs=1e-4)


def test_v2_explanation_outputs_beside_predictions(http, serve_cluster):
    runtime = load_runtime(ModelStore(str(serve_cluster.store)), "breast-cancer")
    X = load_breast_cancer().data[:3]
    body = {"inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP64", "data": X.ravel().tolist()}],
            "outputs": [{"name": "predict"}, {"name": "contributions"}, {"name": "bias"}]}
    response = http.post("/v2/models/breast-cancer/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    tensors = {t["name"]: t for t in answer["outputs"]}
    assert tensors["contributions"]["shape"] == [3, 1, 30] and tensors["bias"]["shape"] == [3, 1]
    contributions = np.reshape(tensors["contributions"]["data"], (3, 1, 30))
    bias = np.reshape(tensors["bias"]["data"], (3, 1))
    np.testing.assert_allclose(bias + contributions.sum(axis=2), runtime.margin(X), rtol=1e-4, atol=1e-4)
    assert tensors["predict"]["data"] == runtime.predict(X).tolist()
    assert answer["parameters"]["explanation"]["method"] == "tree_shap"
    assert answer["parameters"]["feature_names"] == runtime.meta.feature_names


def test_explain_bad_input_is_a_4xx(http):
    response = http.post("/v1/models/iris:explain", json={"instances": [[1, 2]]})
    assert response.status_code == 400 and response.json()["reason"] == "wrong_shape"
    assert http.post("/v1/models/tulip:explain", json={"instances": [[1, 2, 3, 4]]}).status_code == 404
