"""gRPC: the Open Inference Protocol's ``inference.GRPCInferenceService`` (``servicer.py``; its
registration with a proxy's server, light to import, in ``service.py``) and
its protocol buffers (``open_inference_grpc.proto`` and the modules generated from it by
``make grpc-stubs``)."""
