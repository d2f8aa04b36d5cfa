"""Property tests of the V1/V2 codecs (no server): whatever JSON-like value arrives, a codec
either returns a valid feature matrix or raises an :class:`InferenceError` that maps to a 4xx
with a known reason -- never any other exception (which the server would turn into a 500).
Valid matrices and tensors of every V2 datatype survive the wire round trip unchanged.

The counts of generated cases are asserted, so a strategy that silently stops producing
examples (or a settings change that cuts them) fails here instead of passing vacuously.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serve_app.codecs import binary, mlflow, v1, v2
from serve_app.codecs.tensors import DecodedRequest
from serve_app.serving.interface import Answer, ModelInput
from serve_app.serving.outputs import OUTPUTS
from serve_app.errors import MAX_MESSAGE_CHARS, REASONS, InferenceError
from serve_app.metadata import Feature, ModelMetadata

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSIFIER = ModelMetadata(
    name="fuzz", version="1", framework="sklearn", task="classification",
    features=[Feature(f) for f in FEATURES], artifact="model.skops", sha256="0" * 64, classes=[0, 1, 2])
REGRESSOR = ModelMetadata(
    name="fuzz", version="1", framework="sklearn", task="regression",
    features=[Feature(f) for f in FEATURES], artifact="model.skops", sha256="0" * 64)

# A mixed-type schema (the shape of the churn demo): strings with known values, a pandas
# category column, integers, floats with missing values, booleans.
MIXED = ModelMetadata(
    name="mixed", version="1", framework="sklearn", task="classification", input_form="frame",
    features=[Feature("plan", "string", ["basic", "premium"]), Feature("region", "category", ["n", "s"], True),
              Feature("tenure", "int64"), Feature("charges", "float64", nullable=True), Feature("paperless", "bool")],
    artifact="model.skops", sha256="0" * 64, classes=["leave", "stay"])

# Examples per property; the totals are checked by test_enough_codec_cases_were_generated.
EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
generated: Counter[str] = Counter()

# -- strategies ------------------------------------------------------------------------------
# Numbers JSON parsers hand over, plus those no JSON parser should but a codec must survive:
# ints beyond float64, NaN and infinities.
numbers = st.one_of(
    st.integers(),
    st.floats(),
    st.sampled_from([0, -0.0, 2**63, 2**64 - 1, -(2**63) - 1, 10**400, -(10**400), 1e308, 5e-324]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=40,
)
finite = st.floats(allow_nan=False, allow_infinity=False)


def node_paths(value, prefix=()):
    """Every place in a JSON-like value (the root included), as key/index paths."""
    yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from node_paths(child, (*prefix, key))


@st.composite
def mutated(draw, valid):
    """A valid body with up to three random edits: a node replaced by any JSON-like value
    (or a number no parser makes), deleted, wrapped in a list, or duplicated. A third of
    the bodies stay valid, so the decoders' deep paths are exercised, not only the gates."""
    body = {"root": draw(valid)}
    for _ in range(draw(st.integers(0, 3))):
        *parent_path, key = draw(st.sampled_from(list(node_paths(body["root"], ("root",)))))
        parent = body
        for step in parent_path:
            parent = parent[step]
        edit = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "duplicate"]))
        if edit == "replace":
            parent[key] = draw(json_values)
        elif edit == "wrap":
            parent[key] = [parent[key]]
        elif edit == "delete" and key != "root":
            del parent[key]
        elif edit == "duplicate" and isinstance(parent, list):
            parent.append(parent[key])
    return body.get("root")


@st.composite
def valid_v1(draw):
    n_rows = draw(st.integers(1, 4))
    rows = [draw(st.lists(finite, min_size=len(FEATURES), max_size=len(FEATURES))) for _ in range(n_rows)]
    if draw(st.booleans()):
        rows = [dict(zip(FEATURES, row)) for row in rows]
    body = {"instances": rows}
    if draw(st.booleans()):
        body["parameters"] = {"output": draw(st.sampled_from(OUTPUTS))}
    return body


