"""The HTTP ingress: KServe V1 and Open Inference Protocol V2 over one FastAPI app.

``build_app(args)`` is the Serve ``import_path`` target (``serve_app.app:build_app``).
Models run inside the ingress replica by default, so a prediction crosses no
DeploymentHandle hop (a hop measured about 4x slower on 2 cores, see README "Fast path");
models declared ``dedicated: true`` get a deployment of their own behind a handle.

Request handling is deliberately thin: read bytes, decode with a codec, ``infer``, encode
with orjson. Every client mistake is an :class:`InferenceError` and leaves as
``{"error": "..."}`` with a 4xx status.
"""


import asyncio
import logging
import random
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serve_app import __version__, auth, telemetry
from serve_app.codecs import binary, v1, v2
from serve_app.codecs.tensors import EXPLANATION_OUTPUTS
from serve_app.config import MULTIPLEXED_DEPLOYMENT, AppConfig, ModelSpec
from serve_app.errors import (BadInput, InferenceError, InferenceTimeout, ModelNotFoundError, PayloadTooLarge,
                              ReloadFailed, Unauthorized, UnsupportedMediaType)
from serve_app.metadata import ModelMetadata
from serve_app.openapi_docs import V1_REQUEST, V2_REQUEST
from serve_app.runtimes import runtime_for
from serve_app.reloads import ReloadWatcher, request_reload
from serve_app.served import MultiplexedWorker, RemoteWorker, ServedModel
from serve_app.store import ModelStore, ModelStoreError, version_sort_key
from serve_app.worker import (DedicatedModel, ModelWorker, MultiplexedModels, close_later, distinct, load_versions,
                              replica_id)

# Serve's own logger: its records get Serve's JSON encoding and the request id.
logger = logging.getLogger("ray.serve")
SERVER_NAME = "serve-app"
# A name found missing in the store is not looked up again for this long.
ABSENT_FOR_S = 5.0
# Long-tail models whose metadata the ingress keeps (the models themselves live elsewhere).
MAX_TAIL_ENTRIES = 1000
# How long a reload request waits for every replica to reload.
RELOAD_TIMEOUT_S = 60.0


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
                    status_code=status_code, media_type="application/json")


def _content_type(request: Request) -> str:
    # Above the ingress class: serve.ingress copies the class while this module is still loading.
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def sampled_trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<trace id>-<parent id>-<flags>``)
    whose sampled flag is set; None for a missing, malformed or unsampled one."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[3]) != 2:
        return None
    try:
        sampled = int(parts[3], 16) & 1
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower() if sampled and parts[1] != "0" * 32 else None


def error_response(status_code: int, message: str, reason: str | None = None) -> Response:
    body = {"error": message} if reason is None else {"error": message, "reason": reason}
    response = json_response(body, status_code)
    if status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="serve-app"'
    return response


