"""The committed gRPC modules are what grpcio-tools makes of the committed .proto today, and
the .proto is the Open Inference Protocol's with the repository RPCs Triton's clients call."""

from __future__ import annotations

from serve_app.grpc import open_inference_grpc_pb2 as pb
from serve_app.tools import grpc_stubs


def test_the_committed_modules_are_current():
    assert grpc_stubs.main(["--check"]) == 0, "run `make grpc-stubs` and commit the result"


def test_the_service_has_the_protocols_rpcs_and_the_repository_extensions():
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad"]


def test_messages_read_tritons_bytes_and_live_beside_its_client():
    """Triton's client compiles the same names into protobuf's default pool: importing both in
    one process works (our messages have a pool of their own), and each reads the other's bytes."""
    from tritonclient.grpc import service_pb2 as triton

    ours = pb.ModelInferRequest(model_name="iris", model_version="2", raw_input_contents=[b"\x00" * 8])
    ours.inputs.add(name="input-0", datatype="FP64", shape=[1, 1])
    theirs = triton.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.model_version, list(theirs.inputs[0].shape)) == ("iris", "2", [1, 1])
    index = triton.RepositoryIndexResponse(models=[triton.RepositoryIndexResponse.ModelIndex(
        name="iris", version="1", state="READY", reason="")])
    assert pb.RepositoryIndexResponse.FromString(index.SerializeToString()).models[0].name == "iris"
    load = triton.RepositoryModelLoadRequest(model_name="iris")
    assert pb.RepositoryModelLoadRequest.FromString(load.SerializeToString()).model_name == "iris"
