"""Open Inference Protocol (KServe V2 / Triton) REST, JSON tensors.

Inputs are accepted in two layouts:
- one tensor of shape ``[N, F]`` (features in the model's order; ``[F]`` is one row), for
  numeric models;
- one tensor per feature, named after it, of shape ``[N]`` or ``[N, 1]`` (columnar), for every
  model: strings as ``BYTES`` (JSON strings, or the binary extension's length-prefixed
  elements), as KServe's and MLServer's pandas codecs and ``tritonclient`` send them. The
  columns are checked against the stored schema (:mod:`serve_app.codecs.tables`); a request's
  ``parameters.content_type: "pd"`` (the pandas codecs' mark) is what this layout is.
``data`` may be flat (row-major) or nested. Outputs: ``predict`` (shape ``[N]``) and, for
classifiers, ``predict_proba`` (``[N, C]``), chosen through the request's ``outputs``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serve_app import __version__
from serve_app.codecs import tables
from serve_app.codecs.tensors import DecodedRequest, check_finite, jsonable, model_input, numbers_or_null
from serve_app.errors import BadInput
from serve_app.metadata import ModelMetadata
from serve_app.serving.interface import Answer
from serve_app.serving.outputs import check_outputs

# datatype -> (numpy dtype, numpy kinds the JSON values may decode to)
_INTEGERS = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}
_FLOATS = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
DATATYPES: dict[str, tuple[type, str]] = {
    "BOOL": (np.bool_, "b"),
    **{name: (dtype, "iu") for name, dtype in _INTEGERS.items()},
    **{name: (dtype, "iuf") for name, dtype in _FLOATS.items()},
}
_NUMPY_TO_V2 = {np.dtype(dt): name for name, (dt, _) in DATATYPES.items()}
BYTES = "BYTES"
# What a schema's feature type is on the V2 wire (model metadata).
FEATURE_DATATYPES = {"float64": "FP64", "int64": "INT64", "bool": "BOOL", "string": BYTES, "category": BYTES}


SERVER_NAME = "serve-app"


def server_metadata() -> dict[str, Any]:
    """The server metadata answer (REST ``GET /v2``, gRPC ``ServerMetadata``)."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "USO":
        return "BYTES"
    return _NUMPY_TO_V2[array.dtype]


def decode_tensor(tensor: Any, index: int) -> tuple[str, np.ndarray]:
    """One ``inputs[i]`` entry as a typed array of its declared shape."""
    where = f"inputs[{index}]"
    if not isinstance(tensor, dict):
        raise BadInput(f"{where} must be an object with name, shape, datatype and data")
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        raise BadInput(f"{where} lacks {missing}")
    name, shape, datatype, data = (tensor[k] for k in ("name", "shape", "datatype", "data"))
    if not isinstance(datatype, str) or (datatype not in DATATYPES and datatype != BYTES):
        raise BadInput(
            f"{where} ({name}): unsupported datatype {datatype!r}; use one of {sorted([*DATATYPES, BYTES])}",
            "wrong_type"
        )
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise BadInput(f"{where} ({name}): shape must be a list of non-negative integers")
    label = f"{where} ({name})"
    if datatype == BYTES:
        return str(name), decode_strings(data, shape, label)
    dtype, kinds = DATATYPES[datatype]
    try:
        values = np.asarray(data)
    except ValueError:
        raise BadInput(f"{label}: nested data is ragged", "wrong_shape") from None
    if values.dtype.kind == "O" and "f" in kinds:  # null = missing value
        values = numbers_or_null(values, label)
    if values.size and values.dtype.kind not in kinds:
        if not (kinds == "iu" and values.dtype.kind in "fO" and only_integers(data)):
            raise BadInput(f"{label}: data does not match datatype {datatype}", "wrong_type")
        values = np.asarray(data, dtype=object)  # exact ints numpy could not type together
    if values.size != math.prod(shape):
        raise BadInput(
            f"{label}: shape {shape} needs {math.prod(shape)} values, data has {values.size}", "wrong_shape"
        )
    try:
        if values.dtype.kind in "iuO" and np.dtype(dtype).kind in "iu":
            values = np.asarray(data, dtype=dtype)  # exact; raises on out-of-range integers
        with np.errstate(over="ignore"):  # FP16/FP32 overflow becomes inf, refused as non-finite
            return str(name), values.astype(dtype, copy=False).reshape(shape)
    except OverflowError:
        raise BadInput(f"{label}: values out of range for {datatype}", "wrong_type") from None
    except ValueError:  # more dimensions than numpy supports, or absurd sizes around a zero
        raise BadInput(f"{label}: shape {shape} is not a usable tensor shape", "wrong_shape") from None


