"""Request-body schemas for the OpenAPI page (``/docs``).

Handlers read raw bytes and decode them with the codecs (faster than FastAPI's model
validation, and the codecs give protocol-specific errors); these pydantic models exist only
so ``/docs`` and ``/openapi.json`` describe what the endpoints accept.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class V1Parameters(BaseModel):
    output: Literal["predict", "predict_proba"] = "predict"


class V1Request(BaseModel):
    instances: list[list[float | None] | dict[str, float | None]] = Field(
        examples=[[[5.1, 3.5, 1.4, 0.2]]])
    parameters: V1Parameters | None = None


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                      "INT32", "INT64", "FP16", "FP32", "FP64"]
    data: list[Any]


class V2Output(BaseModel):
    name: Literal["predict", "predict_proba"]


class V2Request(BaseModel):
    id: str | None = None
    inputs: list[V2Tensor] = Field(examples=[[{"name": "input-0", "shape": [1, 4],
                                               "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]])
    outputs: list[V2Output] | None = None


def _inline(node: Any, defs: dict) -> Any:
    """The schema with every local ``$ref`` replaced by its definition (self-contained)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _body(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline(schema, schema.get("$defs", {}))}}}}


V1_REQUEST = _body(V1Request)
V2_REQUEST = _body(V2Request)
