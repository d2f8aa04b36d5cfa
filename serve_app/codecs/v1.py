"""KServe V1 (TensorFlow-Serving style) prediction protocol.

Request:  ``{"instances": [[f1, f2, ...], ...]}`` or ``{"instances": [{"f1": v, ...}, ...]}``,
          optionally ``"parameters": {"output": "predict_proba"}``.
Response: ``{"predictions": [...]}`` -- labels/values by default; with
          ``output: predict_proba`` each prediction is the list of class probabilities in
          the order of the model's ``classes`` (``GET /v1/models/{name}``).
"""

from __future__ import annotations

from typing import Any

from serve_app.codecs.tensors import DecodedRequest, as_float_matrix, columns_to_matrix, jsonable, model_input
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
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadInput('"parameters" must be an object')
    output = parameters.get("output", "predict")
    (output,) = check_outputs([output], meta.is_classifier)
    if isinstance(instances[0], dict):
        if not all(isinstance(row, dict) for row in instances):
            raise BadInput('"instances" mixes objects and lists; use one form')
        names = meta.feature_names
        columns_to_matrix(instances[0], names, "instances[0]")  # names the bad keys
        try:
            rows = [[row[f] for f in names] for row in instances]
        except KeyError as exc:
            raise BadInput(f"an instance lacks feature {exc.args[0]!r}", "feature_names") from None
        if any(len(row) != len(names) for row in instances):
            raise BadInput(f"an instance has features beyond {names}", "feature_names")
        instances = rows
    X = as_float_matrix(instances, len(meta.features), accepts_missing, '"instances"')
    return DecodedRequest(model_input(X, meta), (output,))


def encode_response(answer: Answer, request: DecodedRequest) -> dict[str, Any]:
    return {"predictions": jsonable(answer.outputs[request.outputs[0]])}


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

