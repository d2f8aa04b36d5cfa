"""The same trained models, in the files the other servers load.

Our store keeps XGBoost models as UBJSON boosters and scikit-learn models as skops files.
MLServer's runtimes (and a hand-rolled FastAPI app) load XGBoost through its scikit-learn
wrapper (``model.json`` that records the estimator type, so mlserver-xgboost treats a
classifier as one) and scikit-learn through joblib. Both files are written here from the
estimator our own runtime loads, so every server predicts with identical trees and weights:
a mixed-type pipeline (the ``churn`` demo: a ColumnTransformer fitted on a DataFrame) too,
loaded from its skops artifact and dumped with joblib for MLServer's scikit-learn runtime.
Each model folder also gets MLServer's ``model-settings.json`` (adaptive batching on, with
the batch size and wait our shipped config uses; ``content_type: "pd"`` for a model fitted
on a DataFrame, so MLServer's PandasCodec decodes its requests).
"""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import xgboost as xgb

from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

MLSERVER_RUNTIMES = {"xgboost": "mlserver_xgboost.XGBoostModel", "sklearn": "mlserver_sklearn.SKLearnModel"}


def export_model(store: ModelStore, name: str, out: Path, max_batch_size: int, max_batch_time_s: float) -> Path:
    runtime = load_runtime(store, name)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    if runtime.meta.framework == "xgboost":
        wrapper = xgb.XGBClassifier() if runtime.meta.is_classifier else xgb.XGBRegressor()
        wrapper.load_model(bytearray(runtime.model.save_raw(raw_format="ubj")))
        artifact = "model.json"
        wrapper.save_model(folder / artifact)
    else:
        artifact = "model.joblib"
        joblib.dump(runtime.model, folder / artifact)
    settings = {"name": name, "implementation": MLSERVER_RUNTIMES[runtime.meta.framework],
                "max_batch_size": max_batch_size, "max_batch_time": max_batch_time_s,
                "parameters": {"uri": f"./{artifact}", "version": runtime.meta.version}}
    if runtime.meta.is_tabular:
        # A model fitted on a DataFrame: MLServer's PandasCodec builds one from the request's
        # per-column tensors (the request says so too; the model default also holds for a
        # batch its adaptive batcher merged).
        settings["parameters"]["content_type"] = "pd"
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))
    return folder


def load_exported(folder: Path):
    """An exported model the way a user's own server loads it (the FastAPI and naive Ray apps)."""
    if (folder / "model.json").exists():
        for estimator in (xgb.XGBClassifier, xgb.XGBRegressor):  # the file records which it is
            try:
                model = estimator()
                model.load_model(folder / "model.json")
                return model
            except TypeError:
                continue
    return joblib.load(folder / "model.joblib")