def decode_strings(data: Any, shape: list[int], label: str) -> np.ndarray:
    """A BYTES tensor's elements as an object array of str (None: missing) of its shape."""
    if isinstance(data, np.ndarray):  # the binary extension's, already decoded
        values = data
    else:
        flat = _flatten(data, label)
        if not all(isinstance(v, str) or v is None for v in flat):
            raise BadInput(f"{label}: BYTES data must be strings", "wrong_type")
        values = np.empty(len(flat), dtype=object)
        values[:] = flat
    if values.size != math.prod(shape):
        raise BadInput(f"{label}: shape {shape} needs {math.prod(shape)} values, data has {values.size}",
                       "wrong_shape")
    try:
        return values.reshape(shape)
    except ValueError:
        raise BadInput(f"{label}: shape {shape} is not a usable tensor shape", "wrong_shape") from None


def _flatten(data: Any, label: str) -> list:
    """Nested lists of elements, row-major, as one list; a ragged nesting is refused."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(v, list) for v in data):
        return data
    if not all(isinstance(v, list) for v in data) or len({len(v) for v in data}) != 1:
        raise BadInput(f"{label}: nested data is ragged", "wrong_shape")
    return [item for v in data for item in _flatten(v, label)]


def only_integers(data: Any) -> bool:
    """Whether every value is a JSON integer. numpy reads ints beyond int64 beside smaller
    ones as float64 (losing digits) or as objects, so this rare path looks at the values."""
    return all(type(v) is int for v in np.asarray(data, dtype=object).reshape(-1))


def decode_request(body: Any, meta: ModelMetadata, accepts_missing: bool) -> DecodedRequest:
    """The model's rows, the requested outputs and the request id."""
    if not isinstance(body, dict):
        raise BadInput("V2 request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadInput('"inputs" must be a non-empty list of tensors')
    tensors = [decode_tensor(t, i) for i, t in enumerate(inputs)]
    n_features = len(meta.features)
    if len(tensors) == 1 and tensors[0][0] not in meta.feature_names and not meta.is_tabular:
        name, X = tensors[0]
        if X.dtype == object:
            raise BadInput(f"input {name!r}: the model's features are numbers, got BYTES", "wrong_type")
        if X.ndim == 1 and X.shape[0] == n_features:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != n_features:
            raise BadInput(
                f"input {name!r}: expected shape [N, {n_features}] (features in model order), "
                f"got {list(X.shape)}", "wrong_shape"
            )
        inputs = model_input(check_finite(X.astype(np.float64, copy=False), accepts_missing, "inputs"), meta)
    else:
        by_name = dict(tensors)
        if len(by_name) != len(tensors):
            raise BadInput("input tensor names must be unique")
        tables.check_names(by_name, meta.feature_names, "inputs")
        if any(c.ndim > 2 or (c.ndim == 2 and c.shape[1] != 1) for c in by_name.values()):
            raise BadInput("per-feature inputs must have shape [N] or [N, 1]", "wrong_shape")
        inputs = tables.from_columns({n: c.reshape(-1) for n, c in by_name.items()}, meta, accepts_missing)
    requested = body.get("outputs") or [{"name": "predict"}]
    if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
        raise BadInput('"outputs" must be a list of {"name": ...} objects')
    outputs = check_outputs([o["name"] for o in requested], meta.is_classifier)
    return DecodedRequest(inputs, outputs, body.get("id"))


def encode_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"name": name, "shape": list(array.shape), "datatype": datatype_of(array),
            "data": jsonable(array.reshape(-1))}


def encode_response(name: str, answer: Answer, request: DecodedRequest) -> dict[str, Any]:
    response = {
        "model_name": name,
        "model_version": answer.version,
        "outputs": [encode_tensor(output, answer.outputs[output]) for output in request.outputs],
    }
    if request.request_id is not None:
        response["id"] = request.request_id
    explanation = answer.explanation
    if explanation is not None:  # contributions/bias: name their margin outputs and method
        response["parameters"] = {
            "explanation": {"outputs": explanation.outputs, "method": explanation.method,
                            "margin_kind": explanation.margin_kind},
            "feature_names": list(request.inputs.feature_names)}
    return response


def model_metadata(meta: ModelMetadata) -> dict[str, Any]:
    """The V2 model metadata response: a numeric model's one ``[-1, F]`` FP64 input, or one
    input per column (datatype, categories) for a mixed-type model; and the outputs."""
    label_type = datatype_of(np.asarray(meta.classes)) if meta.is_classifier else "FP64"
    outputs = [{"name": "predict", "datatype": label_type, "shape": [-1]}]
    if meta.is_classifier:
        outputs.append({"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(meta.classes or [])],
                        "parameters": {"classes": meta.classes}})
    if meta.is_tabular:
        inputs = [{"name": f.name, "datatype": FEATURE_DATATYPES[f.dtype], "shape": [-1],
                   "parameters": {"dtype": f.dtype, "nullable": f.nullable,
                                  **({"categories": f.categories} if f.categories is not None else {})}}
                  for f in meta.features]
    else:
        inputs = [{"name": "input-0", "datatype": "FP64", "shape": [-1, len(meta.features)],
                   "parameters": {"feature_names": meta.feature_names}}]
    return {
        "name": meta.name,
        "versions": [meta.version],
        "platform": meta.framework,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {"content_type": "pd" if meta.is_tabular else "np", "example": meta.example},
    }