@st.composite
def valid_v2(draw):
    n_rows = draw(st.integers(1, 4))
    datatype = draw(st.sampled_from(["FP64", "FP32", "INT64", "INT32", "UINT8"]))
    values = st.integers(0, 255) if datatype.startswith(("INT", "UINT")) else finite
    if draw(st.booleans()):  # one [N, F] tensor, data flat or nested
        data = draw(st.lists(values, min_size=n_rows * len(FEATURES), max_size=n_rows * len(FEATURES)))
        if draw(st.booleans()):
            data = [data[i:i + len(FEATURES)] for i in range(0, len(data), len(FEATURES))]
        inputs = [{"name": "input-0", "shape": [n_rows, len(FEATURES)], "datatype": datatype, "data": data}]
    else:  # one [N] tensor per feature
        inputs = [{"name": f, "shape": [n_rows], "datatype": datatype,
                   "data": draw(st.lists(values, min_size=n_rows, max_size=n_rows))} for f in FEATURES]
    body = {"inputs": inputs}
    if draw(st.booleans()):
        body["outputs"] = [{"name": o} for o in draw(st.lists(st.sampled_from(OUTPUTS), min_size=1, max_size=2))]
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=8))
    return body


@st.composite
def mixed_row(draw) -> dict:
    return {"plan": draw(st.sampled_from(["basic", "premium"])), "region": draw(st.sampled_from(["n", "s", None])),
            "tenure": draw(st.integers(0, 100)), "charges": draw(st.one_of(st.none(), finite)),
            "paperless": draw(st.booleans())}


@st.composite
def valid_mixed(draw):
    """A valid request for MIXED in one of V1's, V2's or MLflow's forms, and its decoder."""
    rows = draw(st.lists(mixed_row(), min_size=1, max_size=4))
    names = [f.name for f in MIXED.features]
    form = draw(st.sampled_from(["v1-records", "v1-rows", "v2-columns", "mlflow-split", "mlflow-records"]))
    if form == "v1-records":
        return v1.decode_request, {"instances": rows}
    if form == "v1-rows":
        return v1.decode_request, {"instances": [[r[n] for n in names] for r in rows]}
    if form == "v2-columns":
        types = {"string": "BYTES", "category": "BYTES", "int64": "INT64", "float64": "FP64", "bool": "BOOL"}
        return v2.decode_request, {"inputs": [
            {"name": f.name, "datatype": types[f.dtype], "shape": [len(rows)], "data": [r[f.name] for r in rows]}
            for f in MIXED.features], "parameters": {"content_type": "pd"}}
    body = ({"dataframe_split": {"columns": names, "data": [[r[n] for n in names] for r in rows]}}
            if form == "mlflow-split" else {"dataframe_records": rows})
    return (lambda b, meta, missing: mlflow.decode_request(json.dumps(b).encode(), "application/json", meta, missing)), body


@st.composite
def mutated_mixed(draw):
    decode, body = draw(valid_mixed())
    return decode, draw(mutated(st.just(body)))


# -- the property ---------------------------------------------------------------------------
def assert_valid_or_4xx(decode, body, meta, accepts_missing):
    """A valid float64 [N, F] matrix, or an InferenceError with a 4xx status and a known reason."""
    try:
        X = decode(body, meta, accepts_missing).inputs.matrix
    except InferenceError as exc:
        assert 400 <= exc.status_code < 500
        assert exc.reason in REASONS and exc.message
        assert len(exc.message) < MAX_MESSAGE_CHARS + 50  # bounded, however large the input
        return "rejected"
    assert isinstance(X, np.ndarray) and X.dtype == np.float64
    assert X.ndim == 2 and X.shape[0] >= 1 and X.shape[1] == len(meta.features)
    assert not np.isinf(X).any()
    assert accepts_missing or not np.isnan(X).any()
    return "accepted"


@FUZZ
@given(body=json_values, meta=st.sampled_from([CLASSIFIER, REGRESSOR]), accepts_missing=st.booleans())
def test_any_json_value_is_a_matrix_or_a_4xx(body, meta, accepts_missing):
    for decode in (v1.decode_request, v2.decode_request):
        assert_valid_or_4xx(decode, body, meta, accepts_missing)
    generated["any-json"] += 1


