"""The OpenAPI page (``/docs``): request-body schemas, one working example per served model,
and Swagger UI served from the package, so the page works without internet access.

Handlers read raw bytes and decode them with the codecs (faster than FastAPI's model
validation, and the codecs give protocol-specific errors); these pydantic models exist only
so ``/docs`` and ``/openapi.json`` describe what the endpoints accept.

Swagger UI's own assets (``swagger-ui-bundle.js``, ``swagger-ui.css``, the favicon; ReDoc's
bundle for ``/redoc``) come from the ``fastapi-offline`` package's static directory and are
served at ``/docs/assets`` below the application's route prefix: the page references
same-origin URLs only, never a CDN.

The examples come from the served models' stored metadata (``meta.example``: a few training
rows; training means for models stored without one), which only the replica's registry
knows: the schema is completed on the first ``/openapi.json`` request, and again after a
reload changes a model's default version.
"""

from __future__ import annotations

import copy
import math
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.responses import HTMLResponse

from serve_app.metadata import Feature, ModelMetadata

# -- request bodies ---------------------------------------------------------------------------
Scalar = float | bool | str | None  # a JSON number, boolean, string or null


class V1Parameters(BaseModel):
    output: Literal["predict", "predict_proba"] = "predict"


class V1Request(BaseModel):
    # Rows in the model's feature order, or records keyed by feature name (strings for the
    # string and category columns of mixed-type models).
    instances: list[list[Scalar] | dict[str, Scalar]] = Field(examples=[[[5.1, 3.5, 1.4, 0.2]]])
    parameters: V1Parameters | None = None


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                      "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
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


# An operation carrying this key gets the served models' examples of its protocol ("v1" or
# "v2") when the schema is completed (the key itself is removed then).
EXAMPLES_KEY = "x-serve-app-examples"


def _body(model: type[BaseModel], protocol: str) -> dict:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline(schema, schema.get("$defs", {}))}}},
        EXAMPLES_KEY: protocol}


V1_REQUEST = _body(V1Request, "v1")
V2_REQUEST = _body(V2Request, "v2")


# -- examples ---------------------------------------------------------------------------------
EXAMPLE_ROWS = 3
TEXTUAL = ("string", "category")
V2_DATATYPES = {"float64": "FP64", "int64": "INT64", "bool": "BOOL", "string": "BYTES", "category": "BYTES"}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def example_records(meta: ModelMetadata, rows: int = EXAMPLE_ROWS) -> list[dict[str, Any]]:
    """Up to ``rows`` of the stored example (complete rows first: an example must work for a
    model that takes no missing values), or one row of training means for a model stored
    without an example."""
    names = meta.feature_names
    stored = [{name: None if _missing(record.get(name)) else record.get(name) for name in names}
              for record in meta.example if isinstance(record, dict)]
    if stored:
        stored.sort(key=lambda record: any(_missing(v) for v in record.values()))  # stable
        return stored[:rows]
    return [{f.name: _typical_value(f, meta.reference_stats.get(f.name, {})) for f in meta.features}]


def _typical_value(feature: Feature, stats: Mapping[str, Any]) -> Any:
    """A training-like value of one feature from its reference statistics."""
    if feature.dtype in TEXTUAL:
        mode = stats.get("mode")
        return mode if mode is not None else (feature.categories or [""])[0]
    mean = float(stats.get("mean", 0.0))
    if not math.isfinite(mean):
        mean = 0.0
    if feature.dtype == "bool":
        return mean >= 0.5
    if feature.dtype == "int64":
        return int(round(mean))
    return float(f"{mean:.6g}")


def v1_example(meta: ModelMetadata) -> dict:
    """A KServe V1 request: the example rows as records."""
    return {"instances": example_records(meta)}


def v2_example(meta: ModelMetadata) -> dict:
    """An Open Inference Protocol V2 request: one tensor per column, shape [N] (strings as
    BYTES, numbers FP64/INT64, booleans BOOL)."""
    records = example_records(meta)
    return {"inputs": [
        {"name": f.name, "shape": [len(records)], "datatype": V2_DATATYPES[f.dtype],
         "data": [_wire_value(f, record[f.name]) for record in records]}
        for f in meta.features]}


def _wire_value(feature: Feature, value: Any) -> Any:
    """``value`` as its column's V2 datatype wants it in JSON (3.0 is no INT64 element)."""
    if _missing(value):
        return None
    if feature.dtype == "int64" and isinstance(value, float) and value.is_integer():
        return int(value)
    if feature.dtype == "float64" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


