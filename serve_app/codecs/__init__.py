"""Wire formats, apart from transport: bytes/JSON in, a ModelInput out, and an Answer back.

``tensors`` holds the validation shared by every protocol; ``binary`` reads the binary V2
bodies; ``v1`` is KServe's V1 (``instances``/``predictions``); ``v2`` is the Open Inference
Protocol (KServe V2, Triton).
"""
