"""Wire formats, apart from transport: bytes/JSON in, numpy out, and back.

``tensors`` holds the validation shared by every protocol; ``v1`` is KServe's V1
(``instances``/``predictions``); ``v2`` is the Open Inference Protocol (KServe V2, Triton).
"""
