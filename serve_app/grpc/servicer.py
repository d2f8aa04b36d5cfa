"""The Open Inference Protocol's ``inference.GRPCInferenceService`` on the ingress replica.

Ray Serve's gRPC ingress (``grpc_options`` in the Serve config; on the fast path HAProxy's h2
frontend and each replica's own gRPC server) calls the ingress class's method named after the
RPC with the request message and a ``grpc_context``. :class:`InferenceServicer` is those
methods, one per RPC of the service; :class:`~serve_app.http.ingress.ModelServer` inherits
them, so both transports share the replica's registry, workers and batches. Each RPC runs in
the same request lifecycle as the REST routes (:mod:`serve_app.lifecycle`) through
:class:`GrpcCall`: the bearer token from the ``authorization`` metadata, the model's timeout,
metrics and access lines with ``protocol="grpc"``, and every error as a gRPC status with the
message and its reason (trailing metadata ``reason``), never an uncaught exception (Serve would
answer those with INTERNAL and a traceback).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc

from serve_app.codecs import v2, v2_proto
from serve_app.deployments.reloads import RELOAD_TIMEOUT_S

from serve_app.errors import BadInput, ModelNotFoundError, PayloadTooLarge
from serve_app.grpc import open_inference_grpc_pb2 as pb
from serve_app.grpc.service import RPCS, SERVICE, UnreadableMessage
from serve_app.lifecycle import RequestRefused, RequestScope

# The lifecycle's HTTP statuses as gRPC status codes (https://grpc.io/docs/guides/status-codes/).
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                415: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
                504: grpc.StatusCode.DEADLINE_EXCEEDED}


def status_code(status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status: the table's, else INVALID_ARGUMENT for 4xx and
    INTERNAL for 5xx."""
    return STATUS_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL)


class GrpcCall:
    """One RPC (the lifecycle's ``Call``): metadata in, a message or a status out."""

    method = "GRPC"

    def __init__(self, context: Any, rpc: str, response_type: type):
        self._context, self._response_type = context, response_type
        self.path = f"/{SERVICE}/{rpc}"
        self._metadata: dict[str, str] | None = None

    def header(self, name: str) -> str | None:
        if self._metadata is None:
            self._metadata = {key: value for key, value in self._context.invocation_metadata()
                              if isinstance(value, str)}  # binary (-bin) metadata is never ours
        return self._metadata.get(name)

    def request_id(self) -> str | None:
        """The key the canary split sticks to: ``x-request-id`` as over HTTP, else Serve's own
        ``request_id`` metadata."""
        return self.header("x-request-id") or self.header("request_id")

    def status(self, reply: Any) -> int:
        return 200

    def success(self, reply: Any, version: str | None) -> Any:
        if version is not None:  # which version answered (canary, shadow), as X-Model-Version does
            self._context.set_trailing_metadata([("model-version", version)])
        return reply

    def failure(self, status: int, message: str, reason: str | None, retry_after_s: int | None = None) -> Any:
        self._context.set_code(status_code(status))
        self._context.set_details(message)
        trailers = [] if reason is None else [("reason", reason)]
        if retry_after_s is not None:  # gRPC's Retry-After: the server pushback of gRPC's retry design (A6)
            trailers.append(("grpc-retry-pushback-ms", str(retry_after_s * 1000)))
        if trailers:
            self._context.set_trailing_metadata(trailers)
        return self._response_type()


Work = Callable[[RequestScope, GrpcCall], Awaitable[None]]


class InferenceServicer:
    """The RPCs of ``inference.GRPCInferenceService`` (every one: Serve answers a missing
    method with an error of its own). The class using it supplies ``registry``,
    ``grpc_scope(call, name, **options)`` (a lifecycle scope with ``protocol="grpc"``),
    ``max_request_bytes`` and ``reload_everywhere(name)``."""

    async def _rpc(self, context: Any, rpc: str, request: Any, work: Work, name_field: str | None = None,
                   **options) -> Any:
        call = GrpcCall(context, rpc, RPCS[rpc][1])
        unreadable = isinstance(request, UnreadableMessage)
        name = "" if unreadable or name_field is None else getattr(request, name_field)
        try:
            async with self.grpc_scope(call, name, **options) as scope:
                if unreadable:
                    raise BadInput(f"the request is not a valid {request.type_name} message: {request.error}",
                                   "malformed_binary")
                await work(scope, call)
        except RequestRefused as refused:  # no valid token: the answer is ready
            return refused.response
        return scope.response

    # -- health and server metadata (no token: probes) ----------------------------------------
    async def ServerLive(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            scope.reply(pb.ServerLiveResponse(live=True))
        return await self._rpc(grpc_context, "ServerLive", request, work, public=True)

    async def ServerReady(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            scope.reply(pb.ServerReadyResponse(ready=True))
        return await self._rpc(grpc_context, "ServerReady", request, work, public=True)

    async def ServerMetadata(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            scope.reply(pb.ServerMetadataResponse(**v2.server_metadata()))
        return await self._rpc(grpc_context, "ServerMetadata", request, work, public=True)

    async def ModelReady(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            worker = await self.registry.for_metadata(request.name, request.version or None)
            scope.reply(pb.ModelReadyResponse(ready=True), worker.meta.version)
        return await self._rpc(grpc_context, "ModelReady", request, work, "name", public=True)

    # -- models ---------------------------------------------------------------------------------
    async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            worker = await self.registry.for_metadata(request.name, request.version or None)
            scope.reply(v2_proto.model_metadata(v2.model_metadata(worker.meta), pb.ModelMetadataResponse),
                        worker.meta.version)
        return await self._rpc(grpc_context, "ModelMetadata", request, work, "name")

    async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            name = request.model_name
            if request.ByteSize() > self.max_request_bytes:
                raise PayloadTooLarge(f"request of {request.ByteSize()} bytes is over the limit of "
                                      f"{self.max_request_bytes} bytes")
            worker = await self.registry.for_inference(name, request.model_version or None, call.request_id())
            decoded = v2.decode_request(v2_proto.decode_request(request), worker.meta, worker.accepts_missing)
            answer = await worker.infer(decoded.inputs, decoded.outputs)
            response = v2.encode_response(name, answer, decoded)
            scope.reply(v2_proto.encode_response(response, pb.ModelInferResponse, raw=bool(request.raw_input_contents)),
                        answer.version)
        return await self._rpc(grpc_context, "ModelInfer", request, work, "model_name")

    # -- the model repository extension -----------------------------------------------------------
    async def RepositoryIndex(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            entries = await self.registry.index()
            scope.reply(pb.RepositoryIndexResponse(models=[
                pb.RepositoryIndexResponse.ModelIndex(name=e["name"], version=e["version"], state=e["state"],
                                                      reason=e.get("reason") or "")
                for e in entries if not request.ready or e["state"] == "READY"]))
        return await self._rpc(grpc_context, "RepositoryIndex", request, work)

    async def RepositoryModelLoad(self, request: Any, grpc_context: Any) -> Any:
        async def work(scope, call):
            if not request.model_name:
                raise ModelNotFoundError("model_name is empty")
            await self.reload_everywhere(request.model_name)
            scope.reply(pb.RepositoryModelLoadResponse())
        return await self._rpc(grpc_context, "RepositoryModelLoad", request, work, "model_name",
                               timeout=RELOAD_TIMEOUT_S + 5)
