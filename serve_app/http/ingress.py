"""The HTTP ingress: KServe V1, Open Inference Protocol V2 and MLflow scoring routes.

Each route reads its body, decodes it with a codec, asks the registry which worker answers,
and encodes the answer, inside the request lifecycle (:mod:`serve_app.lifecycle`) that
authenticates, times out, maps errors to statuses, counts and logs. Models run inside this
replica unless declared ``dedicated`` (a deployment of their own) or served from the
multiplexed long tail; the registry hides which.

Routes are declared with :func:`serve_app.http.routes.route`; each replica builds its ASGI app
from them (``__serve_build_asgi_app__``): the inference routes on the fast path, the others
(and ``/docs``) through FastAPI.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request,
# path parameters) from the functions' own module when it resolves strings; plain objects are
# simplest.
import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serve_app import __version__
from serve_app.codecs import mlflow, v1, v2
from serve_app.config import INGRESS_DEPLOYMENT, AppConfig, Rollout
from serve_app.deployments.handles import DEPLOYMENT_OPTIONS
from serve_app.deployments.placement import DeploymentPlacement
from serve_app.deployments.reloads import RELOAD_TIMEOUT_S, ReloadWatcher, request_reload
from serve_app.errors import InferenceTimeout, ReloadFailed
from serve_app.grpc.servicer import InferenceServicer
from serve_app import auth
from serve_app.http import bodies
from serve_app.http.lifecycle import HttpCall
from serve_app.http.openapi_docs import V1_REQUEST, V2_REQUEST
from serve_app.http.responses import error_response, json_response, v2_response
from serve_app.http.routes import FastPath, build_api, route
from serve_app.lifecycle import RequestLifecycle, RequestRefused
from serve_app.metadata import ModelMetadata
from serve_app.serving.outputs import EXPLANATION_OUTPUTS
from serve_app.serving.registry import ModelRegistry
from serve_app.store import ModelStore

logger = logging.getLogger("ray.serve")
# MLflow's scoring bodies, for /docs (serve_app/codecs/mlflow.py).
MLFLOW_REQUEST = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "dataframe_split": {"type": "object", "properties": {
            "columns": {"type": "array", "items": {"type": "string"}}, "data": {"type": "array"}}},
        "dataframe_records": {"type": "array", "items": {"type": "object"}},
        "instances": {"type": "array"}, "inputs": {}, "params": {"type": "object"}}}},
    "text/csv": {"schema": {"type": "string"}}}}}

async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    return error_response(exc.status_code, str(exc.detail))


async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return error_response(400, str(exc.errors()))


async def _refused(_: Request, exc: RequestRefused) -> Response:
    return exc.response


def fastapi_app(server: "ModelServer") -> FastAPI:
    """Every route of one replica's ingress on FastAPI, errors in our JSON shape."""
    api = build_api(server, title="serve-app", version=__version__,
                    description="scikit-learn and XGBoost models on Ray Serve: KServe V1 and Open Inference "
                                "Protocol V2.")
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(RequestRefused, _refused)
    return api


