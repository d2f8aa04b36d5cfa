"""What the benchmark sends: workloads (model, rows per request, JSON or binary) and the
request each server's protocol makes of them.

Every server gets the same rows of the same dataset; only the envelope differs:
- ``v2_json``: Open Inference Protocol JSON (ours, MLServer);
- ``v2_columns``: the mixed-type table as V2 JSON, one tensor per column (strings as BYTES,
  INT64, FP64, BOOL, shape [N]) and ``"parameters": {"content_type": "pd"}``: what MLServer's
  and KServe's pandas codecs send and take (ours, MLServer, the FastAPI apps);
- ``v2_binary``: the V2 binary tensor extension (ours; serve_app/codecs/binary.py);
- ``npy``: a ``.npy`` body (ours, and the FastAPI baseline's own endpoint);
- ``instances``: ``{"instances": [[...]]}``, what a hand-rolled server takes (FastAPI, naive Ray).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import orjson
import pandas as pd
from sklearn.datasets import load_breast_cancer, load_iris

DATASETS = {"breast-cancer": load_breast_cancer, "iris": load_iris}


@dataclass(frozen=True)
class Workload:
    key: str
    model: str
    rows: int
    binary: bool
    title: str
    table: bool = False  # a mixed-type table (v2_columns), not a numeric matrix
    grpc: bool = False  # the Open Inference Protocol's ModelInfer over gRPC (raw contents)


WORKLOADS = {w.key: w for w in (
    Workload("xgb-1", "breast-cancer", 1, False, "XGBoost (breast-cancer), 1 row, JSON"),
    Workload("sklearn-1", "iris", 1, False, "scikit-learn pipeline (iris), 1 row, JSON"),
    Workload("xgb-1000-json", "breast-cancer", 1000, False, "XGBoost, 1000 rows, JSON"),
    Workload("xgb-1000-binary", "breast-cancer", 1000, True, "XGBoost, 1000 rows, binary"),
    Workload("churn-1", "churn", 1, False, "mixed-type ColumnTransformer pipeline (churn), 1 row, "
             "V2 columns JSON", table=True),
    Workload("churn-1000", "churn", 1000, False, "mixed-type ColumnTransformer pipeline (churn), 1000 rows, "
             "V2 columns JSON", table=True),
    Workload("grpc-1", "breast-cancer", 1, True, "XGBoost (breast-cancer), 1 row, gRPC ModelInfer (raw contents)",
             grpc=True),
    Workload("grpc-1000", "breast-cancer", 1000, True, "XGBoost, 1000 rows, gRPC ModelInfer (raw contents)",
             grpc=True),
)}
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    expected: tuple | None = None  # the labels a correct answer's "predict" output holds


def answered_labels(answer: dict) -> list:
    """The ``predict`` output of a V2 answer (ours, MLServer's, the FastAPI apps')."""
    outputs = answer["outputs"]
    tensor = next((o for o in outputs if o["name"] == "predict"), outputs[0])
    return [v.decode() if isinstance(v, bytes) else v for v in tensor["data"]]


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


def grpc_infer(model: str, X: np.ndarray) -> Request:
    """A ModelInfer call as tritonclient.grpc sends it (raw_input_contents), framed for the wire
    (a 0 compression flag, the 4-byte big-endian length, the message): what h2load posts."""
    from serve_app.grpc import open_inference_grpc_pb2 as pb  # only gRPC cells need the messages

    message = pb.ModelInferRequest(model_name=model, raw_input_contents=[X.astype("<f8").tobytes()])
    message.inputs.add(name="input-0", datatype="FP64", shape=list(X.shape))
    payload = message.SerializeToString()
    return Request(GRPC_INFER, b"\x00" + len(payload).to_bytes(4, "big") + payload,
                   {"content-type": "application/grpc", "te": "trailers"})


def grpc_labels(request: Request, target: str) -> list:
    """The ``predict`` output of one real gRPC call of ``request`` (a check before a cell: h2load
    counts HTTP statuses, and a gRPC error travels in an HTTP 200's trailers)."""
    import grpc  # only gRPC cells need a client

    from serve_app.grpc import open_inference_grpc_pb2 as pb

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(GRPC_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        answer = call(pb.ModelInferRequest.FromString(request.body[5:]), timeout=60)
    index = next(i for i, o in enumerate(answer.outputs) if o.name == "predict")
    output = answer.outputs[index]
    if answer.raw_output_contents:
        dtype = {"INT64": "<i8", "FP64": "<f8", "FP32": "<f4", "INT32": "<i4"}[output.datatype]
        return np.frombuffer(answer.raw_output_contents[index], dtype).tolist()
    return list(output.contents.int64_contents or output.contents.fp64_contents or output.contents.fp32_contents)


def npy(path: str, X: np.ndarray) -> Request:
    buffer = io.BytesIO()
    np.save(buffer, X)
    return Request(path, buffer.getvalue(), {"Content-Type": "application/x-npy"})


def instances(path: str, X: np.ndarray) -> Request:
    return Request(path, orjson.dumps({"instances": X.tolist()}), {"Content-Type": "application/json"})


def table_rows(model: str, rows: int) -> pd.DataFrame:
    """``rows`` held-out rows of a mixed-type demo's table (repeated past its end), without
    missing values: a JSON body has no NaN, and tritonclient no null BYTES element."""
    from serve_app.tools.train import table_split

    test = table_split(model).X_test.dropna().reset_index(drop=True)
    return test.iloc[np.arange(rows) % len(test)].reset_index(drop=True)


def _v2_datatype(column: pd.Series) -> tuple[str, list]:
    if pd.api.types.is_bool_dtype(column):
        return "BOOL", column.astype(bool).tolist()
    if pd.api.types.is_integer_dtype(column):
        return "INT64", column.astype(np.int64).tolist()
    if pd.api.types.is_float_dtype(column):
        return "FP64", column.astype(np.float64).tolist()
    return "BYTES", column.astype(str).tolist()


def v2_columns(model: str, frame: pd.DataFrame, expected=None) -> Request:
    """One V2 tensor per column (shape [N]) and the request-level ``content_type: "pd"`` that
    tells MLServer's and KServe's servers to decode the request with their pandas codec."""
    inputs = []
    for name in frame.columns:
        datatype, data = _v2_datatype(frame[name])
        inputs.append({"name": name, "shape": [len(frame)], "datatype": datatype, "data": data})
    body = {"parameters": {"content_type": "pd"}, "inputs": inputs}
    return Request(f"/v2/models/{model}/infer", orjson.dumps(body), {"Content-Type": "application/json"},
                   None if expected is None else tuple(expected))
