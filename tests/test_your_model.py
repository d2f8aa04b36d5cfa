"""Your own model, against the real local Ray Serve: the mixed-type demos (a ColumnTransformer
pipeline with string labels, XGBoost with native categorical columns) answer exactly their
in-memory estimators over V1 records, V2 per-column tensors through ``tritonclient`` (JSON and
the binary extension) and MLflow's bodies; a model published while the server runs is served
by the long tail without a redeploy; bad input is a 4xx naming the problem."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.http as triton

from serve_app import publish
from serve_app.store import ModelStore
from serve_app.tools.train import CHURN_LABELS, TABLE_MODELS, table_split

pytestmark = pytest.mark.serve
ROWS = 25


@pytest.fixture(scope="module")
def fitted():
    """The demos' in-memory estimators (deterministic fits of what the server published) and rows."""
    out = {}
    for name, spec in TABLE_MODELS.items():
        split = table_split(name)
        y = np.searchsorted(CHURN_LABELS, split.y_train) if spec.framework == "xgboost" else split.y_train
        out[name] = (spec.make_estimator().fit(split.X_train, y), split.X_test.head(ROWS))
    return out


def records(frame: pd.DataFrame) -> list[dict]:
    return orjson.loads(frame.to_json(orient="records"))


def reference(estimator, rows):
    proba = estimator.predict_proba(rows)
    return np.asarray(CHURN_LABELS)[proba.argmax(axis=1)].tolist(), proba


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_v1_records_and_probabilities_by_label(http, fitted, name):
    estimator, rows = fitted[name]
    labels, proba = reference(estimator, rows)
    answer = http.post(f"/v1/models/{name}:predict", json={"instances": records(rows)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == labels
    keyed = http.post(f"/v1/models/{name}:predict", json={
        "instances": records(rows), "parameters": {"output": "predict_proba", "labels": True}}).json()["predictions"]
    np.testing.assert_allclose([[p[c] for c in CHURN_LABELS] for p in keyed], proba, rtol=1e-9)


def triton_inputs(rows: pd.DataFrame, binary_data: bool) -> list:
    inputs = []
    for column in rows.columns:
        values = rows[column]
        if isinstance(values.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(values):
            array, datatype = values.astype(object).to_numpy(), "BYTES"
        elif pd.api.types.is_bool_dtype(values):
            array, datatype = values.to_numpy(), "BOOL"
        elif pd.api.types.is_integer_dtype(values):
            array, datatype = values.to_numpy(dtype=np.int64), "INT64"
        else:
            array, datatype = values.to_numpy(dtype=np.float64), "FP64"
        item = triton.InferInput(column, [len(rows)], datatype)
        item.set_data_from_numpy(array, binary_data=binary_data)
        inputs.append(item)
    return inputs


@pytest.mark.parametrize("binary_data", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_v2_columns_through_tritonclient(serve_url, fitted, name, binary_data):
    """One tensor per column, strings as BYTES, as tritonclient sends them (rows without
    missing strings: tritonclient has no null BYTES element); labels come back as BYTES."""
    estimator, rows = fitted[name]
    rows = rows.dropna(subset=["region"])
    labels, proba = reference(estimator, rows)
    client = triton.InferenceServerClient(url=serve_url.removeprefix("http://"))
    outputs = [triton.InferRequestedOutput(o, binary_data=binary_data) for o in ("predict", "predict_proba")]
    result = client.infer(name, triton_inputs(rows, binary_data), outputs=outputs)
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("predict")] == labels
    np.testing.assert_allclose(result.as_numpy("predict_proba"), proba, rtol=1e-9)
    assert next(o for o in result.get_response()["outputs"] if o["name"] == "predict")["datatype"] == "BYTES"


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_mlflow_scoring_protocol(http, fitted, name):
    estimator, rows = fitted[name]
    labels, _ = reference(estimator, rows)
    split = orjson.loads(rows.to_json(orient="split"))
    for body in ({"dataframe_split": {"columns": split["columns"], "data": split["data"]}},
                 {"dataframe_records": records(rows)}, {"instances": records(rows)}):
        answer = http.post(f"/v1/models/{name}/invocations", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"predictions": labels}
    csv = http.post(f"/v1/models/{name}/invocations", content=rows.to_csv(index=False),
                    headers={"content-type": "text/csv"})
    assert csv.status_code == 200 and csv.json() == {"predictions": labels}, csv.text
    for body in ({"dataframe_split": {"columns": split["columns"], "data": split["data"]}},
                 {"dataframe_records": records(rows)}, {"instances": records(rows)}):
        proba = http.post(f"/v1/models/{name}/invocations", json={**body, "params": {"output": "predict_proba"}})
        assert proba.status_code == 200, proba.text
        np.testing.assert_allclose(proba.json()["predictions"], reference(estimator, rows)[1], rtol=1e-9)


def test_invocations_without_a_model_answers_with_the_configured_one(http, serve_cluster, fitted):
    configured = serve_cluster.config["applications"][0]["args"]["invocations_model"]
    estimator, rows = fitted[configured]
    answer = http.post("/invocations", json={"dataframe_records": records(rows)})
    assert answer.status_code == 200 and answer.headers["x-model-version"]
    assert answer.json()["predictions"] == reference(estimator, rows)[0]


def test_metadata_shows_the_schema(http):
    v1 = http.get("/v1/models/churn").json()
    by_name = {f["name"]: f for f in v1["features"]}
    assert by_name["plan"]["dtype"] == "string" and by_name["plan"]["categories"] == ["basic", "premium", "standard"]
    assert by_name["region"]["nullable"] and by_name["tenure_months"]["dtype"] == "int64"
    assert by_name["plan"]["datatype"] == "BYTES" and by_name["paperless_billing"]["datatype"] == "BOOL"
    assert v1["example"] and set(v1["example"][0]) == set(by_name)
    v2 = http.get("/v2/models/churn-xgb").json()
    inputs = {t["name"]: t for t in v2["inputs"]}
    assert inputs["plan"]["datatype"] == "BYTES" and inputs["tenure_months"]["datatype"] == "INT64"
    assert inputs["paperless_billing"]["datatype"] == "BOOL"
    assert {o["name"]: o["datatype"] for o in v2["outputs"]}["predict"] == "BYTES"
    # The stored example is a working request.
    example = http.post("/v1/models/churn-xgb:predict", json={"instances": v1["example"]})
    assert example.status_code == 200 and set(example.json()["predictions"]) <= set(CHURN_LABELS)


BAD = [
    ({"plan": "gold"}, "churn-xgb", "unknown_category", "'gold'"),
    ({"tenure_months": "long"}, "churn", "wrong_type", "tenure_months"),
    ({"plan": 3}, "churn", "wrong_type", "expects strings"),
    ({"monthly_charges": None, "plan": None}, "churn", "missing_value", "'plan'"),
    ({"colour": "red"}, "churn", "feature_names", "unknown features ['colour']"),
]


@pytest.mark.parametrize("change, name, reason, fragment", BAD)
def test_bad_rows_are_a_400_with_a_reason(http, fitted, change, name, reason, fragment):
    row = {**records(fitted[name][1].head(1))[0], **change}
    for path, body in ((f"/v1/models/{name}:predict", {"instances": [row]}),
                       (f"/v1/models/{name}/invocations", {"dataframe_records": [row]})):
        answer = http.post(path, json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["reason"] == reason and fragment in answer.json()["error"]


def test_a_missing_column_and_mixed_row_shapes_are_a_400(http, fitted):
    row = records(fitted["churn"][1].head(1))[0]
    missing = {k: v for k, v in row.items() if k != "plan"}
    for path, body in (("/v1/models/churn:predict", {"instances": [missing]}),
                       ("/v1/models/churn/invocations", {"dataframe_records": [missing]})):
        answer = http.post(path, json=body)
        assert answer.status_code == 400 and answer.json()["reason"] == "feature_names", answer.text
        assert "missing features ['plan']" in answer.json()["error"]
    mixed_rows = http.post("/v1/models/churn:predict", json={"instances": [row, list(row.values())]})
    assert mixed_rows.status_code == 400 and mixed_rows.json()["reason"] == "invalid_request", mixed_rows.text
    columns = [{"name": k, "datatype": "BYTES" if isinstance(v, str) or v is None else
                "BOOL" if isinstance(v, bool) else "INT64" if isinstance(v, int) else "FP64",
                "shape": [2 if k == "plan" else 1], "data": [v, v] if k == "plan" else [v]} for k, v in row.items()]
    ragged = http.post("/v2/models/churn/infer", json={"inputs": columns})
    assert ragged.status_code == 400 and ragged.json()["reason"] == "wrong_shape", ragged.text
    assert "differ in length" in ragged.json()["error"]


def test_a_value_the_users_pipeline_refuses_fails_alone_in_its_batch(http, serve_cluster):
    """A pipeline whose encoder raises on unknown values (handle_unknown="error"), published
    as allowing them, so the edge lets "gold" through and the pipeline itself raises: that
    request gets a 400 with the pipeline's message, and the concurrent requests sharing its
    batch get their answers."""
    import httpx
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    split = table_split("churn")
    X = split.X_train[["plan", "tenure_months"]]
    model = Pipeline([("prepare", ColumnTransformer([("plan", OneHotEncoder(), ["plan"])], remainder="passthrough")),
                      ("classify", LogisticRegression(max_iter=500))]).fit(X, split.y_train)
    publish(model, "strict-churn", X, store=ModelStore(str(serve_cluster.store)), unknown_categories="allow")
    good = [{"plan": "basic", "tenure_months": 3}, {"plan": "premium", "tenure_months": 40}]
    expected = model.predict(pd.DataFrame(good)).tolist()

    def ask(rows):
        with httpx.Client(base_url=serve_cluster.url, timeout=60) as client:
            return client.post("/v1/models/strict-churn:predict", json={"instances": rows})

    for _ in range(3):  # batches form from arrival times: a few rounds
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, [good] * 5 + [[{"plan": "gold", "tenure_months": 3}]] + [good] * 5))
        refused = answers.pop(5)
        assert refused.status_code == 400 and refused.json()["reason"] == "rejected_by_model", refused.text
        assert "gold" in refused.json()["error"]
        assert [(a.status_code, a.json()["predictions"]) for a in answers] == [(200, expected)] * 10


def test_concurrent_single_rows_batch_and_each_gets_its_own_answer(serve_url, fitted):
    """Mixed-type rows of concurrent requests share model calls (one frame) and are split back."""
    import httpx

    estimator, rows = fitted["churn"]
    labels, _ = reference(estimator, rows)
    one_rows = records(rows)

    def ask(i):
        with httpx.Client(base_url=serve_url, timeout=30) as client:
            return client.post("/v1/models/churn:predict", json={"instances": [one_rows[i]]}).json()["predictions"][0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, list(range(len(one_rows))) * 4))
    assert answers == labels * 4


def test_a_model_published_while_serving_is_served_by_the_long_tail(http, serve_cluster):
    """A data scientist's own pipeline, published into the running server's store: the long
    tail serves it at once (no redeploy), exactly as it predicts in memory; version 2 is
    addressable by number and becomes "latest" after a reload."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    split = table_split("churn")
    X = split.X_train.drop(columns=["region", "monthly_charges"])
    rows = split.X_test.drop(columns=["region", "monthly_charges"]).head(ROWS)

    def fit(trees):
        prepare = make_column_transformer((OneHotEncoder(handle_unknown="ignore"), ["plan", "contract"]),
                                          remainder="passthrough")
        return make_pipeline(prepare, RandomForestClassifier(n_estimators=trees, random_state=0)).fit(X, split.y_train)

    store = ModelStore(str(serve_cluster.store))
    first, second = fit(5), fit(40)
    assert publish(first, "my-churn", X, store=store).version == "1"
    answer = http.post("/v1/models/my-churn:predict", json={"instances": records(rows)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == first.predict(rows).tolist()
    assert publish(second, "my-churn", X, store=store).version == "2"
    v2 = http.post("/v1/models/my-churn/versions/2:predict", json={"instances": records(rows)})
    assert v2.json()["predictions"] == second.predict(rows).tolist()
    assert http.post("/v2/repository/models/my-churn/load").status_code == 200
    latest = http.post("/v1/models/my-churn:predict", json={"instances": records(rows)})
    assert latest.headers["x-model-version"] == "2" and latest.json()["predictions"] == second.predict(rows).tolist()
