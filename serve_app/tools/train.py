"""Train the demo models on scikit-learn's bundled datasets and write them to the store.

    python -m serve_app.tools.train [--store PATH|s3://...] [--model iris ...] [--version 2] [--if-missing]

Nothing is downloaded: every dataset ships inside scikit-learn. Each model gets a held-out
test split, its metrics are printed and recorded in the metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from sklearn import datasets, metrics
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from serve_app.metadata import Feature, ModelMetadata, reference_statistics
from serve_app.runtimes import runtime_for
from serve_app.store import DEFAULT_STORE, ModelStore


def _xgb_classifier(**params):
    defaults = dict(n_estimators=60, max_depth=3, learning_rate=0.2, n_jobs=1)
    return XGBClassifier(**{**defaults, **params})


def _iris_pipeline(**params):
    return Pipeline(
        [("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500, **params))]
    )


def _diabetes_pipeline(**params):
    return Pipeline([("scale", StandardScaler()), ("reg", Ridge(**{"alpha": 1.0, **params}))])


@dataclass(frozen=True)
class DemoModel:
    loader: Callable[..., Any]
    framework: str
    task: str
    make_estimator: Callable[..., Any]
    description: str


DEMO_MODELS: dict[str, DemoModel] = {
    "iris": DemoModel(datasets.load_iris, "sklearn", "classification", _iris_pipeline,
                      "Iris species from four flower measurements (StandardScaler + LogisticRegression)."),
    "breast-cancer": DemoModel(datasets.load_breast_cancer, "xgboost", "classification", _xgb_classifier,
                               "Malignant (0) or benign (1) from 30 cell-nucleus features (XGBClassifier)."),
    "diabetes": DemoModel(datasets.load_diabetes, "sklearn", "regression", _diabetes_pipeline,
                          "Disease progression one year after baseline (StandardScaler + Ridge)."),
    "wine": DemoModel(datasets.load_wine, "xgboost", "classification", _xgb_classifier,
                      "Wine cultivar from 13 chemical measurements (XGBClassifier, 3 classes)."),
}
DEFAULT_MODELS = ("iris", "breast-cancer", "diabetes")


def _score(task: str, y_true, y_pred) -> dict[str, float]:
    if task == "classification":
        return {
            "accuracy": round(float(metrics.accuracy_score(y_true, y_pred)), 4),
            "f1_macro": round(float(metrics.f1_score(y_true, y_pred, average="macro")), 4),
        }
    return {
        "r2": round(float(metrics.r2_score(y_true, y_pred)), 4),
        "rmse": round(float(np.sqrt(metrics.mean_squared_error(y_true, y_pred))), 4),
    }


@dataclass(frozen=True)
class DatasetSplit:
    """A demo model's bundled dataset, split into training rows and held-out test rows."""

    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]


def dataset_split(name: str, seed: int = 0) -> DatasetSplit:
    """The split :func:`train_model` fits and scores demo model ``name`` on, for ``seed``.

    Public so that a notebook or test can query a served model with exactly the held-out
    rows its recorded metrics were computed on, and compare served predictions with truth.
    """
    spec = DEMO_MODELS[name]
    data = spec.loader()
    X = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target)
    feature_names = [str(f).replace(" ", "_").replace("(", "").replace(")", "") for f in data.feature_names]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=seed,
        stratify=y if spec.task == "classification" else None,
    )
    return DatasetSplit(X_train, X_test, y_train, y_test, feature_names)


def train_model(
    name: str, store: ModelStore, version: str = "1", seed: int = 0, save_as: str | None = None,
    **params: Any
) -> ModelMetadata:
    """Fit demo model ``name`` (estimator overrides in ``params``) and save it as ``version``
    of ``save_as`` (default: ``name``; say, many variants of one dataset's model)."""
    spec = DEMO_MODELS[name]
    split = dataset_split(name, seed)
    X_train, X_test, y_train, y_test = split.X_train, split.X_test, split.y_train, split.y_test
    feature_names = split.feature_names
    estimator = spec.make_estimator(**params).fit(X_train, y_train)
    runtime_cls = runtime_for(spec.framework)
    metadata = ModelMetadata(
        name=save_as or name,
        version=str(version),
        framework=spec.framework,
        task=spec.task,
        features=[Feature(f, "float64") for f in feature_names],
        classes=np.unique(np.concatenate([y_train, y_test])).tolist() if spec.task == "classification" else None,
        artifact=runtime_cls.artifact_name,
        sha256="",
        description=spec.description,
        reference_stats=reference_statistics(X_train, feature_names),
    )
    # Score through the runtime that will serve it, so the recorded metrics are the served model's.
    artifact = runtime_cls.serialize(estimator)
    served = runtime_cls.load(artifact, metadata)
    metadata.metrics = _score(spec.task, y_test, served.predict(X_test))
    return store.save(metadata, artifact)


def ensure_models(store: ModelStore, names=DEFAULT_MODELS) -> list[ModelMetadata]:
    """Train whichever of ``names`` the store lacks (used by ``make serve`` and the app)."""
    present = store.list_models()
    return [train_model(n, store) for n in names if not present.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=DEFAULT_STORE, help="local path or s3://bucket/prefix")
    parser.add_argument("--model", action="append", choices=sorted(DEMO_MODELS),
                        help=f"model(s) to train (default: {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--version", default="1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                        help="estimator parameter override, e.g. --param max_depth=5")
    parser.add_argument("--if-missing", action="store_true",
                        help="only train models that have no version in the store yet")
    args = parser.parse_args(argv)
    store = ModelStore(args.store)
    names = args.model or list(DEFAULT_MODELS)
    params = {k: json.loads(v) for k, _, v in (p.partition("=") for p in args.param)}
    if args.if_missing:
        trained = ensure_models(store, names)
    else:
        trained = [train_model(n, store, args.version, args.seed, **params) for n in names]
    for meta in trained:
        print(f"{meta.name} v{meta.version} ({meta.framework}, {meta.task}): "
              f"{json.dumps(meta.metrics)} -> {store.backend}/{meta.name}/{meta.version}")
    if not trained:
        print(f"store {store.backend} already holds {', '.join(names)}; nothing trained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