@serve.deployment(name=INGRESS_DEPLOYMENT, **DEPLOYMENT_OPTIONS)
@serve.ingress()
class ModelServer(InferenceServicer):
    """The ingress replica: the REST routes below and the gRPC service's RPCs (inherited from
    :class:`~serve_app.grpc.servicer.InferenceServicer`), over one registry."""

    def __init__(self, config: dict, dedicated: dict[str, DeploymentHandle] | None = None,
                 multiplexed: DeploymentHandle | None = None):
        self.config = AppConfig.model_validate(config)
        store = ModelStore(self.config.store)
        self._watcher = ReloadWatcher(lambda: self.registry.hosted(), lambda name: self.registry.reload(name))
        placement = DeploymentPlacement(store, dedicated or {}, multiplexed, self.config.multiplexed,
                                        self._watcher.generation)
        self.registry = ModelRegistry(self.config, store, placement)
        token = auth.configured_token()
        if token is None:
            logger.warning("no SERVE_APP_API_TOKEN: the model and admin endpoints (reload) are open")
        self.lifecycle = RequestLifecycle(self.registry, self.config.access_log, token, self.config.admission)
        self._limit = self.config.max_request_bytes

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with ``ModelServer``'s ``user_config`` at start and whenever it
        changes: a rollout without a restart (:class:`serve_app.config.Rollout`). What cannot
        be applied is logged and the models serve as they were: raising would stop the replica."""
        try:
            specs = Rollout.model_validate(user_config or {}).specs(self.config)
        except Exception as exc:  # whatever it is, the replica serves on (make manifests refuses it first)
            logger.error("user_config not applied: %s", exc)
            return
        for name, error in (await self.registry.respecify(specs)).items():
            logger.error("user_config: model %r keeps serving as it was: %s", name, error)

    def __serve_build_asgi_app__(self):
        """This replica's ASGI app (Serve calls it once, after ``__init__``)."""
        api = fastapi_app(self)
        return FastPath(self, api) if self.config.fast_path else api

    async def check_health(self) -> None:
        """Serve replaces this replica when a model loaded here stops predicting."""
        self._watcher.start()
        for worker in self.registry.workers():
            await worker.check()

    def _scope(self, request: Request, protocol: str, name: str, **options):
        self._watcher.start()
        return self.lifecycle.scope(HttpCall(request), protocol, name, **options)

    def grpc_scope(self, call, name: str, **options):
        self._watcher.start()
        return self.lifecycle.scope(call, "grpc", name, **options)

    @property
    def max_request_bytes(self) -> int:
        return self._limit

    async def reload_everywhere(self, name: str) -> dict:
        """Reload ``name`` from the store in every replica that serves it (``latest`` resolved
        again); returns when all have, with what serves now."""
        await self.registry.served(name)  # 404 for a name that is neither declared nor in the tail
        generation, reloaded, pending, failed = await request_reload(self._watcher.app_name, name, RELOAD_TIMEOUT_S)
        if pending:
            raise InferenceTimeout(f"{len(pending)} replicas did not reload {name!r} within {RELOAD_TIMEOUT_S} s")
        if failed:
            raise ReloadFailed(f"reloading {name!r} failed on {len(failed)} replicas (the loaded version "
                               f"keeps serving): {sorted(set(failed.values()))}")
        await self._watcher.caught_up(name, generation)
        served = await self.registry.served(name)
        return {"name": name, "generation": generation, "replicas_reloaded": reloaded,
                "versions": served.describe()}

    async def _describe(self, request: Request, protocol: str, name: str, version: str | None,
                        describe: Callable[[ModelMetadata], dict], public: bool = False) -> Response:
        """A metadata or readiness answer about one version (the default when none is named)."""
        async with self._scope(request, protocol, name, public=public) as scope:
            worker = await self.registry.for_metadata(name, version)
            scope.reply(describe(worker.meta), worker.meta.version)
        return scope.response

    async def _v1_request(self, request: Request, name: str, version: str | None):
        """The worker that answers and the decoded V1 body."""
        worker = await self.registry.for_inference(name, version, request.headers.get("x-request-id"))
        body = await bodies.json_body(request, self._limit)
        return worker, v1.decode_request(body, worker.meta, worker.accepts_missing)

    # -- KServe V1 ---------------------------------------------------------------------------
    @route("GET", "/v1/models", tags=["V1"])
    async def v1_list(self, request: Request) -> Response:
        async with self._scope(request, "v1", "") as scope:
            scope.reply({"models": await self.registry.names()})
        return scope.response

    @route("GET", "/v1/models/{name}", "/v1/models/{name}/versions/{version}", tags=["V1"])
    async def v1_model(self, name: str, request: Request, version: str | None = None) -> Response:
        return await self._describe(request, "v1", name, version, lambda meta: v1.model_metadata(name, meta))

    @route("POST", "/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict", fast=True,
           tags=["V1"], openapi_extra=V1_REQUEST)
    async def v1_predict(self, name: str, request: Request, version: str | None = None) -> Response:
        async with self._scope(request, "v1", name) as scope:
            worker, decoded = await self._v1_request(request, name, version)
            answer = await worker.infer(decoded.inputs, decoded.outputs)
            scope.reply(v1.encode_response(answer, decoded), answer.version)
        return scope.response

    @route("POST", "/v1/models/{name}:explain", "/v1/models/{name}/versions/{version}:explain",
           tags=["V1"], openapi_extra=V1_REQUEST)
    async def v1_explain(self, name: str, request: Request, version: str | None = None) -> Response:
        """Per-feature contributions to the model's margin, per row (docs/protocols.md)."""
        async with self._scope(request, "v1", name) as scope:
            worker, decoded = await self._v1_request(request, name, version)
            answer = await worker.infer(decoded.inputs, EXPLANATION_OUTPUTS)
            scope.reply(v1.encode_explanation(answer, decoded), answer.version)
        return scope.response

    # -- Open Inference Protocol V2 ------------------------------------------------------------
    @route("GET", "/v2", tags=["V2"])
    async def v2_server(self) -> Response:
        return json_response(v2.server_metadata())

    @route("GET", "/v2/health/live", tags=["V2"])
    async def v2_live(self) -> Response:
        return json_response({"live": True})

    @route("GET", "/v2/health/ready", tags=["V2"])
    async def v2_ready(self) -> Response:
        return json_response({"ready": True})

    @route("GET", "/v2/models/{name}", "/v2/models/{name}/versions/{version}", tags=["V2"])
    async def v2_model(self, name: str, request: Request, version: str | None = None) -> Response:
        return await self._describe(request, "v2", name, version, v2.model_metadata)

    @route("GET", "/v2/models/{name}/ready", "/v2/models/{name}/versions/{version}/ready",
           tags=["V2"])
    async def v2_model_ready(self, name: str, request: Request, version: str | None = None) -> Response:
        return await self._describe(request, "v2", name, version, lambda meta: {"name": name, "ready": True},
                                    public=True)  # a health probe: no token

    @route("POST", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer", fast=True,
           tags=["V2"], openapi_extra=V2_REQUEST)
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        async with self._scope(request, "v2", name) as scope:
            worker = await self.registry.for_inference(name, version, request.headers.get("x-request-id"))
            body, binary_outputs = await bodies.v2_body(request, self._limit)
            decoded = v2.decode_request(body, worker.meta, worker.accepts_missing)
            answer = await worker.infer(decoded.inputs, decoded.outputs)
            scope.reply(v2_response(v2.encode_response(name, answer, decoded), binary_outputs), answer.version)
        return scope.response

    # -- MLflow's scoring protocol ---------------------------------------------------------------
    @route("POST", "/invocations", "/v1/models/{name}/invocations", "/v1/models/{name}/versions/{version}/invocations",
           fast=True, tags=["MLflow"], openapi_extra=MLFLOW_REQUEST)
    async def mlflow_invocations(self, request: Request, name: str | None = None,
                                 version: str | None = None) -> Response:
        """MLflow's ``/invocations`` (JSON dataframe_split/records, instances, inputs; CSV);
        without a model in the path, the config's ``invocations_model``."""
        name = name or self.config.default_invocations_model
        async with self._scope(request, "mlflow", name) as scope:
            worker = await self.registry.for_inference(name, version, request.headers.get("x-request-id"))
            body = await bodies.read(request, self._limit)
            decoded = mlflow.decode_request(body, bodies.content_type(request), worker.meta, worker.accepts_missing)
            answer = await worker.infer(decoded.inputs, decoded.outputs)
            scope.reply(mlflow.encode_response(answer, decoded), answer.version)
        return scope.response

    # -- model repository (the V2 repository extension, as Triton and MLServer speak it) ------
    @route(("GET", "POST"), "/v2/repository/index", tags=["Repository"])
    async def repository_index(self, request: Request) -> Response:
        """Every model and version: what is live, where, with which share of traffic."""
        async with self._scope(request, "admin", "") as scope:
            scope.reply(await self.registry.index())
        return scope.response

    @route("POST", "/v2/repository/models/{name}/load", tags=["Repository"])
    async def repository_load(self, name: str, request: Request) -> Response:
        """Reload ``name`` from the store in every replica that serves it, without a restart
        (``latest`` is resolved again). Answers when all have reloaded."""
        async with self._scope(request, "admin", name, timeout=RELOAD_TIMEOUT_S + 5) as scope:
            scope.reply(await self.reload_everywhere(name))
        return scope.response