@FUZZ
@given(body=mutated(valid_v1()), meta=st.sampled_from([CLASSIFIER, REGRESSOR]), accepts_missing=st.booleans())
def test_v1_nearly_valid_bodies_are_a_matrix_or_a_4xx(body, meta, accepts_missing):
    outcome = assert_valid_or_4xx(v1.decode_request, body, meta, accepts_missing)
    generated[f"v1-{outcome}"] += 1


@FUZZ
@given(body=mutated(valid_v2()), meta=st.sampled_from([CLASSIFIER, REGRESSOR]), accepts_missing=st.booleans())
def test_v2_nearly_valid_bodies_are_a_matrix_or_a_4xx(body, meta, accepts_missing):
    outcome = assert_valid_or_4xx(v2.decode_request, body, meta, accepts_missing)
    generated[f"v2-{outcome}"] += 1


def assert_frame_or_4xx(decode, body, accepts_missing):
    """Rows of MIXED with every column of its type, or a 4xx with a known reason."""
    try:
        frame = pd.DataFrame(decode(body, MIXED, accepts_missing).inputs.columns)
    except InferenceError as exc:
        assert 400 <= exc.status_code < 500
        assert exc.reason in REASONS and exc.message and len(exc.message) < MAX_MESSAGE_CHARS + 50
        return "rejected"
    assert list(frame.columns) == [f.name for f in MIXED.features] and len(frame) >= 1
    assert set(frame["plan"]) <= {"basic", "premium"}
    assert all(isinstance(v, str) or v != v for v in frame["region"])
    assert frame["tenure"].dtype.kind in "if" and frame["paperless"].dtype.kind in "bf"
    assert not np.isinf(frame["charges"].to_numpy(dtype=float)).any()
    return "accepted"


@FUZZ
@given(case=mutated_mixed(), accepts_missing=st.booleans())
def test_mixed_type_nearly_valid_bodies_are_a_frame_or_a_4xx(case, accepts_missing):
    decode, body = case
    generated[f"mixed-{assert_frame_or_4xx(decode, body, accepts_missing)}"] += 1


@FUZZ
@given(body=json_values, accepts_missing=st.booleans())
def test_any_json_value_for_a_mixed_type_model_is_a_frame_or_a_4xx(body, accepts_missing):
    for decode in (v1.decode_request, v2.decode_request,
                   lambda b, meta, missing: mlflow.decode_request(json.dumps(b).encode(), "application/json", meta, missing)):
        assert_frame_or_4xx(decode, body, accepts_missing)
    generated["mixed-any-json"] += 1


@FUZZ
@given(raw=st.binary(max_size=64), size_delta=st.integers(-4, 4))
def test_binary_bytes_elements_are_strings_or_a_4xx(raw, size_delta):
    """Random bytes as a BYTES tensor of the binary extension (any length prefixes, any text)."""
    tensor = {"name": "plan", "shape": [1], "datatype": "BYTES",
              "parameters": {"binary_data_size": max(len(raw) + size_delta, 0)}}
    header = orjson.dumps({"inputs": [tensor]})
    try:
        request = binary.decode_body(header + raw, "", str(len(header)))
        assert_frame_or_4xx(v2.decode_request, request, True)
    except InferenceError as exc:
        assert 400 <= exc.status_code < 500 and exc.reason in REASONS
    generated["binary-bytes"] += 1


# -- round trips ----------------------------------------------------------------------------
def wire(obj):
    """Through JSON as the app writes (orjson, numpy-aware) and reads (orjson) it."""
    return orjson.loads(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))


finite_matrices = hnp.arrays(
    np.float64, st.tuples(st.integers(1, 8), st.just(len(FEATURES))),
    elements=st.floats(allow_nan=False, allow_infinity=False))


@FUZZ
@given(X=finite_matrices, as_dicts=st.booleans())
def test_v1_round_trip(X, as_dicts):
    instances = [dict(zip(FEATURES, row)) for row in X.tolist()] if as_dicts else X
    decoded = v1.decode_request(wire({"instances": instances}), CLASSIFIER, False)
    np.testing.assert_array_equal(decoded.inputs.matrix, X)
    assert decoded.outputs == ("predict",)
    generated["v1-round-trip"] += 1


