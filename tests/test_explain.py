"""Explanations on real trained models: for every row and output, bias plus the per-feature
contributions equal the model's margin (log-odds, value or class probability), and the
method is the documented one for the model family."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.naive_bayes import GaussianNB
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.tree import DecisionTreeRegressor

from serve_app.metadata import Feature, ModelMetadata
from serve_app.runtimes import UnsupportedOutput, load_runtime, runtime_for
from serve_app.store import ModelStore
from serve_app.tools.train import DEMO_MODELS, train_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    for name in DEMO_MODELS:
        train_model(name, store)
    return store


DATA = {"iris": load_iris, "breast-cancer": load_breast_cancer, "diabetes": load_diabetes, "wine": load_wine}
METHOD = {"iris": "linear_exact", "breast-cancer": "tree_shap", "diabetes": "linear_exact", "wine": "tree_shap"}


def assert_additive(runtime, X):
    explanation = runtime.explain(X)
    margin = runtime.margin(X)
    assert explanation.contributions.shape == (len(X), margin.shape[1], X.shape[1])
    assert len(explanation.outputs) == margin.shape[1]
    np.testing.assert_allclose(explanation.bias + explanation.contributions.sum(axis=2), margin,
                               rtol=1e-4, atol=1e-4)
    return explanation


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_demo_models_explain_additively(store, name):
    runtime = load_runtime(store, name)
    X = DATA[name]().data[::7]
    explanation = assert_additive(runtime, X)
    assert explanation.method == METHOD[name]


def sklearn_runtime(model, X, y, task, classes=None):
    names = [f"f{i}" for i in range(X.shape[1])]
    meta = ModelMetadata(name="m", version="1", framework="sklearn", task=task,
                         features=[Feature(n) for n in names], artifact="model.skops", sha256="",
                         classes=classes)
    cls = runtime_for("sklearn")
    return cls.load(cls.serialize(model.fit(X, y)), meta)  # through skops, as served


def test_forest_classifier_saabas_sums_to_probabilities():
    data = load_wine()
    runtime = sklearn_runtime(RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0),
                              data.data, data.target, "classification", [0, 1, 2])
    explanation = assert_additive(runtime, data.data[::5])
    assert explanation.method == "saabas" and explanation.margin_kind == "probability"
    np.testing.assert_allclose(runtime.margin(data.data[:5]), runtime.predict_proba(data.data[:5]))


def test_tree_regressor_saabas_sums_to_predictions():
    data = load_diabetes()
    runtime = sklearn_runtime(RandomForestRegressor(n_estimators=10, random_state=0), data.data, data.target,
                              "regression")
    assert_additive(runtime, data.data[::9])
    single = sklearn_runtime(DecisionTreeRegressor(max_depth=4, random_state=0), data.data, data.target,
                             "regression")
    assert_additive(single, data.data[::9])


def test_binary_linear_classifier_explains_the_log_odds_of_the_second_class():
    data = load_breast_cancer()
    runtime = sklearn_runtime(make_pipeline(LogisticRegression(max_iter=5000)), data.data, data.target,
                              "classification", [0, 1])
    explanation = assert_additive(runtime, data.data[::11])
    assert explanation.outputs == ["1"]


@pytest.mark.parametrize("model", [GaussianNB(), make_pipeline(PCA(2), LogisticRegression())],
                         ids=["no method", "feature-mixing transform"])
def test_models_without_a_method_say_so(model):
    data = load_iris()
    runtime = sklearn_runtime(model, data.data, data.target, "classification", [0, 1, 2])
    with pytest.raises(UnsupportedOutput):
        runtime.explain(data.data[:3])