EXAMPLE_BODIES: dict[str, Callable[[ModelMetadata], dict]] = {"v1": v1_example, "v2": v2_example}


def _summary(name: str, meta: ModelMetadata) -> str:
    source = f"{len(example_records(meta))} training rows" if meta.example else "training means"
    return f"{name} ({meta.framework} {meta.task}, version {meta.version}): {source}"


def with_examples(schema: dict, models: Mapping[str, ModelMetadata], bearer: bool = False) -> dict:
    """A copy of ``schema`` whose marked operations offer one named example per model: the
    request body, and the model's name (and version) for the path parameters. ``bearer``:
    the API wants a bearer token (Swagger UI's "Authorize" then sends it)."""
    schema = copy.deepcopy(schema)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            protocol = operation.pop(EXAMPLES_KEY, None) if isinstance(operation, dict) else None
            if protocol is None or not models:
                continue
            build = EXAMPLE_BODIES[protocol]
            media = operation["requestBody"]["content"]["application/json"]
            media["examples"] = {name: {"summary": _summary(name, meta), "value": build(meta)}
                                 for name, meta in models.items()}
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") in ("name", "version"):
                    parameter["examples"] = {
                        name: {"summary": name, "value": name if parameter["name"] == "name" else meta.version}
                        for name, meta in models.items()}
    if bearer:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "The data plane's token (SERVE_APP_API_TOKEN; docs/reliability-security.md)"}
        schema["security"] = [{"bearer": []}]
    return schema


def declared_models(server: object) -> dict[str, ModelMetadata]:
    """The default version's metadata of each model the ingress ``server`` declares (none
    before it has a registry: a server built for its routes alone)."""
    registry = getattr(server, "registry", None)
    if registry is None:
        return {}
    return {name: served.default.meta for name, served in registry.declared.items()}


def requires_token(server: object) -> bool:
    """Whether the ingress ``server`` wants a bearer token on its model routes."""
    lifecycle = getattr(server, "lifecycle", None)
    return getattr(lifecycle, "token", None) is not None


def complete_schema_lazily(api: FastAPI, models: Callable[[], Mapping[str, ModelMetadata]],
                           bearer: Callable[[], bool] = lambda: False) -> None:
    """``api.openapi`` returns FastAPI's schema with the examples of the models served when
    it is asked (computed again only when a model's default version changes)."""
    base = api.openapi  # FastAPI's own: builds the schema once and keeps it
    completed: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        schema, served, token = base(), models(), bearer()
        key = (id(schema), token, tuple((name, meta.version, meta.sha256) for name, meta in served.items()))
        if completed.get("key") != key:
            completed.update(key=key, schema=with_examples(schema, served, token))
        return completed["schema"]

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's /openapi.json calls it


# -- the pages --------------------------------------------------------------------------------
ASSETS = Path(str(files("fastapi_offline") / "static"))  # swagger-ui-bundle.js, swagger-ui.css, favicon.png
ASSETS_PATH = "/docs/assets"
# ReDoc's bundle shows Redocly's logo from their CDN (no option turns it off): the browser is
# told to load nothing that is not ours (the bundle runs its search in a blob: worker).
REDOC_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; "
                "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'")


def serve_docs_pages(api: FastAPI, docs_url: str | None = "/docs", redoc_url: str | None = "/redoc") -> None:
    """``docs_url`` (Swagger UI) and ``redoc_url`` on ``api`` (built with FastAPI's own pages
    off), their assets served from the package; every URL below the route prefix."""
    if docs_url is None and redoc_url is None:
        return
    api.mount(ASSETS_PATH, StaticFiles(directory=ASSETS), name="docs-assets")

    def prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    if docs_url is not None:
        async def swagger_ui(request: Request) -> HTMLResponse:
            root = prefix(request)
            return get_swagger_ui_html(
                openapi_url=f"{root}{api.openapi_url}", title=f"{api.title} - Swagger UI",
                swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
                swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
                # no spec validator badge (it would call validator.swagger.io)
                swagger_ui_parameters={"validatorUrl": None, **(api.swagger_ui_parameters or {})})

        api.add_api_route(docs_url, swagger_ui, methods=["GET"], include_in_schema=False)
    if redoc_url is not None:
        async def redoc(request: Request) -> HTMLResponse:
            root = prefix(request)
            page = get_redoc_html(openapi_url=f"{root}{api.openapi_url}", title=f"{api.title} - ReDoc",
                                  redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
                                  redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png", with_google_fonts=False)
            page.headers["Content-Security-Policy"] = REDOC_POLICY
            return page

        api.add_api_route(redoc_url, redoc, methods=["GET"], include_in_schema=False)