def typed_matrices(datatype: str):
    dtype = np.dtype(v2.DATATYPES[datatype][0])
    if dtype.kind == "f":  # finite values only: the codec refuses infinities by design
        elements = st.floats(width=dtype.itemsize * 8, allow_nan=False, allow_infinity=False)
    else:
        elements = None  # the dtype's whole range, its extremes included
    return hnp.arrays(dtype, st.tuples(st.integers(1, 6), st.just(len(FEATURES))), elements=elements)


# Each datatype is its own property (a sampled datatype could go unseen in an unlucky run).
@pytest.mark.parametrize("datatype", sorted(v2.DATATYPES))
@settings(FUZZ, max_examples=EXAMPLES // 6)
@given(data=st.data(), columnar=st.booleans())
def test_v2_round_trip_of_every_datatype(data, columnar, datatype):
    array = data.draw(typed_matrices(datatype), label="array")
    if columnar:
        inputs = [v2.encode_tensor(name, array[:, j]) for j, name in enumerate(FEATURES)]
    else:
        inputs = [v2.encode_tensor("input-0", array)]
    assert all(t["datatype"] == datatype for t in inputs)
    body = wire({"inputs": inputs, "id": "r-1", "outputs": [{"name": "predict_proba"}]})
    for i, tensor in enumerate(body["inputs"]):
        name, decoded = v2.decode_tensor(tensor, i)
        assert decoded.dtype == array.dtype and name == inputs[i]["name"]
        np.testing.assert_array_equal(decoded, array if not columnar else array[:, i])
    request = v2.decode_request(body, CLASSIFIER, False)
    np.testing.assert_array_equal(request.inputs.matrix, array.astype(np.float64))
    assert request.outputs == ("predict_proba",) and request.request_id == "r-1"
    generated[f"v2-round-trip-{datatype}"] += 1


def test_uint64_beyond_int64_beside_small_values_is_exact():
    """numpy reads [2**64 - 1, 1] as float64 (losing digits); the V2 decoder keeps them exact."""
    data = [2**64 - 1, 1, 0, 2**63]
    _, decoded = v2.decode_tensor(wire({"name": "x", "shape": [1, 4], "datatype": "UINT64", "data": data}), 0)
    assert decoded.dtype == np.uint64 and decoded.reshape(-1).tolist() == data


@FUZZ
@given(labels=hnp.arrays(np.int64, st.integers(1, 8)),
       proba=hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.just(3)),
                        elements=st.floats(0, 1)))
def test_v2_response_round_trip(labels, proba):
    proba = np.resize(proba, (labels.shape[0], 3))
    request = DecodedRequest(ModelInput(tuple(FEATURES), np.zeros((labels.shape[0], len(FEATURES)))),
                             ("predict", "predict_proba"), "r-2")
    response = wire(v2.encode_response("fuzz", Answer({"predict": labels, "predict_proba": proba}, "1"), request))
    assert response["id"] == "r-2" and response["model_name"] == "fuzz"
    by_name = {t["name"]: v2.decode_tensor(t, i)[1] for i, t in enumerate(response["outputs"])}
    np.testing.assert_array_equal(by_name["predict"], labels)
    np.testing.assert_array_equal(by_name["predict_proba"], proba)
    generated["v2-response-round-trip"] += 1


def test_enough_codec_cases_were_generated():
    """Runs after the properties above (file order): each produced its examples, and the
    structured strategies reached both outcomes, so they exercise the decoders deeply."""
    if not generated:
        pytest.fail("run this module as a whole: the counts come from the property tests above")
    assert generated["any-json"] >= EXAMPLES * 0.9
    for protocol in ("v1", "v2"):
        assert generated[f"{protocol}-accepted"] >= 10, generated
        assert generated[f"{protocol}-accepted"] + generated[f"{protocol}-rejected"] >= EXAMPLES * 0.9
    assert all(generated[f"v2-round-trip-{d}"] >= EXAMPLES // 6 * 0.9 for d in v2.DATATYPES), generated
    assert generated["mixed-accepted"] >= 10 and generated["mixed-rejected"] >= 10, generated
    assert generated["mixed-any-json"] >= EXAMPLES * 0.9 and generated["binary-bytes"] >= EXAMPLES * 0.9
    assert sum(generated.values()) >= 6 * EXAMPLES * 0.9, generated
