"""What the benchmark sends: workloads (model, rows per request, JSON or binary) and the
request each server's protocol makes of them.

Every server gets the same rows of the same dataset; only the envelope differs:
- ``v2_json``: Open Inference Protocol JSON (ours, MLServer);
- ``v2_binary``: the V2 binary tensor extension (ours; serve_app/codecs/binary.py);
- ``npy``: a ``.npy`` body (ours, and the FastAPI baseline's own endpoint);
- ``instances``: ``{"instances": [[...]]}``, what a hand-rolled server takes (FastAPI, naive Ray).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import orjson
from sklearn.datasets import load_breast_cancer, load_iris

DATASETS = {"breast-cancer": load_breast_cancer, "iris": load_iris}


@dataclass(frozen=True)
class Workload:
    key: str
    model: str
    rows: int
    binary: bool
    title: str


WORKLOADS = {w.key: w for w in (
    Workload("xgb-1", "breast-cancer", 1, False, "XGBoost (breast-cancer), 1 row, JSON"),
    Workload("sklearn-1", "iris", 1, False, "scikit-learn pipeline (iris), 1 row, JSON"),
    Workload("xgb-1000-json", "breast-cancer", 1000, False, "XGBoost, 1000 rows, JSON"),
    Workload("xgb-1000-binary", "breast-cancer", 1000, True, "XGBoost, 1000 rows, binary"),
)}


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def features(model: str, rows: int) -> np.ndarray:
    """``rows`` real rows of the model's dataset (repeated past its end), float64."""
    data = DATASETS[model]().data.astype(np.float64)
    return np.ascontiguousarray(np.resize(data, (rows, data.shape[1])))


def v2_json(model: str, X: np.ndarray) -> Request:
    body = {"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64", "data": X.ravel().tolist()}]}
    return Request(f"/v2/models/{model}/infer", orjson.dumps(body), {"Content-Type": "application/json"})


def v2_binary(model: str, X: np.ndarray) -> Request:
    raw = X.astype("<f8").tobytes()
    header = orjson.dumps({"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64",
                                       "parameters": {"binary_data_size": len(raw)}}]})
    return Request(f"/v2/models/{model}/infer", header + raw,
                   {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})


def npy(path: str, X: np.ndarray) -> Request:
    buffer = io.BytesIO()
    np.save(buffer, X)
    return Request(path, buffer.getvalue(), {"Content-Type": "application/x-npy"})


def instances(path: str, X: np.ndarray) -> Request:
    return Request(path, orjson.dumps({"instances": X.tolist()}), {"Content-Type": "application/json"})
