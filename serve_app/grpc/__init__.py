"""gRPC: the Open Inference Protocol's ``inference.GRPCInferenceService`` (``servicer.py``) and
its protocol buffers (``open_inference_grpc.proto`` and the modules generated from it by
``make grpc-stubs``)."""
