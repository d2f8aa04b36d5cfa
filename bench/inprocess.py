"""The limits: what the model does with no server at all, and what each codec costs.

``predict_rate`` calls the model the way our replica does (same runtime, same artifact, one
thread) on the workload's rows in a loop: requests/s at 1 row, rows/s at 1000 rows are the
ceilings any server can only approach. ``codec_costs`` times request decoding alone:
stdlib ``json`` against orjson, JSON against the binary formats.
"""

from __future__ import annotations

import io
import json
import time
from typing import Callable

import numpy as np
import orjson

from bench.workloads import features, npy, v2_binary, v2_json
from serve_app.codecs import binary, v2
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore


def _rate(call: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``call``, over at least ``seconds``."""
    call()  # first call pays one-time costs
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(10):
            call()
        n += 10
    return n / elapsed


def predict_rate(store: ModelStore, model: str, rows: int, seconds: float = 2.0) -> dict:
    runtime = load_runtime(store, model)
    X = features(model, rows)
    calls = _rate(lambda: runtime.predict(X), seconds)
    return {"model": model, "rows": rows, "calls_per_s": calls, "rows_per_s": calls * rows}


def codec_costs(store: ModelStore, model: str, rows: int, seconds: float = 1.0) -> dict[str, float]:
    """Microseconds to turn one request body into the feature matrix, per way of sending it."""
    meta = store.read_metadata(model)
    X = features(model, rows)
    json_body, binary_req, npy_req = v2_json(model, X).body, v2_binary(model, X), npy("", X)
    length = binary_req.headers["Inference-Header-Content-Length"]
    ways = {
        "V2 JSON, stdlib json": lambda: v2.decode_request(json.loads(json_body), meta, True),
        "V2 JSON, orjson": lambda: v2.decode_request(orjson.loads(json_body), meta, True),
        "V2 JSON, orjson, per-element Python loop": lambda: _per_element(orjson.loads(json_body)),
        "V2 binary tensor extension": lambda: v2.decode_request(
            binary.decode_body(binary_req.body, "", length), meta, True),
        "application/x-npy": lambda: v2.decode_request(
            binary.decode_body(npy_req.body, binary.NPY_MEDIA_TYPE, None), meta, True),
        "np.load (reference)": lambda: np.load(io.BytesIO(npy_req.body)),
    }
    return {name: 1e6 / _rate(way, seconds) for name, way in ways.items()}


def _per_element(body: dict) -> np.ndarray:
    """How a codec looks with a Python loop over the values (what ours avoids)."""
    tensor = body["inputs"][0]
    values = [float(v) for v in tensor["data"]]
    return np.array(values, dtype=np.float64).reshape(tensor["shape"])
