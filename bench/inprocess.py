"""The limits: what the model does with no server at all, and what each codec costs.

``predict_rate`` calls the model the way our replica does (same runtime, same artifact, one
thread; a DataFrame for a mixed-type model) on the workload's rows in a loop: requests/s at 1 row, rows/s at 1000 rows are the
ceilings any server can only approach. ``codec_costs`` times request decoding alone:
stdlib ``json`` against orjson, JSON against the binary formats; ``table_codec_costs`` the
same for a mixed-type table's per-column body: ours (schema checks, typed columns, the frame)
against the careful FastAPI app's ``pandas.DataFrame`` of the JSON lists, beside the model's
own call on the frame.
"""

from __future__ import annotations

import io
import json
import time
from typing import Callable

import numpy as np
import orjson

from bench.workloads import features, npy, table_rows, v2_binary, v2_columns, v2_json
from serve_app.codecs import binary, v2
from serve_app.runtimes import accepts_missing, load_runtime
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
    # a mixed-type model predicts on the DataFrame our runtime builds from the typed columns
    X = runtime.prepare(_columns(table_rows(model, rows))) if runtime.meta.is_tabular else features(model, rows)
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


def table_codec_costs(store: ModelStore, model: str, rows_list=(1, 1000), seconds: float = 1.0) -> dict:
    """Microseconds per request, for each row count: a per-column V2 JSON body to the frame the
    model predicts on, our way and a hand-written server's, and the pipeline's predict on it."""
    import pandas as pd

    meta, runtime = store.read_metadata(model), load_runtime(store, model)
    missing = accepts_missing(meta)
    costs = {}
    for rows in rows_list:
        body = v2_columns(model, table_rows(model, rows)).body
        frame = runtime.prepare(_columns(table_rows(model, rows)))
        costs[str(rows)] = {name: 1e6 / _rate(way, seconds) for name, way in {
            "ours: orjson + schema checks + typed columns (v2.decode_request)":
                lambda: v2.decode_request(orjson.loads(body), meta, missing),
            "ours: the same + the model call's DataFrame (runtime.prepare)":
                lambda: runtime.prepare(v2.decode_request(orjson.loads(body), meta, missing).inputs.data),
            "careful FastAPI: orjson + pandas.DataFrame(columns)":
                lambda: pd.DataFrame({t["name"]: t["data"] for t in orjson.loads(body)["inputs"]}),
            "the pipeline's predict on the frame": lambda: runtime.predict(frame),
        }.items()}
    return costs


def _columns(frame) -> dict[str, np.ndarray]:
    """A frame as the typed columns our codec hands the runtime."""
    return {name: frame[name].to_numpy() for name in frame.columns}


def _per_element(body: dict) -> np.ndarray:
    """How a codec looks with a Python loop over the values (what ours avoids)."""
    tensor = body["inputs"][0]
    values = [float(v) for v in tensor["data"]]
    return np.array(values, dtype=np.float64).reshape(tensor["shape"])
