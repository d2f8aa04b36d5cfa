"""The V1 and V2 (Open Inference Protocol) codecs on hand-built metadata: what decodes to
which feature matrix, what is refused with BadInput (and that the message says why), and
how responses are encoded."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from serve_app.codecs import v1, v2
from serve_app.codecs.tensors import DecodedRequest
from serve_app.serving.interface import Answer, ModelInput
from serve_app.errors import BadInput
from serve_app.metadata import Feature, ModelMetadata

FEATURES = ("a", "b", "c")


def make_meta(task: str = "classification", classes=(0, 1, 2)) -> ModelMetadata:
    return ModelMetadata(
        name="toy", version="3", framework="sklearn", task=task,
        features=[Feature(f) for f in FEATURES], artifact="model.skops", sha256="0" * 64,
        classes=list(classes) if task == "classification" else None,
    )


CLF = make_meta()
REG = make_meta("regression")


def app_json(obj) -> object:
    """Serialise like the app does (``orjson`` with numpy support) and read it back."""
    return orjson.loads(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))


def answer(outputs, version="1") -> Answer:
    return Answer(outputs, version)


def asked(*outputs, request_id=None) -> DecodedRequest:
    """A decoded request for ``outputs`` (the rows do not matter to the encoders)."""
    return DecodedRequest(ModelInput(("a", "b", "c"), np.zeros((1, 3))), outputs, request_id)


# -- V1 --------------------------------------------------------------------------------------
def test_v1_list_rows():
    decoded = v1.decode_request({"instances": [[1, 2, 3], [4.5, -5, 6e3]]}, CLF, False)
    X = decoded.inputs.matrix
    assert decoded.outputs == ("predict",) and decoded.inputs.feature_names == ("a", "b", "c")
    assert X.dtype == np.float64 and X.shape == (2, 3)
    np.testing.assert_array_equal(X, [[1, 2, 3], [4.5, -5, 6e3]])


def test_v1_dict_rows_follow_the_model_feature_order():
    body = {"instances": [{"c": 3, "a": 1, "b": 2}, {"b": 20, "c": 30, "a": 10}]}
    X = v1.decode_request(body, REG, False).inputs.matrix
    np.testing.assert_array_equal(X, [[1, 2, 3], [10, 20, 30]])


@pytest.mark.parametrize("parameters, expected", [
    ({"output": "predict_proba"}, "predict_proba"),
    ({"output": "predict"}, "predict"),
    ({}, "predict"),
    (None, "predict"),
])
def test_v1_output_parameter(parameters, expected):
    body = {"instances": [[1, 2, 3]], "parameters": parameters}
    assert v1.decode_request(body, CLF, False).outputs == (expected,)


def test_v1_null_is_nan_for_models_accepting_missing_values():
    X = v1.decode_request({"instances": [[1, None, 3], [None, 5, 6]]}, CLF, True).inputs.matrix
    np.testing.assert_array_equal(np.isnan(X), [[False, True, False], [True, False, False]])
    assert X[0, 0] == 1 and X[1, 2] == 6
    X = v1.decode_request({"instances": [{"a": None, "b": 2, "c": 3}]}, CLF, True).inputs.matrix
    assert np.isnan(X[0, 0]) and X[0, 1] == 2


V1_ERRORS = [
    # body, meta, accepts_missing, fragment of the message
    ([[1, 2, 3]], CLF, False, "JSON object"),
    ("instances", CLF, False, "JSON object"),
    (None, CLF, False, "JSON object"),
    ({"rows": [[1, 2, 3]]}, CLF, False, '"instances"'),
    ({"instances": {"a": 1, "b": 2, "c": 3}}, CLF, False, "must be a list"),
    ({"instances": "1,2,3"}, CLF, False, "must be a list"),
    ({"instances": []}, CLF, False, "empty"),
    ({"instances": [[1, 2]]}, CLF, False, "expected 3 features per row, got 2"),
    ({"instances": [[1, 2, 3, 4]]}, CLF, False, "expected 3 features per row, got 4"),
    ({"instances": [[1, 2, 3], [1, 2]]}, CLF, False, "different lengths"),
    ({"instances": [["1", "2", "3"]]}, CLF, False, "strings"),
    ({"instances": [[1, "2", 3]]}, CLF, False, "strings"),
    ({"instances": [[True, False, True]]}, CLF, False, "booleans"),
    ({"instances": [[1, {"x": 2}, 3]]}, CLF, False, "numbers or null"),
    ({"instances": [{"a": 1, "b": 2, "c": 3, "zz": 4}]}, CLF, False, "unknown features ['zz']"),
    ({"instances": [{"a": 1, "b": 2}]}, CLF, False, "missing features ['c']"),
    ({"instances": [{"a": 1, "b": 2, "x": 3}]}, CLF, False, "unknown features ['x']; missing features ['c']"),
    ({"instances": [{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2}]}, CLF, False, "[1]: missing features ['c']"),
    ({"instances": [{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}]}, CLF, False, "[1]: unknown features ['d']"),
    ({"instances": [{"a": 1, "b": 2, "c": 3}, [1, 2, 3]]}, CLF, False, "mixes"),
    ({"instances": [[1, None, 3]]}, CLF, False, "missing values"),
    ({"instances": [{"a": 1, "b": None, "c": 3}]}, REG, False, "missing values"),
    ({"instances": [[1, 2, 3]], "parameters": {"output": "predict_proba"}}, REG, False, "only available for classification"),
    ({"instances": [[1, 2, 3]], "parameters": {"output": "decision_function"}}, CLF, False, "unknown output"),
    ({"instances": [[1, 2, 3]], "parameters": "predict_proba"}, CLF, False, '"parameters" must be an object'),
]


@pytest.mark.parametrize("body, meta, accepts_missing, fragment", V1_ERRORS)
def test_v1_bad_input(body, meta, accepts_missing, fragment):
    with pytest.raises(BadInput) as excinfo:
        v1.decode_request(body, meta, accepts_missing)
    assert fragment in excinfo.value.message
    assert excinfo.value.status_code == 400


@pytest.mark.parametrize("literal", ["1e999", "-1e999"])
def test_v1_numbers_too_large_for_float64(literal):
    text = f'{{"instances": [[{literal}, 1, 2]]}}'
    # The app parses with orjson, which refuses such a number outright (the app turns that
    # into a 400 "malformed JSON")...
    with pytest.raises(orjson.JSONDecodeError, match="infinity"):
        orjson.loads(text)
    # ...while the standard library yields an infinity, which the codec itself refuses, even
    # for a model that accepts missing values.
    body = json.loads(text)
    assert np.isinf(body["instances"][0][0])
    for accepts_missing in (False, True):
        with pytest.raises(BadInput, match="non-finite"):
            v1.decode_request(body, CLF, accepts_missing)




def test_v1_encode_response():
    predictions = np.array([2, 0, 1])
    response = v1.encode_response(answer({"predict": predictions, "predict_proba": np.eye(3)}), asked("predict"))
    assert set(response) == {"predictions"}
    np.testing.assert_array_equal(response["predictions"], predictions)
    assert app_json(v1.encode_response(answer({"predict_proba": np.eye(2)}), asked("predict_proba"))) == {
        "predictions": [[1.0, 0.0], [0.0, 1.0]]}


# -- V2 decode ---------------------------------------------------------------------------------
def tensor(name, shape, data, datatype="FP64"):
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def v2_X(inputs, meta=CLF, accepts_missing=False, **body):
    return v2.decode_request({"inputs": inputs, **body}, meta, accepts_missing).inputs.matrix


def test_v2_single_tensor_flat_and_nested():
    rows = [[1, 2, 3], [4, 5, 6]]
    flat = v2_X([tensor("input-0", [2, 3], [1, 2, 3, 4, 5, 6])])
    nested = v2_X([tensor("anything", [2, 3], rows)])
    for X in (flat, nested):
        assert X.dtype == np.float64 and X.shape == (2, 3)
        np.testing.assert_array_equal(X, rows)


def test_v2_single_row_of_shape_f():
    X = v2_X([tensor("input-0", [3], [7, 8, 9])])
    np.testing.assert_array_equal(X, [[7, 8, 9]])


@pytest.mark.parametrize("shape_of", [lambda n: [n], lambda n: [n, 1]], ids=["[N]", "[N,1]"])
def test_v2_columnar_tensors_in_any_order(shape_of):
    columns = {"a": [1, 2], "b": [10, 20], "c": [100, 200]}
    for order in (("a", "b", "c"), ("c", "a", "b"), ("b", "c", "a")):
        X = v2_X([tensor(name, shape_of(2), columns[name]) for name in order])
        np.testing.assert_array_equal(X, [[1, 10, 100], [2, 20, 200]])
    nested = v2_X([tensor(name, [2, 1], [[v] for v in columns[name]]) for name in FEATURES])
    np.testing.assert_array_equal(nested, [[1, 10, 100], [2, 20, 200]])


@pytest.mark.parametrize("datatype, data, expected", [
    ("FP64", [0.1, 2, -3.5], [0.1, 2, -3.5]),
    # FP32 data is rounded to float32 first: the declared datatype is honoured.
    ("FP32", [0.1, 2, -3.5], np.array([0.1, 2, -3.5], dtype=np.float32).astype(np.float64)),
    ("INT32", [1, -2, 2**31 - 1], [1, -2, 2**31 - 1]),
    ("INT64", [1, -2, 2**53], [1, -2, 2**53]),
    ("BOOL", [True, False, True], [1.0, 0.0, 1.0]),
])
def test_v2_datatypes(datatype, data, expected):
    X = v2_X([tensor("input-0", [1, 3], data, datatype)])
    assert X.dtype == np.float64
    np.testing.assert_array_equal(X, [expected])
    if datatype == "FP32":
        assert X[0, 0] != 0.1


def test_v2_columnar_tensors_may_mix_datatypes():
    X = v2_X([tensor("a", [2], [1, 2], "INT32"), tensor("b", [2], [True, False], "BOOL"),
              tensor("c", [2], [0.5, 1.5], "FP32")])
    np.testing.assert_array_equal(X, [[1, 1, 0.5], [2, 0, 1.5]])


def test_v2_null_is_nan_only_where_missing_values_are_accepted():
    inputs = [tensor("input-0", [2, 3], [1, None, 3, 4, 5, None])]
    X = v2_X(inputs, accepts_missing=True)
    np.testing.assert_array_equal(np.isnan(X), [[False, True, False], [False, False, True]])
    with pytest.raises(BadInput, match="missing values"):
        v2_X(inputs, accepts_missing=False)


@pytest.mark.parametrize("outputs, meta, expected", [
    (None, CLF, ("predict",)),
    ([], CLF, ("predict",)),
    ([{"name": "predict_proba"}], CLF, ("predict_proba",)),
    ([{"name": "predict_proba"}, {"name": "predict"}], CLF, ("predict_proba", "predict")),
    ([{"name": "predict"}, {"name": "predict"}], CLF, ("predict",)),
    ([{"name": "predict", "parameters": {}}], REG, ("predict",)),
])
def test_v2_outputs_selection(outputs, meta, expected):
    body = {"inputs": [tensor("input-0", [1, 3], [1, 2, 3])]}
    if outputs is not None:
        body["outputs"] = outputs
    assert v2.decode_request(body, meta, False).outputs == expected


@pytest.mark.parametrize("request_id", ["req-42", 7, None])
def test_v2_request_id_is_returned(request_id):
    body = {"inputs": [tensor("input-0", [1, 3], [1, 2, 3])]}
    if request_id is not None:
        body["id"] = request_id
    assert v2.decode_request(body, CLF, False).request_id == request_id


def _columnar(**overrides):
    columns = {name: tensor(name, [2], [1, 2]) for name in FEATURES}
    columns.update(overrides)
    return [t for t in columns.values() if t is not None]


V2_ERRORS = [
    # inputs (or a whole body when a dict with "body"), meta, fragment of the message
    ({"body": [1, 2, 3]}, CLF, "JSON object"),
    ({"body": {"instances": [[1, 2, 3]]}}, CLF, '"inputs" must be a non-empty list'),
    ([], CLF, '"inputs" must be a non-empty list'),
    ([[1, 2, 3]], CLF, "inputs[0] must be an object"),
    ([{"name": "x", "shape": [1, 3], "datatype": "FP64"}], CLF, "inputs[0] lacks ['data']"),
    ([tensor("x", [1, 3], ["a", "b", "c"], "BYTES")], CLF, "the model's features are numbers, got BYTES"),
    ([tensor("x", [1, 3], [1, 2, 3], "FP128")], CLF, "unsupported datatype 'FP128'"),
    ([tensor("x", [1, 3], [1, 2, 3], "fp64")], CLF, "unsupported datatype 'fp64'"),
    ([tensor("x", [2, 3], [1, 2, 3, 4, 5])], CLF, "shape [2, 3] needs 6 values, data has 5"),
    ([tensor("x", [1, 3], [[1, 2, 3], [4, 5, 6]])], CLF, "needs 3 values, data has 6"),
    ([tensor("x", [-1, 3], [1, 2, 3])], CLF, "non-negative integers"),
    ([tensor("x", [1.0, 3], [1, 2, 3])], CLF, "non-negative integers"),
    ([tensor("x", ["1", 3], [1, 2, 3])], CLF, "non-negative integers"),
    ([tensor("x", [True, 3], [1, 2, 3])], CLF, "non-negative integers"),
    ([tensor("x", [], [1, 2, 3])], CLF, "non-negative integers"),
    ([tensor("x", "1,3", [1, 2, 3])], CLF, "non-negative integers"),
    ([tensor("x", [2, 3], [[1, 2, 3], [4, 5]])], CLF, "ragged"),
    ([tensor("x", [1, 3], [1.5, 2, 3], "INT32")], CLF, "does not match datatype INT32"),
    ([tensor("x", [1, 3], [1, None, 3], "INT64")], CLF, "does not match datatype INT64"),
    ([tensor("x", [1, 3], [1, 0, 1], "BOOL")], CLF, "does not match datatype BOOL"),
    ([tensor("x", [1, 3], ["1", "2", "3"], "FP32")], CLF, "does not match datatype FP32"),
    ([tensor("x", [1, 3], [1, {"v": 2}, None], "FP32")], CLF, "must be numbers or null"),
    ([tensor("x", [1, 3], [True, False, True], "FP64")], CLF, "does not match datatype FP64"),
    ([tensor("x", [1, 4], [1, 2, 3, 4])], CLF, "expected shape [N, 3]"),
    ([tensor("x", [2], [1, 2])], CLF, "expected shape [N, 3]"),
    ([tensor("x", [1, 1, 3], [1, 2, 3])], CLF, "expected shape [N, 3]"),
    ([tensor("x", [0, 3], [])], CLF, "no rows"),
    pytest.param([tensor("x", [1, 3], [70000, 1, 2], "FP16")], CLF, "non-finite",
                 marks=pytest.mark.filterwarnings("ignore:overflow encountered in cast")),
    (_columnar(c=tensor("zz", [2], [1, 2])), CLF, "unknown features ['zz']; missing features ['c']"),
    (_columnar(c=None), CLF, "missing features ['c']"),
    (_columnar(extra=tensor("extra", [2], [1, 2])), CLF, "unknown features ['extra']"),
    (_columnar() + [tensor("a", [2], [1, 2])], CLF, "names must be unique"),
    (_columnar(b=tensor("b", [1, 2], [1, 2])), CLF, "[N] or [N, 1]"),
    (_columnar(b=tensor("b", [3], [1, 2, 3])), CLF, "differ in length: [2, 3]"),
    ({"outputs": [{"name": "logits"}]}, CLF, "unknown output(s) ['logits']"),
    ({"outputs": [{"name": "predict_proba"}]}, REG, "only available for classification"),
    ({"outputs": "predict"}, CLF, '"outputs" must be a list'),
    ({"outputs": [{"label": "predict"}]}, CLF, '"outputs" must be a list'),
]


@pytest.mark.parametrize("inputs, meta, fragment", V2_ERRORS)
def test_v2_bad_input(inputs, meta, fragment):
    if isinstance(inputs, dict) and "body" in inputs:
        body = inputs["body"]
    elif isinstance(inputs, dict):  # extra body fields on a valid request
        body = {"inputs": [tensor("input-0", [1, 3], [1, 2, 3])], **inputs}
    else:
        body = {"inputs": inputs}
    with pytest.raises(BadInput) as excinfo:
        v2.decode_request(body, meta, True)
    assert fragment in excinfo.value.message


@pytest.mark.parametrize("datatype, value", [("INT8", 300), ("UINT8", -1), ("INT32", 2**40)])
def test_v2_integers_out_of_range_for_their_datatype_are_rejected(datatype, value):
    with pytest.raises(BadInput, match="out of range"):
        v2_X([tensor("x", [1, 3], [value, 1, 2], datatype)])


def _decode(protocol, row, accepts_missing):
    if protocol == "v1":
        return v1.decode_request({"instances": [row]}, CLF, accepts_missing).inputs.matrix
    return v2_X([tensor("x", [1, 3], row)], accepts_missing=accepts_missing)


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("row, accepts_missing", [
    ([1, "2", None], True),
    (["nan", 2, None], True),
], ids=["numeric-string+null", "nan-string+null"])
def test_strings_mixed_with_numbers_and_nulls_are_rejected(protocol, row, accepts_missing):
    with pytest.raises(BadInput):
        _decode(protocol, row, accepts_missing)


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("row, expected", [
    ([True, 2.5, 3], [1.0, 2.5, 3.0]),
    ([1, False, None], [1.0, 0.0, np.nan]),
], ids=["bool+numbers", "bool+null"])
def test_booleans_inside_numeric_data_count_as_one_and_zero(protocol, row, expected):
    """Documented policy (codecs/tensors.py): true/false count as 1/0, as in Python."""
    np.testing.assert_array_equal(_decode(protocol, row, True), [expected])


# -- V2 encode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("array, datatype", [
    (np.array([0, 2, 1]), "INT64"),
    (np.array([0, 2, 1], dtype=np.int32), "INT32"),
    (np.array([0.25, 1.5]), "FP64"),
    (np.array([0.25, 1.5], dtype=np.float32), "FP32"),
    (np.array([True, False]), "BOOL"),
    (np.array(["setosa", "virginica"]), "BYTES"),
    (np.array(["setosa", "virginica"], dtype=object), "BYTES"),
])
def test_v2_encode_tensor_datatypes(array, datatype):
    encoded = v2.encode_tensor("predict", array)
    assert encoded["name"] == "predict"
    assert encoded["datatype"] == datatype
    assert encoded["shape"] == [len(array)]
    np.testing.assert_array_equal(encoded["data"], array)


def test_v2_encode_tensor_flattens_row_major():
    proba = np.array([[0.1, 0.9], [0.7, 0.3], [0.5, 0.5]])
    encoded = v2.encode_tensor("predict_proba", proba)
    assert encoded["shape"] == [3, 2] and encoded["datatype"] == "FP64"
    assert np.asarray(encoded["data"]).ndim == 1
    np.testing.assert_array_equal(encoded["data"], [0.1, 0.9, 0.7, 0.3, 0.5, 0.5])
    # Column-major input is flattened in row-major order all the same.
    encoded = v2.encode_tensor("predict_proba", np.asfortranarray(proba))
    np.testing.assert_array_equal(encoded["data"], proba.reshape(-1))


def test_v2_encode_response():
    results = {"predict": np.array([1, 0]), "predict_proba": np.array([[0.2, 0.8, 0.0], [0.6, 0.3, 0.1]])}
    response = app_json(v2.encode_response("toy", answer(results, "3"), asked("predict_proba", "predict", request_id="abc")))
    assert response == {
        "model_name": "toy", "model_version": "3", "id": "abc",
        "outputs": [
            {"name": "predict_proba", "shape": [2, 3], "datatype": "FP64",
             "data": [0.2, 0.8, 0.0, 0.6, 0.3, 0.1]},
            {"name": "predict", "shape": [2], "datatype": "INT64", "data": [1, 0]},
        ],
    }
    without_id = v2.encode_response("toy", answer({"predict": np.array([1.5])}), asked("predict"))
    assert "id" not in without_id
    assert [o["name"] for o in without_id["outputs"]] == ["predict"]


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_string_labels_survive_the_apps_json_serialisation(protocol):
    labels = np.asarray(["setosa", "virginica"])
    if protocol == "v1":
        assert app_json(v1.encode_response(answer({"predict": labels}), asked("predict"))) == {
            "predictions": ["setosa", "virginica"]}
    else:
        encoded = app_json(v2.encode_tensor("predict", labels))
        assert encoded["data"] == ["setosa", "virginica"] and encoded["datatype"] == "BYTES"


def test_v2_model_metadata():
    meta = v2.model_metadata(CLF)
    assert meta["name"] == "toy" and meta["versions"] == ["3"] and meta["platform"] == "sklearn"
    (inp,) = meta["inputs"]
    assert inp["shape"] == [-1, 3] and inp["datatype"] == "FP64"
    assert inp["parameters"]["feature_names"] == list(FEATURES)
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"predict": [-1], "predict_proba": [-1, 3]}
    assert all(o["shape"][0] == -1 for o in meta["outputs"])

    reg = v2.model_metadata(REG)
    assert reg["outputs"] == [{"name": "predict", "datatype": "FP64", "shape": [-1]}]
    assert reg["inputs"][0]["shape"] == [-1, 3]
    app_json(meta)  # serialisable as the app sends it
