"""KServe V1 (TensorFlow-Serving style) prediction protocol.

Request:  ``{"instances": [[f1, f2, ...], ...]}`` (rows in the schema's feature order) or
          ``{"instances": [{"f1": v, ...}, ...]}`` (records), optionally
          ``"parameters": {"output": "predict_proba", "labels": true}``.
Response: ``{"predictions": [...]}`` -- labels/values by default; with
          ``output: predict_proba`` each prediction is the list of class probabilities in
          the order of the model's ``classes`` (``GET /v1/models/{name}``), or with
          ``labels: true`` an object keyed by class label.

Rows of numbers for a numeric model take the fast path (one numpy conversion); records, and
any row of a mixed-type model, are checked column by column against the schema
(:mod:`serve_app.codecs.tables`).
"""

from __future__ import annotations

from typing import Any

from serve_app.codecs import tables
from serve_app.codecs.tensors import DecodedRequest, as_float_matrix, jsonable, model_input
from serve_app.codecs.v2 import FEATURE_DATATYPES
from serve_app.errors import BadInput
from serve_app.metadata import ModelMetadata
from serve_app.serving.interface import Answer
from serve_app.serving.outputs import check_outputs


def decode_request(body: Any, meta: ModelMetadata, accepts_missing: bool) -> DecodedRequest:
    if not isinstance(body, dict) or "instances" not in body:
        raise BadInput('V1 request body must be a JSON object with an "instances" list')
    instances = body["instances"]
    if not isinstance(instances, list):
        raise BadInput('"instances" must be a list of rows')
    if not instances:
        raise BadInput('"instances" is empty: send at least one row', "wrong_shape")
    output, by_label = answer_options(body.get("parameters"), meta)
    if isinstance(instances[0], dict):
        inputs = tables.from_records(instances, meta, accepts_missing)
    elif meta.is_tabular:
        inputs = tables.from_rows(instances, meta, accepts_missing)
    else:
        X = as_float_matrix(instances, len(meta.features), accepts_missing, '"instances"')
        inputs = model_input(X, meta)
    return DecodedRequest(inputs, (output,), classes=meta.classes if by_label else None)


def answer_options(parameters: Any, meta: ModelMetadata) -> tuple[str, bool]:
    """The ``output`` asked for and whether probabilities are keyed by label."""
    parameters = parameters or {}
    if not isinstance(parameters, dict):
        raise BadInput('"parameters" must be an object')
    (output,) = check_outputs([parameters.get("output", "predict")], meta.is_classifier)
    by_label = parameters.get("labels", False)
    if not isinstance(by_label, bool):
        raise BadInput('"labels" must be true or false')
    if by_label and output != "predict_proba":
        raise BadInput('"labels": true keys probabilities by class label: ask for "output": "predict_proba"')
    return output, by_label


def predictions(answer: Answer, request: DecodedRequest):
    """The requested output, row by row; probabilities keyed by label when asked."""
    values = answer.outputs[request.outputs[0]]
    if request.classes is not None:
        labels = [str(c) if not isinstance(c, (str, int, float, bool)) else c for c in request.classes]
        return [dict(zip(labels, row)) for row in values.tolist()]
    return jsonable(values)


def model_metadata(name: str, meta: ModelMetadata) -> dict[str, Any]:
    """``GET /v1/models/{name}``: the stored metadata, each feature with its V2 datatype too
    (``BYTES`` for string and category columns)."""
    described = meta.to_dict()
    for feature in described["features"]:
        feature["datatype"] = FEATURE_DATATYPES[feature["dtype"]]
    return {"name": name, "ready": True, **described}


def encode_response(answer: Answer, request: DecodedRequest) -> dict[str, Any]:
    return {"predictions": predictions(answer, request)}


def encode_explanation(answer: Answer, request: DecodedRequest) -> dict[str, Any]:
    """The ``:explain`` answer: per row and margin output, the bias and each feature's
    contribution (bias + contributions = the margin named by ``margin``)."""
    explanation, names = answer.explanation, request.inputs.feature_names
    contributions, bias = explanation.contributions, explanation.bias
    return {
        "method": explanation.method,
        "margin": explanation.margin_kind,
        "outputs": explanation.outputs,
        "explanations": [
            {output: {"bias": float(bias[r, k]),
                      "contributions": dict(zip(names, contributions[r, k].tolist()))}
             for k, output in enumerate(explanation.outputs)}
            for r in range(contributions.shape[0])
        ],
    }

