"""Train the demo models and publish them to the store (:func:`serve_app.publish`).

    python -m serve_app.tools.train [--store PATH|s3://...] [--model iris ...] [--version 2] [--if-missing]

Nothing is downloaded: the numeric demos use datasets that ship inside scikit-learn; the
mixed-type demos (``churn``, ``churn-xgb``) a deterministic synthetic customer table generated
here (:func:`churn_table`): string and category columns, integers, floats, booleans, missing
values, and string labels. Each model gets a held-out test split, its metrics are printed and
recorded in the metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
from sklearn import datasets, metrics
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import LabelEncoder, OneHotEncoder, StandardScaler
from xgboost import XGBClassifier

from serve_app.metadata import ModelMetadata
from serve_app.publishing import publish
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


# -- the mixed-type demos: a synthetic customer table ---------------------------------------------
CHURN_LABELS = ["leave", "stay"]
CHURN_TEXT_COLUMNS = ["plan", "region", "contract"]


def churn_table(rows: int = 4000, seed: int = 0):
    """Customers of a made-up subscription service and whether they ``leave`` or ``stay``:
    the kind of table a data scientist fits a pipeline on. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "standard", "premium"], rows, p=[0.5, 0.3, 0.2])
    contract = rng.choice(["month-to-month", "one-year", "two-year"], rows, p=[0.55, 0.25, 0.2])
    region = rng.choice(["north", "south", "east", "west"], rows).astype(object)
    region[rng.random(rows) < 0.03] = None                      # not recorded for some customers
    tenure = rng.integers(0, 73, rows)
    base = np.select([plan == "basic", plan == "standard"], [25.0, 55.0], 90.0)
    charges = np.round(base + rng.normal(0, 8, rows), 2)
    charges[rng.random(rows) < 0.02] = np.nan                   # a billing-system gap
    calls = rng.poisson(1.5, rows)
    paperless = rng.random(rows) < 0.6
    logit = (-1.0 + 1.4 * (contract == "month-to-month") - 0.9 * (contract == "two-year")
             - 0.035 * tenure + 0.35 * calls + 0.4 * paperless + 0.5 * (plan == "premium")
             + 0.3 * (region == "south"))
    leave = rng.random(rows) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame({"plan": plan, "region": region, "contract": contract, "tenure_months": tenure,
                          "monthly_charges": charges, "support_calls": calls, "paperless_billing": paperless})
    return frame, np.where(leave, "leave", "stay")


def _churn_pipeline(**params):
    text = make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore"))
    numbers = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
    prepare = ColumnTransformer([("text", text, CHURN_TEXT_COLUMNS),
                                 ("numbers", numbers, ["tenure_months", "monthly_charges", "support_calls"]),
                                 ("flags", "passthrough", ["paperless_billing"])])
    return Pipeline([("prepare", prepare), ("classify", LogisticRegression(max_iter=1000, **params))])


def _churn_xgboost(**params):
    defaults = dict(n_estimators=80, max_depth=4, learning_rate=0.15, n_jobs=1, enable_categorical=True,
                    tree_method="hist", max_cat_to_onehot=1)
    return XGBClassifier(**{**defaults, **params})


@dataclass(frozen=True)
class TableDemo:
    """A demo fitted on the customer table: category columns as pandas' category dtype for
    models that take them natively (XGBoost), plain strings for a ColumnTransformer."""

    framework: str
    make_estimator: Callable[..., Any]
    categories_as_dtype: bool
    description: str


TABLE_MODELS: dict[str, TableDemo] = {
    "churn": TableDemo("sklearn", _churn_pipeline, False,
                       "Whether a customer will leave or stay, from plan, region, contract, tenure, charges, "
                       "support calls and billing (ColumnTransformer: OneHotEncoder + StandardScaler; "
                       "LogisticRegression)."),
    "churn-xgb": TableDemo("xgboost", _churn_xgboost, True,
                           "Whether a customer will leave or stay (XGBClassifier with native categorical "
                           "columns)."),
}
DEFAULT_MODELS = ("iris", "breast-cancer", "diabetes", "churn", "churn-xgb")


def demo_names() -> list[str]:
    return [*DEMO_MODELS, *TABLE_MODELS]


def table_split(name: str, seed: int = 0):
    """The customer table's train/test split for demo ``name`` (DataFrames and labels)."""
    frame, labels = churn_table(seed=seed)
    if TABLE_MODELS[name].categories_as_dtype:
        frame = frame.astype({c: "category" for c in CHURN_TEXT_COLUMNS})
    X_train, X_test, y_train, y_test = train_test_split(frame, labels, test_size=0.25, random_state=seed,
                                                        stratify=labels)
    return DatasetSplit(X_train.reset_index(drop=True), X_test.reset_index(drop=True), y_train, y_test,
                        list(frame.columns))


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
    if name in TABLE_MODELS:
        return _train_table_model(name, store, version, seed, save_as, **params)
    spec = DEMO_MODELS[name]
    split = dataset_split(name, seed)
    X_train, X_test, y_train, y_test = split.X_train, split.X_test, split.y_train, split.y_test
    feature_names = split.feature_names
    estimator = spec.make_estimator(**params).fit(X_train, y_train)
    # publish() checks that the served model answers exactly as this one: the metrics below
    # are the served model's.
    return publish(estimator, save_as or name, pd.DataFrame(X_train, columns=feature_names), store=store,
                   version=str(version), metrics=_score(spec.task, y_test, estimator.predict(X_test)),
                   description=spec.description, replace=True)


def _train_table_model(name: str, store: ModelStore, version: str, seed: int, save_as: str | None,
                       **params: Any) -> ModelMetadata:
    spec = TABLE_MODELS[name]
    split = table_split(name, seed)
    if spec.framework == "xgboost":  # XGBoost learns class indexes: 0 is "leave", 1 "stay"
        estimator = spec.make_estimator(**params).fit(split.X_train, LabelEncoder().fit(CHURN_LABELS)
                                                      .transform(split.y_train))
        predicted = np.asarray(CHURN_LABELS)[estimator.predict(split.X_test)]
        classes = CHURN_LABELS
    else:
        estimator = spec.make_estimator(**params).fit(split.X_train, split.y_train)
        predicted, classes = estimator.predict(split.X_test), None
    return publish(estimator, save_as or name, split.X_train, store=store, version=str(version),
                   metrics=_score("classification", split.y_test, predicted), description=spec.description,
                   classes=classes, replace=True)


def ensure_models(store: ModelStore, names=DEFAULT_MODELS) -> list[ModelMetadata]:
    """Train whichever of ``names`` the store lacks (used by ``make serve`` and the app)."""
    present = store.list_models()
    return [train_model(n, store) for n in names if not present.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=DEFAULT_STORE, help="local path or s3://bucket/prefix")
    parser.add_argument("--model", action="append", choices=sorted(demo_names()),
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