api = FastAPI(
    title="serve-app",
    version=__version__,
    description="scikit-learn and XGBoost models on Ray Serve: KServe V1 and Open Inference Protocol V2.",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
    return error_response(exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    return error_response(400, str(exc.errors()))


# max_surge_percent: a rolling update starts a new replica before it stops an old one, so a
# one-replica deployment is never empty mid-rollout (requests would queue ~10 s otherwise).
@serve.deployment(name="ModelServer", max_ongoing_requests=64, max_surge_percent=25)
@serve.ingress(api)
class ModelServer:
    def __init__(self, config: dict, dedicated: dict[str, DeploymentHandle] | None = None,
                 multiplexed: DeploymentHandle | None = None):
        self.config = AppConfig.model_validate(config)
        self.store = ModelStore(self.config.store)
        self._specs = {spec.name: spec for spec in self.config.models}
        self._dedicated, self._multiplexed = dedicated or {}, multiplexed
        self.models: dict[str, ServedModel] = {spec.name: self._build(spec) for spec in self.config.models}
        # The long tail seen so far (multiplexed), and names recently found missing in the store.
        self._tail: OrderedDict[str, ServedModel] = OrderedDict()
        self._absent: dict[str, float] = {}
        self._token = auth.configured_token()
        if self._token is None:
            logger.warning("no SERVE_APP_API_TOKEN: the model and admin endpoints (reload) are open")
        self._app_name = serve.get_replica_context().app_name
        self._watcher = ReloadWatcher(self._app_name, replica_id(), self._hosted, self._reload)

    def _build(self, spec: ModelSpec) -> ServedModel:
        """Every live version of a declared model, loaded here or reached through its deployment."""
        if spec.dedicated:
            handle = self._dedicated[spec.name]
            workers = {}
            for label in spec.live_versions:
                meta = self.store.read_metadata(spec.name, label)
                accepts = runtime_for(meta.framework).accepts_missing
                workers[label] = RemoteWorker(meta, accepts, handle, spec, self.store, label)
            serving = "dedicated"
        else:
            workers, serving = load_versions(self.store, spec), "in-process"
        return ServedModel(spec.name, workers, spec.version, spec.traffic, spec.shadow, serving)

    async def check_health(self) -> None:
        """Serve replaces this replica when an in-process model stops predicting."""
        self._watcher.start()
        for served in self.models.values():
            for worker in distinct(served.by_version.values()):
                if isinstance(worker, ModelWorker):
                    await worker.check()

    # -- models: declared, long tail, reloads ----------------------------------------------
    def _hosted(self) -> list[str]:
        return [*self.models, *self._tail]

    async def _reload(self, name: str) -> None:
        """Reload ``name`` from the store (``latest`` resolved again); requests in flight
        finish on the old workers."""
        if name in self.models:
            spec = self._specs[name]
            fresh = await asyncio.get_running_loop().run_in_executor(None, self._build, spec)
            old, self.models[name] = self.models[name], fresh
            close_later(old.by_version.values(), spec.timeout_s)
        else:
            self._tail.pop(name, None)  # the next request reads the store again, with a new model id

    def _known(self, name: str) -> ServedModel | None:
        return self.models.get(name) or self._tail.get(name)

    async def _served(self, name: str) -> ServedModel:
        served = self._known(name)
        if served is not None:
            return served
        mux = self.config.multiplexed
        if mux is None or not mux.serves(name) or self._absent.get(name, 0) > time.monotonic():
            raise ModelNotFoundError(f"model {name!r} is not served; served: {sorted(self.models)}")
        try:
            default = await self._tail_worker(name, None)
        except ModelNotFoundError:
            self._absent[name] = time.monotonic() + ABSENT_FOR_S  # a flood of unknown names stays off the store
            raise
        served = self._tail[name] = ServedModel(
            name, {"latest": default}, "latest", serving="multiplexed",
            open_version=lambda version: self._tail_worker(name, version))
        while len(self._tail) > MAX_TAIL_ENTRIES:
            self._tail.popitem(last=False)
        return served

    async def _tail_worker(self, name: str, version: str | None) -> MultiplexedWorker:
        try:
            meta = await asyncio.get_running_loop().run_in_executor(None, self.store.read_metadata, name, version)
        except (ModelStoreError, ValueError):
            if version is None:
                raise ModelNotFoundError(f"model {name!r} is not served and not in the store; served: "
                                         f"{sorted(self.models)}") from None
            raise ModelNotFoundError(f"model {name!r} has no version {version!r} in the store") from None
        mux = self.config.multiplexed
        return MultiplexedWorker(meta, runtime_for(meta.framework).accepts_missing, self._multiplexed,
                                 mux.spec_for(name, meta.version), self._watcher.generation(name))

    async def _pick(self, request: Request, name: str, version: str | None = None, split: bool = True):
        """The served model and the worker that answers: an explicit version, or the canary
        split (sticky per X-Request-ID), or the default version for metadata."""
        served = await self._served(name)
        if version is None and not split:
            return served, served.default
        return served, await served.pick(version, request.headers.get("x-request-id"))

    async def _json_body(self, request: Request) -> Any:
        content_type = _content_type(request)
        if content_type != "application/json" and not content_type.endswith("+json"):  # a missing header means JSON
            raise UnsupportedMediaType(f"content type {content_type!r} is not supported; send application/json")
        body = await self._body(request)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"malformed JSON: {exc}", "malformed_json") from None

    async def _v2_body(self, request: Request) -> tuple[Any, set[str]]:
        """A V2 request object from JSON or a binary body, and the outputs to send back binary."""
        header_length = request.headers.get(binary.HEADER_LENGTH)
        if not binary.is_binary(_content_type(request), header_length):
            return await self._json_body(request), set()
        body = binary.decode_body(await self._body(request), _content_type(request), header_length,
                                  request.query_params.get("outputs"))
        return body, binary.binary_outputs(body)

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body declares no size: stop at the limit
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _answered_by(request: Request, worker, results: dict) -> ModelMetadata:
        """The metadata of the model version that computed ``results`` (it labels the answer
        and the request's metrics)."""
        meta = results.get("model_meta", worker.meta)
        request.state.model_version = meta.version
        return meta

    def _authenticate(self, request: Request) -> None:
        if self._token is not None and not auth.authorized(request.headers.get("authorization"), self._token):
            raise Unauthorized("missing or invalid bearer token (Authorization: Bearer <token>)")

    async def _handle(self, request: Request, protocol: str, name: str,
                      work: Callable[[], Awaitable[Any]], public: bool = False,
                      timeout: float | None = None) -> Response:
        """Authenticate, then run one request's ``work`` within the model's timeout; every
        outcome is counted, timed and, if bad, logged."""
        started = time.perf_counter()
        reason = None
        self._watcher.start()
        known = self._known(name)
        if timeout is None:
            timeout = (known.spec.timeout_s if known else
                       self.config.multiplexed.timeout_s if self.config.multiplexed else None)
        try:
            if not public:
                self._authenticate(request)
            try:
                async with asyncio.timeout(timeout):  # no extra task per request, unlike wait_for
                    result = await work()
            except TimeoutError:
                raise InferenceTimeout(f"model {name!r} did not answer within {timeout} s") from None
            response = result if isinstance(result, Response) else json_response(result)
        except InferenceError as exc:
            reason = exc.reason
            response = error_response(exc.status_code, exc.message, reason)
            log = logger.warning if exc.status_code < 500 else logger.error
            log("%s %s request for model %r: %s (%s)", "rejected" if exc.status_code < 500 else "failed",
                protocol, name, exc.message, reason,
                extra={"model": name, "protocol": protocol, "reason": reason, "status_code": exc.status_code})
        except Exception:
            logger.exception("inference failed for model %r", name,
                             extra={"model": name, "protocol": protocol, "status_code": 500})
            response = error_response(500, "internal error; see server logs")
        # Only served names become label values: arbitrary URLs must not create metric series.
        known = known or self._known(name)  # a long-tail model is known once its first request ran
        model, version = ((name, getattr(request.state, "model_version", known.meta.version)) if known
                          else (telemetry.UNKNOWN_MODEL, ""))
        if known is not None and response.status_code < 400:
            response.headers["X-Model-Version"] = version  # which version answered (canary, shadow)
        elapsed = time.perf_counter() - started
        telemetry.request_done(model, version, protocol, response.status_code, elapsed,
                               reason if response.status_code < 500 else None)
        self._log_access(request, protocol, model, version, response.status_code, elapsed)
        return response

    def _log_access(self, request: Request, protocol: str, model: str, version: str, status: int,
                    seconds: float) -> None:
        """One access line for the requests worth reading (see AccessLogSpec), in Serve's JSON
        log with Serve's request id; Serve's own every-request access log is off."""
        trace_id = sampled_trace_id(request.headers.get("traceparent"))
        if not self.config.access_log.wants(status, seconds, trace_id is not None, random.random()):
            return
        logger.info("%s %s %d %.1fms", request.method, request.url.path, status, seconds * 1000,
                    extra={"model": model, "model_version": version, "protocol": protocol,
                           "status_code": status, "latency_ms": round(seconds * 1000, 3),
                           "trace_id": trace_id})

    # -- KServe V1 ---------------------------------------------------------------------------
    @api.get("/v1/models", tags=["V1"])
    async def v1_list(self, request: Request) -> Response:
        try:
            self._authenticate(request)
        except Unauthorized as exc:
            return error_response(exc.status_code, exc.message, exc.reason)
        return json_response({"models": sorted({entry["name"] for entry in await self._index()
                                                if entry["state"] == "READY" or entry["serving"] == "multiplexed"})})

    @api.get("/v1/models/{name}", tags=["V1"])
    @api.get("/v1/models/{name}/versions/{version}", tags=["V1"])
    async def v1_model(self, name: str, request: Request, version: str | None = None) -> Response:
        async def work():
            _, worker = await self._pick(request, name, version, split=False)
            return {"name": name, "ready": True, **worker.meta.to_dict()}
        return await self._handle(request, "v1", name, work)

    @api.post("/v1/models/{name}:predict", tags=["V1"], openapi_extra=V1_REQUEST)
    @api.post("/v1/models/{name}/versions/{version}:predict", tags=["V1"], openapi_extra=V1_REQUEST)
    async def v1_predict(self, name: str, request: Request, version: str | None = None) -> Response:
        async def work():
            served, worker = await self._pick(request, name, version)
            X, output = v1.decode_request(await self._json_body(request), worker.meta, worker.accepts_missing)
            results = await worker.infer(X, (output,))
            if version is None:
                served.mirror(X, (output,), results)
            self._answered_by(request, worker, results)
            return v1.encode_response(results, output)
        return await self._handle(request, "v1", name, work)

    @api.post("/v1/models/{name}:explain", tags=["V1"], openapi_extra=V1_REQUEST)
    @api.post("/v1/models/{name}/versions/{version}:explain", tags=["V1"], openapi_extra=V1_REQUEST)
    async def v1_explain(self, name: str, request: Request, version: str | None = None) -> Response:
        """Per-feature contributions to the model's margin, per row (README "Explanations")."""
        async def work():
            _, worker = await self._pick(request, name, version)
            X, _ = v1.decode_request(await self._json_body(request), worker.meta, worker.accepts_missing)
            results = await worker.infer(X, EXPLANATION_OUTPUTS)
            return v1.encode_explanation(results, self._answered_by(request, worker, results))
        return await self._handle(request, "v1", name, work)

    # -- Open Inference Protocol V2 ------------------------------------------------------------
    @api.get("/v2", tags=["V2"])
    async def v2_server(self) -> Response:
        return json_response({"name": SERVER_NAME, "version": __version__,
                              "extensions": ["binary_tensor_data", "model_repository"]})

    @api.get("/v2/health/live", tags=["V2"])
    async def v2_live(self) -> Response:
        return json_response({"live": True})

    @api.get("/v2/health/ready", tags=["V2"])
    async def v2_ready(self) -> Response:
        return json_response({"ready": True})

    @api.get("/v2/models/{name}", tags=["V2"])
    @api.get("/v2/models/{name}/versions/{version}", tags=["V2"])
    async def v2_model(self, name: str, request: Request, version: str | None = None) -> Response:
        async def work():
            _, worker = await self._pick(request, name, version, split=False)
            return v2.model_metadata(worker.meta)
        return await self._handle(request, "v2", name, work)

    @api.get("/v2/models/{name}/ready", tags=["V2"])
    @api.get("/v2/models/{name}/versions/{version}/ready", tags=["V2"])
    async def v2_model_ready(self, name: str, request: Request, version: str | None = None) -> Response:
        async def work():
            await self._pick(request, name, version, split=False)
            return {"name": name, "ready": True}
        return await self._handle(request, "v2", name, work, public=True)  # a health probe

    @api.post("/v2/models/{name}/infer", tags=["V2"], openapi_extra=V2_REQUEST)
    @api.post("/v2/models/{name}/versions/{version}/infer", tags=["V2"], openapi_extra=V2_REQUEST)
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        async def work():
            served, worker = await self._pick(request, name, version)
            body, binary_outputs = await self._v2_body(request)
            X, outputs, request_id = v2.decode_request(body, worker.meta, worker.accepts_missing)
            results = await worker.infer(X, outputs)
            if version is None:
                served.mirror(X, outputs, results)
            response = v2.encode_response(self._answered_by(request, worker, results), results, outputs,
                                          request_id)
            if not binary_outputs:
                return response
            content, header_length = binary.encode_response(response, binary_outputs)
            return Response(content, media_type="application/octet-stream",
                            headers={binary.HEADER_LENGTH: str(header_length)})
        return await self._handle(request, "v2", name, work)

    # -- model repository (the V2 repository extension, as Triton and MLServer speak it) ------
    async def _index(self) -> list[dict]:
        """Live versions (READY) and the store's other versions (UNAVAILABLE, or loaded on
        first use when the multiplexed long tail serves them)."""
        entries = [entry for served in [*self.models.values(), *self._tail.values()] for entry in served.describe()]
        live = {(e["name"], e["version"]) for e in entries}
        stored = await asyncio.get_running_loop().run_in_executor(None, self.store.list_models)
        mux = self.config.multiplexed
        for name, versions in sorted(stored.items()):
            for version in versions:
                if (name, version) in live:
                    continue
                tail = mux is not None and name not in self.models and mux.serves(name)
                entries.append({"name": name, "version": version, "state": "UNAVAILABLE",
                                "serving": "multiplexed" if tail else None,
                                "reason": "loads on first request" if tail else "in the store, not configured"})
        return sorted(entries, key=lambda e: (e["name"], version_sort_key(e["version"])))

    @api.get("/v2/repository/index", tags=["Repository"])
    @api.post("/v2/repository/index", tags=["Repository"])
    async def repository_index(self, request: Request) -> Response:
        """Every model and version: what is live, where, with which share of traffic."""
        async def work():
            return await self._index()
        return await self._handle(request, "admin", "", work)

    @api.post("/v2/repository/models/{name}/load", tags=["Repository"])
    async def repository_load(self, name: str, request: Request) -> Response:
        """Reload ``name`` from the store in every replica that serves it, without a restart
        (``latest`` is resolved again). Answers when all have reloaded."""
        async def work():
            await self._served(name)  # 404 for a name that is neither declared nor in the tail
            generation, reloaded, pending, failed = await request_reload(self._app_name, name, RELOAD_TIMEOUT_S)
            if pending:
                raise InferenceTimeout(f"{len(pending)} replicas did not reload {name!r} within {RELOAD_TIMEOUT_S} s")
            if failed:
                raise ReloadFailed(f"reloading {name!r} failed on {len(failed)} replicas (the loaded version "
                                   f"keeps serving): {sorted(set(failed.values()))}")
            await self._watcher.caught_up(name, generation)
            served = await self._served(name)
            return {"name": name, "generation": generation, "replicas_reloaded": reloaded,
                    "versions": served.describe()}
        return await self._handle(request, "admin", name, work, timeout=RELOAD_TIMEOUT_S + 5)


def build_app(args: dict) -> serve.Application:
    """The Serve application for ``args`` (see :class:`serve_app.config.AppConfig`)."""
    config = AppConfig.model_validate(args)
    store = ModelStore(config.store)
    if config.train_if_missing:
        from serve_app.train import DEMO_MODELS, ensure_models

        ensure_models(store, [m.name for m in config.models if m.name in DEMO_MODELS])
    dedicated = {
        spec.name: DedicatedModel.options(name=spec.deployment_name).bind(config.store, spec)
        for spec in config.models
        if spec.dedicated
    }
    multiplexed = (MultiplexedModels.options(name=MULTIPLEXED_DEPLOYMENT).bind(config.store, config.multiplexed)
                   if config.multiplexed else None)
    return ModelServer.bind(config.model_dump(), dedicated, multiplexed)
