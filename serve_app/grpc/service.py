"""The gRPC service's registration: what Serve's ``grpc_servicer_functions`` names.

Every Serve proxy imports this module to register the service, the head's fallback proxy too,
which KubeRay's head restart starts anew while Serve's readiness check gives it 5 s: so it
imports gRPC and the generated messages only, never the codecs, runtimes or frameworks of
:mod:`serve_app.grpc.servicer` (seconds of imports).
"""

from __future__ import annotations

from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from serve_app.grpc import open_inference_grpc_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


class UnreadableMessage:
    """What a request's bytes became when they are no valid message of the RPC's request type.

    gRPC's server would answer a deserializer's exception with UNKNOWN before any code of
    ours runs; this stands in for the message instead, and the RPC refuses it with
    INVALID_ARGUMENT naming the problem (it crosses Ray's handles, so it pickles)."""

    def __init__(self, type_name: str, error: str):
        self.type_name, self.error = type_name, error


def _reader(message_type: type) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return UnreadableMessage(message_type.DESCRIPTOR.full_name, str(exc))
    return read


# Every RPC of the service: its request and response messages.
RPCS = {"ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
        "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse)}


def add_inference_service_to_server(servicer: Any, server: Any) -> None:
    """The service's handlers (``grpc_servicer_functions`` in the Serve config): the generated
    ``add_GRPCInferenceServiceServicer_to_server``, but with request readers that never raise
    (:class:`UnreadableMessage`)."""
    handlers = {rpc: grpc.unary_unary_rpc_method_handler(getattr(servicer, rpc), request_deserializer=_reader(request),
                                                         response_serializer=response.SerializeToString)
                for rpc, (request, response) in RPCS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
