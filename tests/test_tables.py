"""Mixed-type tables end to end outside Ray: the demo customer models published by
``publish()``, requests in every protocol's form decoded against the stored schema, and the
served runtime's answers compared with the in-memory estimators' on the same rows. Every
bad-input case of docs/your-own-model.md#what-is-refused is here with its reason."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import orjson
import pandas as pd
import pytest
import tritonclient.http as triton

from serve_app.codecs import binary, mlflow, tables, v1, v2
from serve_app.config import ModelSpec
from serve_app.errors import BadInput
from serve_app.runtimes import load_runtime
from serve_app.serving.worker import ModelWorker
from serve_app.store import ModelStore
from serve_app.tools.train import CHURN_LABELS, TABLE_MODELS, table_split, train_model

ROWS = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    for name in TABLE_MODELS:
        train_model(name, store)
    return store


@pytest.fixture(scope="module")
def fitted():
    """The in-memory estimators the demos publish (deterministic fits) and their test rows."""
    out = {}
    for name, spec in TABLE_MODELS.items():
        split = table_split(name)
        if spec.framework == "xgboost":
            y = np.searchsorted(CHURN_LABELS, split.y_train)
            estimator = spec.make_estimator().fit(split.X_train, y)
        else:
            estimator = spec.make_estimator().fit(split.X_train, split.y_train)
        out[name] = (estimator, split.X_test.head(ROWS))
    return out


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as a JSON client sends them (NaN as null)."""
    return orjson.loads(frame.to_json(orient="records"))


def expected(fitted, name):
    estimator, rows = fitted[name]
    proba = estimator.predict_proba(rows)
    return np.asarray(CHURN_LABELS)[proba.argmax(axis=1)], proba


def served(store, name, decoded):
    runtime = load_runtime(store, name)
    X = runtime.prepare(decoded.inputs.data)
    return runtime.predict(X), runtime.predict_proba(X)


def assert_same(store, fitted, name, decoded):
    labels, proba = served(store, name, decoded)
    want_labels, want_proba = expected(fitted, name)
    assert [str(v) for v in labels] == want_labels.tolist()
    np.testing.assert_allclose(proba, want_proba, rtol=1e-9, atol=1e-12)


# -- every protocol's form answers as the model in memory ------------------------------------------
@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_published_schema(store, name):
    meta = store.read_metadata(name)
    kinds = {f.name: f.dtype for f in meta.features}
    text = "category" if name == "churn-xgb" else "string"
    assert kinds == {"plan": text, "region": text, "contract": text, "tenure_months": "int64",
                     "monthly_charges": "float64", "support_calls": "int64", "paperless_billing": "bool"}
    region = next(f for f in meta.features if f.name == "region")
    assert region.categories == ["east", "north", "south", "west"] and region.nullable
    assert meta.classes == CHURN_LABELS and meta.input_form == "frame"
    assert meta.unknown_categories == ("allow" if name == "churn" else "reject")
    assert set(meta.libraries) >= {"sklearn", "xgboost", "numpy", "skops", "pandas"}
    assert len(meta.example) == 3 and set(meta.example[0]) == set(kinds)
    assert meta.reference_stats["plan"]["categories"] == ["basic", "premium", "standard"]


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_v1_records_and_rows(store, fitted, name):
    meta = store.read_metadata(name)
    body = records(fitted[name][1])
    assert_same(store, fitted, name, v1.decode_request({"instances": body}, meta, False))
    rows = [[r[f] for f in meta.feature_names] for r in body]
    assert_same(store, fitted, name, v1.decode_request({"instances": rows}, meta, False))


