"""The fair baseline: the FastAPI app a careful engineer writes for these models in half an hour.

``async def`` routes (no thread-pool hop), ``await request.json()`` and ``numpy.asarray`` (no
pydantic model of a list of lists), XGBoost through ``Booster.inplace_predict`` with one
thread (no DMatrix, no scikit-learn wrapper), scikit-learn through the pipeline's own
``predict``, the same V2 request body and V2 answer as ours, and a ``.npy`` route for large
binary requests. A mixed-type table (one V2 tensor per column, ``"content_type": "pd"``)
becomes ``pandas.DataFrame({name: data})`` for the pipeline's ``predict``: no schema check,
no dtype cast beyond what pandas infers from the JSON values. One model thread per process: scale with processes, as uvicorn's and
XGBoost's docs advise.

Served two ways from this one module, so both run identical user code:

- by uvicorn, with ``--workers N`` (``bench/launch.py:fastapi_server``)::

      BENCH_MODEL_DIR=/path/to/export uvicorn bench.servers.careful_fastapi:app --workers 2

- by Ray Serve as the minimal reference app (``deployment``): the floor Serve itself sets,
  one FastAPI ingress with this route, on the same HAProxy fast path as ours.

Reads the exported artifacts (``bench/model_export.py``): ``<model>/model.json`` (XGBoost) or
``<model>/model.joblib`` (scikit-learn), the same trees and weights as our store's.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import joblib
import numpy as np
import orjson
import pandas as pd
import xgboost as xgb
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


class Model:
    """One exported model: its predict, returning class labels for classifiers."""

    def __init__(self, folder: Path):
        if (folder / "model.json").exists():
            self.booster = xgb.Booster(model_file=str(folder / "model.json"))
            self.booster.set_param({"nthread": 1})
            learner = json.loads(self.booster.save_config())["learner"]
            self.classifier = learner["objective"]["name"].startswith(("binary:", "multi:"))
            self.sklearn = None
        else:
            self.booster, self.sklearn = None, joblib.load(folder / "model.joblib")

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.sklearn is not None:
            return self.sklearn.predict(X)
        raw = self.booster.inplace_predict(X, validate_features=False)
        if not self.classifier:
            return raw
        return (raw > 0.5).astype(np.int64) if raw.ndim == 1 else raw.argmax(axis=1)


def load_models(model_dir: Path) -> dict[str, Model]:
    return {p.name: Model(p) for p in sorted(model_dir.iterdir()) if p.is_dir()}


def v2_answer(name: str, predictions: np.ndarray) -> Response:
    datatype = {"f": "FP64", "i": "INT64", "u": "INT64", "b": "BOOL"}.get(predictions.dtype.kind, "BYTES")
    body = {"model_name": name, "outputs": [{"name": "predict", "shape": [len(predictions)],
                                             "datatype": datatype, "data": predictions.tolist()}]}
    return Response(orjson.dumps(body), media_type="application/json")


def create_app(models: dict[str, Model]) -> FastAPI:
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        model = models.get(name)
        if model is None:
            return JSONResponse({"error": f"no model {name!r}"}, status_code=404)
        body = await request.json()
        if (body.get("parameters") or {}).get("content_type") == "pd":  # one tensor per column
            frame = pd.DataFrame({tensor["name"]: tensor["data"] for tensor in body["inputs"]})
            return v2_answer(name, model.predict(frame))
        tensor = body["inputs"][0]
        X = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])
        return v2_answer(name, model.predict(X))

    @app.post("/predict_npy/{name}")
    async def predict_npy(name: str, request: Request) -> Response:
        X = np.load(io.BytesIO(await request.body()), allow_pickle=False)
        return v2_answer(name, models[name].predict(X))

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


# uvicorn's import string: the models of $BENCH_MODEL_DIR, loaded once per worker process.
if "BENCH_MODEL_DIR" in os.environ:
    app = create_app(load_models(Path(os.environ["BENCH_MODEL_DIR"])))


def deployment(args: dict[str, str]):
    """The minimal Serve reference app (``serve run`` import path, ``args: {model_dir: ...}``):
    this module's FastAPI app as the ingress of one deployment, nothing else."""
    from ray import serve

    model_dir = Path(args["model_dir"])

    @serve.deployment(name="MinimalServe")
    @serve.ingress(lambda: create_app(load_models(model_dir)))
    class MinimalServe:
        pass

    return MinimalServe.bind()
