"""The hand-rolled baseline: one FastAPI app, one uvicorn process, the model called inline,
no batching, pydantic validation, stdlib JSON (FastAPI's default response). What a user writes
in an afternoon, and the bar every serving stack has to clear.

    BENCH_MODEL_DIR=/path/to/export uvicorn bench.servers.fastapi_baseline:app --port 8000

Reads the same artifacts the other servers get (bench/mlserver_export.py writes them from our
store): ``<model>/model.json`` (XGBoost) or ``<model>/model.joblib`` (scikit-learn).
``POST /predict/<model>`` takes ``{"instances": [[...], ...]}`` (JSON) or a ``.npy`` body
(``application/x-npy``) and answers ``{"predictions": [...]}``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel

from bench.model_export import load_exported

MODEL_DIR = Path(os.environ.get("BENCH_MODEL_DIR", "bench/results/models"))
models = {p.name: load_exported(p) for p in MODEL_DIR.iterdir() if p.is_dir()}
app = FastAPI()


class Instances(BaseModel):
    instances: list[list[float]]


@app.post("/predict/{name}")
def predict(name: str, body: Instances):
    return {"predictions": models[name].predict(np.array(body.instances)).tolist()}


@app.post("/predict_npy/{name}")
async def predict_npy(name: str, request: Request):
    X = np.load(io.BytesIO(await request.body()), allow_pickle=False)
    return {"predictions": models[name].predict(X).tolist()}