def v2_columns(frame: pd.DataFrame, shape_2d: bool = False) -> list[dict]:
    tensors = []
    for name in frame.columns:
        column = frame[name]
        values = records(frame[[name]])
        data = [r[name] for r in values]
        if isinstance(column.dtype, pd.CategoricalDtype) or column.dtype == object or pd.api.types.is_string_dtype(column):
            datatype = "BYTES"
        elif pd.api.types.is_bool_dtype(column):
            datatype = "BOOL"
        elif pd.api.types.is_integer_dtype(column):
            datatype = "INT64"
        else:
            datatype = "FP64"
        tensors.append({"name": name, "datatype": datatype, "shape": [len(data), 1] if shape_2d else [len(data)],
                        "data": data})
    return tensors


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
@pytest.mark.parametrize("shape_2d", [False, True])
def test_v2_json_columns(store, fitted, name, shape_2d):
    meta = store.read_metadata(name)
    body = {"inputs": v2_columns(fitted[name][1], shape_2d), "parameters": {"content_type": "pd"},
            "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}
    assert_same(store, fitted, name, v2.decode_request(body, meta, False))


def triton_inputs(frame: pd.DataFrame, binary_data: bool) -> list:
    inputs = []
    for tensor in v2_columns(frame):
        data = tensor["data"]
        if tensor["datatype"] == "BYTES":
            array = np.array(["" if v is None else v for v in data], dtype=object)
        elif tensor["datatype"] == "FP64":
            array = np.array([np.nan if v is None else v for v in data], dtype=np.float64)
        else:
            array = np.array(data, dtype=np.int64 if tensor["datatype"] == "INT64" else bool)
        item = triton.InferInput(tensor["name"], [len(array)], tensor["datatype"])
        item.set_data_from_numpy(array, binary_data=binary_data)
        inputs.append(item)
    return inputs


@pytest.mark.parametrize("binary_data", [False, True])
def test_v2_bodies_tritonclient_writes(store, fitted, binary_data):
    """tritonclient's own request bodies (BYTES length-prefixed in the binary extension), on
    rows without missing strings (tritonclient has no null BYTES element)."""
    name = "churn"
    estimator, rows = fitted[name]
    rows = rows.dropna().head(20)
    fitted_here = {name: (estimator, rows)}
    outputs = [triton.InferRequestedOutput("predict", binary_data=binary_data),
               triton.InferRequestedOutput("predict_proba", binary_data=binary_data)]
    body, length = triton.InferenceServerClient.generate_request_body(triton_inputs(rows, binary_data), outputs)
    request = binary.decode_body(body, "", str(length)) if length is not None else orjson.loads(body)
    decoded = v2.decode_request(request, store.read_metadata(name), False)
    assert_same(store, fitted_here, name, decoded)


def test_binary_string_labels_go_back_as_bytes_tritonclient_reads(store, fitted):
    meta = store.read_metadata("churn")
    estimator, rows = fitted["churn"]
    decoded = v2.decode_request({"inputs": v2_columns(rows)}, meta, False)
    labels, _ = served(store, "churn", decoded)
    from serve_app.serving.interface import Answer

    response = v2.encode_response("churn", Answer({"predict": np.asarray(labels)}, meta.version), decoded)
    assert response["outputs"][0]["datatype"] == "BYTES"
    body, length = binary.encode_response(response, {"predict": None} and {"predict"})
    result = triton.InferResult.from_response_body(body, header_length=length)
    assert [v.decode() for v in result.as_numpy("predict")] == estimator.predict(rows).tolist()


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_mlflow_bodies(store, fitted, name):
    meta = store.read_metadata(name)
    frame = fitted[name][1]
    split = orjson.loads(frame.to_json(orient="split"))
    bodies = [
        {"dataframe_split": {"columns": split["columns"], "data": split["data"], "index": split["index"]}},
        {"dataframe_records": records(frame)},
        {"instances": records(frame)},
        {"inputs": {c: [r[c] for r in records(frame)] for c in frame.columns}},
        {"inputs": [[r[c] for c in meta.feature_names] for r in records(frame)]},
    ]
    for body in bodies:
        assert_same(store, fitted, name, mlflow.decode_request(orjson.dumps(body), "application/json", meta, False))
    csv = frame.to_csv(index=False).encode()
    assert_same(store, fitted, name, mlflow.decode_request(csv, "text/csv", meta, False))


def test_probabilities_keyed_by_label(store, fitted):
    meta = store.read_metadata("churn")
    rows = records(fitted["churn"][1].head(2))
    decoded = v1.decode_request({"instances": rows, "parameters": {"output": "predict_proba", "labels": True}},
                                meta, False)
    from serve_app.serving.interface import Answer

    _, proba = served(store, "churn", decoded)
    answer = v1.encode_response(Answer({"predict_proba": proba}, "1"), decoded)
    assert [set(p) for p in answer["predictions"]] == [set(CHURN_LABELS)] * 2
    assert answer["predictions"][0]["leave"] == pytest.approx(proba[0, 0])


def test_rows_of_several_requests_batch_into_one_frame(store, fitted):
    """The batch path: requests' frames concatenated into one model call, answers split back."""
    worker = ModelWorker(load_runtime(store, "churn"), ModelSpec(name="churn"))
    meta = worker.meta
    frame = fitted["churn"][1]
    parts = [frame.iloc[0:3], frame.iloc[3:4], frame.iloc[4:9]]
    items = [(v1.decode_request({"instances": records(p)}, meta, False).inputs, ("predict", "predict_proba"))
             for p in parts]
    calls = []
    predict_proba = worker.runtime.predict_proba
    worker.runtime.predict_proba = lambda X: calls.append(len(X)) or predict_proba(X)
    answers = asyncio.run(worker._run_batch(items))
    assert calls == [9]
    estimator = fitted["churn"][0]
    for part, answer in zip(parts, answers):
        assert answer["predict"].tolist() == estimator.predict(part).tolist()
        np.testing.assert_allclose(answer["predict_proba"], estimator.predict_proba(part), rtol=1e-9)


# -- what is refused, and why -----------------------------------------------------------------------
GOOD = {"plan": "basic", "region": "north", "contract": "one-year", "tenure_months": 12,
        "monthly_charges": 30.5, "support_calls": 1, "paperless_billing": True}


def with_(**changes):
    row = {**GOOD, **changes}
    return {k: v for k, v in row.items() if v is not DROP}


DROP = object()
BAD_ROWS = [
    ("missing column", [with_(plan=DROP)], "feature_names", "missing features ['plan']"),
    ("unknown column", [with_(colour="red")], "feature_names", "unknown features ['colour']"),
    ("string in a numeric column", [with_(tenure_months="twelve")], "wrong_type", "expects integers"),
    ("float in an integer column", [with_(tenure_months=12.5)], "wrong_type", "expects integers"),
    ("number in a string column", [with_(plan=3)], "wrong_type", "expects strings"),
    ("bool in a string column", [with_(plan=True)], "wrong_type", "expects strings"),
    ("string in a bool column", [with_(paperless_billing="yes")], "wrong_type", "expects true/false"),
    ("null where training had none", [with_(plan=None)], "missing_value", "'plan'"),
    ("unseen category", [with_(contract="lifetime")], "unknown_category", "'lifetime'"),
    ("nested value", [with_(tenure_months=[1, 2])], "wrong_shape", "one value per row"),
    ("not a record", [GOOD, [1, 2]], "invalid_request", "one object per row"),
    ("infinity", [with_(monthly_charges=1e400)], "non_finite", "Infinity"),
]


@pytest.mark.parametrize("case", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_bad_rows_are_refused_with_a_reason(store, name, case):
    _, rows, reason, fragment = case
    meta = store.read_metadata(name)
    if reason == "unknown_category" and meta.unknown_categories == "allow":
        v1.decode_request({"instances": rows}, meta, False)  # the encoder ignores unknown values
        meta.unknown_categories = "reject"
    accepts = name == "churn-xgb"
    if reason == "missing_value" and accepts:
        v1.decode_request({"instances": rows}, meta, True)  # XGBoost takes missing values
        return
    with pytest.raises(BadInput) as caught:
        v1.decode_request({"instances": rows}, meta, accepts)
    assert caught.value.reason == reason and fragment in caught.value.message
    if reason == "unknown_category":
        assert "allowed values: ['month-to-month', 'one-year', 'two-year']" in caught.value.message


BAD_V2 = [
    ("mixed row shapes", lambda t: t.__setitem__(3, {**t[3], "shape": [2], "data": [1, 2]}), "wrong_shape"),
    ("numbers as BYTES", lambda t: t.__setitem__(3, {**t[3], "datatype": "BYTES", "data": ["12"]}), "wrong_type"),
    ("strings as FP64", lambda t: t.__setitem__(0, {**t[0], "datatype": "FP64", "data": [1.0]}), "wrong_type"),
    ("BYTES data not strings", lambda t: t.__setitem__(0, {**t[0], "data": [1]}), "wrong_type"),
    ("a column twice", lambda t: t.append(t[0]), "invalid_request"),
    ("a column 2-D", lambda t: t.__setitem__(0, {**t[0], "shape": [1, 2], "data": ["a", "b"]}), "wrong_shape"),
]


@pytest.mark.parametrize("case", BAD_V2, ids=[c[0] for c in BAD_V2])
def test_bad_v2_columns_are_refused(store, case):
    meta = store.read_metadata("churn")
    tensors = v2_columns(pd.DataFrame([GOOD]))
    case[1](tensors)
    with pytest.raises(BadInput) as caught:
        v2.decode_request({"inputs": tensors}, meta, False)
    assert caught.value.reason == case[2]


def test_bytes_that_are_not_utf8_are_refused(store):
    meta = store.read_metadata("churn")
    header = {"inputs": v2_columns(pd.DataFrame([GOOD]))}
    raw = b"\x02\x00\x00\x00\xff\xfe"
    header["inputs"][0] = {**header["inputs"][0], "parameters": {"binary_data_size": len(raw)}}
    del header["inputs"][0]["data"]
    head = orjson.dumps(header)
    with pytest.raises(BadInput) as caught:
        binary.decode_body(head + raw, "", str(len(head)))
    assert caught.value.reason == "malformed_binary" and "UTF-8" in caught.value.message
    cut = b"\x09\x00\x00\x00abc"
    header["inputs"][0]["parameters"]["binary_data_size"] = len(cut)
    head = orjson.dumps(header)
    with pytest.raises(BadInput) as caught:
        binary.decode_body(head + cut, "", str(len(head)))
    assert caught.value.reason == "malformed_binary"


@pytest.mark.parametrize("body, content_type, reason", [
    (b"plan,region\nbasic,north\n", "text/csv", "feature_names"),
    (b"", "text/csv", "wrong_shape"),
    (orjson.dumps({"dataframe_split": {"columns": list(GOOD), "data": [["basic"]]}}), "application/json",
     "wrong_shape"),
    (b'{"dataframe_records": [], "instances": []}', "application/json", "invalid_request"),
    (b'{"dataframe_records": []}', "application/json", "wrong_shape"),
    (b'{"something": 1}', "application/json", "invalid_request"),
    (b"<xml/>", "application/xml", "unsupported_media_type"),
])
def test_bad_mlflow_bodies(store, body, content_type, reason):
    from serve_app.errors import InferenceError

    with pytest.raises(InferenceError) as caught:
        mlflow.decode_request(body, content_type, store.read_metadata("churn"), False)
    assert caught.value.reason == reason


def test_csv_numbers_in_a_text_column_stay_text_and_empty_cells_are_missing(store):
    meta = store.read_metadata("churn-xgb")
    csv = ("plan,region,contract,tenure_months,monthly_charges,support_calls,paperless_billing\n"
           "basic,,one-year,12,,1,True\n").encode()
    decoded = mlflow.decode_request(csv, "text/csv", meta, True)
    frame = pd.DataFrame(decoded.inputs.columns)
    assert frame["region"].isna().all() and math.isnan(frame["monthly_charges"][0])
    assert frame["tenure_months"].tolist() == [12]


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A pipeline whose encoder raises on unknown values (handle_unknown="error"), published as
    allowing them: the model itself refuses "gold". (store, metadata, in-memory model)"""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    from serve_app import publish

    split = table_split("churn")
    X = split.X_train[["plan", "tenure_months"]]
    model = Pipeline([("prepare", ColumnTransformer([("plan", OneHotEncoder(), ["plan"])], remainder="passthrough")),
                      ("classify", LogisticRegression(max_iter=500))]).fit(X, split.y_train)
    own = ModelStore(str(tmp_path_factory.mktemp("strict")))
    return own, publish(model, "strict", X, store=own, unknown_categories="allow"), model


def test_a_pipeline_that_raises_on_a_clients_values_is_a_400(strict):
    """The pipeline's own ValueError on a client's value becomes a 400 with its message."""
    own, meta, _ = strict
    decoded = v1.decode_request({"instances": [{"plan": "gold", "tenure_months": 3}]}, meta, False)
    runtime = load_runtime(own, "strict")
    with pytest.raises(BadInput) as caught:
        runtime.predict(runtime.prepare(decoded.inputs.data))
    assert caught.value.reason == "rejected_by_model" and "gold" in caught.value.message


def test_in_a_batch_only_the_request_the_model_refused_fails(strict):
    """Rows of two requests share a model call; the pipeline raises on one request's value:
    that request gets the 400, the other its answer."""
    own, meta, model = strict
    worker = ModelWorker(load_runtime(own, "strict"), ModelSpec(name="strict"))
    good = [{"plan": "basic", "tenure_months": 3}, {"plan": "premium", "tenure_months": 40}]
    items = [(v1.decode_request({"instances": rows}, meta, False).inputs, ("predict",))
             for rows in (good, [{"plan": "gold", "tenure_months": 3}])]
    answered, refused = asyncio.run(worker._run_batch(items))
    assert answered["predict"].tolist() == model.predict(pd.DataFrame(good)).tolist()
    assert isinstance(refused, BadInput) and refused.reason == "rejected_by_model"
