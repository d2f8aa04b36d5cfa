"""``publish()``: what it infers from a model and its training rows, which form the server
will predict on, and what it refuses to publish (naming why)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serve_app import PublishError, publish
from serve_app.runtimes import load_runtime, runtime_for
from serve_app.store import ModelStore
from serve_app.tools.train import table_split


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(str(tmp_path))


def iris_frame():
    data = load_iris(as_frame=True)
    return data.data, data.target


def test_versions_are_numbered_and_the_store_defaults_to_the_environment(tmp_path, monkeypatch):
    X, y = iris_frame()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    monkeypatch.setenv("SERVE_APP_STORE", str(tmp_path / "from-env"))
    assert [publish(model, "iris", X).version for _ in range(2)] == ["1", "2"]
    assert publish(model, "iris", X, version="7", metrics={"accuracy": 1.0}).metrics == {"accuracy": 1.0}
    assert ModelStore(str(tmp_path / "from-env")).versions("iris") == ["1", "2", "7"]
    assert publish(model, "iris", X).version == "8"


def test_an_all_numeric_model_is_served_the_matrix(store):
    X, y = iris_frame()
    meta = publish(make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y), "iris", X, store=store)
    assert meta.input_form == "matrix" and meta.feature_names == list(X.columns)
    assert [f.dtype for f in meta.features] == ["float64"] * 4 and meta.classes == [0, 1, 2]
    array = publish(Ridge().fit(load_diabetes().data, load_diabetes().target), "d", load_diabetes().data, store=store)
    assert array.input_form == "matrix" and array.feature_names[:2] == ["x0", "x1"] and array.task == "regression"


def test_columns_selected_by_name_need_a_frame_even_when_numeric(store):
    X, y = iris_frame()
    by_name = ColumnTransformer([("scale", StandardScaler(), ["sepal length (cm)", "petal width (cm)"])])
    model = make_pipeline(by_name, LogisticRegression(max_iter=500)).fit(X, y)
    assert publish(model, "named", X, store=store).input_form == "frame"


def test_a_booster_and_string_labels_for_xgboost(store):
    split = table_split("churn-xgb")
    labels = np.array(["leave", "stay"])
    model = xgb.XGBClassifier(n_estimators=5, enable_categorical=True, tree_method="hist").fit(
        split.X_train, np.searchsorted(labels, split.y_train))
    meta = publish(model.get_booster(), "booster", split.X_train, store=store, classes=labels)
    assert (meta.framework, meta.task, meta.classes) == ("xgboost", "classification", ["leave", "stay"])
    assert {f.name: f.dtype for f in meta.features}["plan"] == "category"
    with pytest.raises(PublishError, match="the model has 2 classes, classes= names 3"):
        publish(model, "booster", split.X_train, store=store, classes=["a", "b", "c"])


class Doubler(BaseEstimator, TransformerMixin):
    """A user's own transformer: code skops cannot vouch for."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) * 2


def test_an_untrusted_type_is_refused_with_its_name_and_how_to_allow_it(store):
    X, y = iris_frame()
    model = make_pipeline(Doubler(), LogisticRegression(max_iter=500)).fit(X, y)
    with pytest.raises(PublishError) as refused:
        publish(model, "custom", X, store=store)
    assert "test_publish.Doubler" in str(refused.value) and "SERVE_APP_SKOPS_TRUSTED_TYPES" in str(refused.value)
    assert store.versions("custom") == []


def test_a_served_model_that_would_answer_differently_is_not_published(store, monkeypatch):
    """The check itself: an artifact that does not hold the model in memory (here a serialiser
    that stores another fit) is refused, naming the output and a row that differs."""
    X, y = iris_frame()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    other = make_pipeline(StandardScaler(), LogisticRegression(C=0.001, max_iter=500)).fit(X, y)
    runtime = runtime_for("sklearn")
    real = runtime.serialize
    monkeypatch.setattr(runtime, "serialize", classmethod(lambda cls, _: real(other)))
    with pytest.raises(PublishError, match=r"predict(_proba)? differs.*row \d+: served"):
        publish(model, "drifted", X, store=store)
    assert store.versions("drifted") == []


@pytest.mark.parametrize("make, sample, message", [
    (lambda: LogisticRegression(), lambda: iris_frame()[0], "not fitted"),
    (lambda: Ridge().fit(*iris_frame()), lambda: iris_frame()[0].drop(columns=["sepal length (cm)"]),
     "lacks columns the model was fitted on"),
    (lambda: Ridge().fit(*iris_frame()), lambda: iris_frame()[0].iloc[:0], "no rows"),
    (lambda: StandardScaler().fit(iris_frame()[0]), lambda: iris_frame()[0], "no predict"),
])
def test_refusals(store, make, sample, message):
    with pytest.raises(PublishError, match=message):
        publish(make(), "refused", sample(), store=store)


def test_strings_for_xgboost_must_be_categories(store):
    split = table_split("churn")  # plain string columns
    frame = split.X_train.astype({"plan": "category", "region": "category", "contract": "category"})
    model = xgb.XGBClassifier(n_estimators=3, enable_categorical=True).fit(frame, split.y_train == "leave")
    with pytest.raises(PublishError, match="astype\\('category'\\)"):
        publish(model, "x", split.X_train, store=store)


def test_the_published_artifact_loads_and_predicts_like_the_model(store):
    split = table_split("churn")
    from serve_app.tools.train import TABLE_MODELS

    model = TABLE_MODELS["churn"].make_estimator().fit(split.X_train, split.y_train)
    meta = publish(model, "churn", split.X_train, store=store)
    runtime = load_runtime(store, "churn")
    from serve_app.codecs.tables import from_records

    records = pd.DataFrame(split.X_test.head(50)).to_dict(orient="records")
    records = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in records]
    inputs = from_records(records, meta, runtime.accepts_missing)
    assert runtime.predict(runtime.prepare(inputs.data)).tolist() == model.predict(split.X_test.head(50)).tolist()


@pytest.mark.parametrize("objective", ["multi:softmax", "binary:logitraw", "binary:hinge", "rank:pairwise"])
def test_xgboost_objectives_whose_output_is_not_probabilities_or_values_are_refused(store, objective):
    """Class indexes, raw margins, hinge labels or rankings would be served as probabilities or
    values: refused, naming the objective."""
    X, y = load_iris(return_X_y=True)
    y = (y > 0).astype(int) if objective.startswith(("binary", "rank")) else y
    params = {"objective": objective, "num_class": 3} if objective == "multi:softmax" else {"objective": objective}
    booster = xgb.train(params, xgb.DMatrix(X, y, group=[len(y)] if objective.startswith("rank") else None),
                        num_boost_round=3)
    with pytest.raises(PublishError, match=f"objective '{objective}' is not served"):
        publish(booster, "b", X, store=store)


def test_a_published_version_is_never_changed_unless_replaced(store):
    X, y = iris_frame()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    publish(model, "iris", X, store=store, version="1")
    with pytest.raises(PublishError, match="iris version 1 exists"):
        publish(model, "iris", X, store=store, version="1")
    assert publish(model, "iris", X, store=store, version="1", replace=True).version == "1"
