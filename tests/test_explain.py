"""Explanations on real trained models: for every row and output, bias plus the per-feature
contributions equal the model's margin (log-odds, value or class probability), and the
method is the documented one for the model family. Mixed-type models (a ColumnTransformer
pipeline, XGBoost's native categoricals) give one contribution per ORIGINAL column, in the
model's feature order, for inputs built as the server builds them."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import (FunctionTransformer, MaxAbsScaler, OneHotEncoder, PolynomialFeatures,
                                   StandardScaler, TargetEncoder)
from sklearn.tree import DecisionTreeRegressor

from serve_app.codecs import tables
from serve_app.metadata import Feature, ModelMetadata
from serve_app.publishing import publish
from serve_app.runtimes import UnsupportedOutput, load_runtime, runtime_for, sklearn_explain
from serve_app.store import ModelStore
from serve_app.tools.train import DEMO_MODELS, TABLE_MODELS, table_split, train_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    for name in [*DEMO_MODELS, *TABLE_MODELS]:
        train_model(name, store)
    return store


DATA = {"iris": load_iris, "breast-cancer": load_breast_cancer, "diabetes": load_diabetes, "wine": load_wine}
METHOD = {"iris": "linear_exact", "breast-cancer": "tree_shap", "diabetes": "linear_exact", "wine": "tree_shap",
          "churn": "linear_exact", "churn-xgb": "tree_shap"}


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


# -- mixed-type tables ----------------------------------------------------------------------------
TEXT = ["plan", "region", "contract"]
NUMBERS = ["tenure_months", "monthly_charges", "support_calls"]


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as a JSON client sends them (NaN as null)."""
    return orjson.loads(frame.to_json(orient="records"))


def served_input(runtime, frame: pd.DataFrame):
    """What the worker explains: the rows validated as a request's records, then prepared."""
    return runtime.prepare(tables.from_records(records(frame), runtime.meta, runtime.accepts_missing).data)


@pytest.fixture(scope="module")
def churn():
    split = table_split("churn")
    return split.X_train, split.y_train, split.X_test.head(60).reset_index(drop=True)


def published(tmp_path, model, train, y):
    store = ModelStore(str(tmp_path))
    publish(model.fit(train, y), "table", train, store=store)
    return load_runtime(store, "table")


def assert_columns_credited_apart(runtime, rows: pd.DataFrame):
    """The mapping back to the original columns is right, not just the sum: a linear model's
    contribution of a column depends on that column alone, so changing one column of every row
    changes that column's contribution, by the change of the margin, and no other's."""
    base, margin = runtime.explain(served_input(runtime, rows)), runtime.margin(served_input(runtime, rows))
    for j, column in enumerate(rows.columns):
        changed = rows.assign(**{column: rows[column].sample(frac=1, random_state=j).to_numpy()})
        X = served_input(runtime, changed)
        after = runtime.explain(X)
        others = [k for k in range(rows.shape[1]) if k != j]
        np.testing.assert_allclose(after.contributions[:, :, others], base.contributions[:, :, others],
                                   atol=1e-12, err_msg=column)
        np.testing.assert_allclose(after.contributions[:, :, j] - base.contributions[:, :, j],
                                   runtime.margin(X) - margin, atol=1e-9, err_msg=column)


@pytest.mark.parametrize("name", sorted(TABLE_MODELS))
def test_table_demos_explain_each_original_column(store, name):
    runtime = load_runtime(store, name)
    rows = table_split(name).X_test.head(200)
    assert rows[["region", "monthly_charges"]].isna().any().all()  # missing values included
    X = served_input(runtime, rows)
    explanation = assert_additive(runtime, X)
    assert explanation.method == METHOD[name]
    assert explanation.contributions.shape[2] == len(runtime.meta.feature_names) == 7
    assert list(X.columns) == runtime.meta.feature_names  # the axis the V1 encoder names
    assert np.abs(explanation.contributions).sum(axis=(0, 1)).min() > 0  # every column is credited


def test_churn_pipeline_credits_each_column_exactly(store):
    """LogisticRegression after OneHotEncoder/StandardScaler/passthrough: a string column's
    contribution is the coefficient of its one-hot column; an unseen value (the model ignores
    them) contributes nothing."""
    runtime = load_runtime(store, "churn")
    rows = table_split("churn").X_test.head(50)
    assert_columns_credited_apart(runtime, rows)
    model = runtime.model
    encoder = model.named_steps["prepare"].named_transformers_["text"].named_steps["onehotencoder"]
    coef = model.named_steps["classify"].coef_[0]
    plan = list(encoder.categories_[0])
    expected = coef[[plan.index(p) for p in rows["plan"]]]
    explanation = runtime.explain(served_input(runtime, rows))
    np.testing.assert_allclose(explanation.contributions[:, 0, 0], expected, rtol=1e-12)
    unseen = rows.head(3).assign(plan="enterprise")
    assert (runtime.explain(served_input(runtime, unseen)).contributions[:, 0, 0] == 0).all()


def test_forest_after_a_column_transformer_sums_saabas_back(tmp_path, churn):
    train, y, rows = churn
    prepare = ColumnTransformer([("text", OneHotEncoder(handle_unknown="ignore"), ["plan", "contract"]),
                                 ("unused", "drop", ["region"]),
                                 ("numbers", SimpleImputer(strategy="median"), NUMBERS)],
                                remainder="passthrough")
    runtime = published(tmp_path, make_pipeline(prepare, RandomForestClassifier(
        n_estimators=15, max_depth=6, random_state=0)), train, y)
    X = served_input(runtime, rows)
    explanation = assert_additive(runtime, X)
    assert explanation.method == "saabas" and explanation.margin_kind == "probability"
    names = runtime.meta.feature_names
    assert names == list(train.columns)
    assert (explanation.contributions[:, :, names.index("region")] == 0).all()  # dropped: no credit
    assert np.abs(explanation.contributions[:, :, names.index("contract")]).sum() > 0


@pytest.mark.parametrize("encoder", [OneHotEncoder(drop="first"),
                                     OneHotEncoder(drop="if_binary", min_frequency=0.22,
                                                   handle_unknown="infrequent_if_exist"),
                                     OneHotEncoder(drop="first", max_categories=2)],
                         ids=["drop first", "infrequent", "drop first of grouped"])
def test_one_hot_dropped_and_infrequent_categories(tmp_path, churn, encoder):
    train, y, rows = churn
    train, rows = train.drop(columns="region"), rows.drop(columns="region")  # no missing strings
    prepare = ColumnTransformer([("text", encoder, ["plan", "contract"]),
                                 ("numbers", make_pipeline(SimpleImputer(), StandardScaler()), NUMBERS)],
                                remainder="passthrough")
    runtime = published(tmp_path, make_pipeline(prepare, LogisticRegression(max_iter=1000)), train, y)
    assert_additive(runtime, served_input(runtime, rows))
    assert_columns_credited_apart(runtime, rows)
    if encoder.drop == "first" and encoder.max_categories is None:  # the dropped category is the reference
        explanation = runtime.explain(served_input(runtime, rows))
        basic = (rows["plan"] == "basic").to_numpy()
        assert basic.any() and (explanation.contributions[basic, 0, 0] == 0).all()


def test_nested_pipeline_with_a_scaler_after_the_column_transformer(tmp_path, churn):
    train, y, rows = churn
    prepare = ColumnTransformer([("text", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                                        OneHotEncoder(handle_unknown="ignore")), TEXT),
                                 ("numbers", SimpleImputer(strategy="median"), NUMBERS)],
                                remainder="passthrough", sparse_threshold=1.0)  # a sparse output
    model = Pipeline([("prepare", Pipeline([("columns", prepare), ("scale", MaxAbsScaler())])),
                      ("skip", "passthrough"), ("classify", LogisticRegression(max_iter=2000))])
    runtime = published(tmp_path, model, train, y)
    assert_additive(runtime, served_input(runtime, rows))
    assert_columns_credited_apart(runtime, rows)


@pytest.mark.filterwarnings("ignore:Skipping features without any observed values")
def test_empty_training_column_and_multiclass_target_encoder():
    """A SimpleImputer drops a column that was all missing in training (it gets no credit); a
    multiclass TargetEncoder gives each input column one output per class."""
    split = table_split("churn")
    train = split.X_train.assign(empty=np.nan)
    target = train.pop("contract")  # three classes
    prepare = ColumnTransformer([("text", TargetEncoder(), ["plan", "region"]),
                                 ("numbers", SimpleImputer(), [*NUMBERS, "empty"])], remainder="passthrough")
    model = make_pipeline(prepare, LogisticRegression(max_iter=2000)).fit(train, target)
    rows = train.head(40)
    explanation = sklearn_explain.explain(model, rows, list(model.classes_), True)
    margin = sklearn_explain.margin(model, rows, True)
    assert explanation.contributions.shape == (40, 3, rows.shape[1])
    np.testing.assert_allclose(explanation.bias + explanation.contributions.sum(axis=2), margin, atol=1e-9)
    assert (explanation.contributions[:, :, list(rows.columns).index("empty")] == 0).all()


@pytest.mark.parametrize("transform, named", [(PCA(2), "PCA"), (PolynomialFeatures(2), "PolynomialFeatures"),
                                              (FunctionTransformer(np.log1p), "FunctionTransformer"),
                                              (SimpleImputer(add_indicator=True), "add_indicator")],
                         ids=["PCA", "PolynomialFeatures", "FunctionTransformer", "missing indicator"])
def test_transforms_that_mix_columns_are_refused_by_name(tmp_path, churn, transform, named):
    train, y, rows = churn
    prepare = ColumnTransformer([("text", OneHotEncoder(handle_unknown="ignore"), ["plan", "contract"]),
                                 ("numbers", make_pipeline(SimpleImputer(), transform, StandardScaler()), NUMBERS)])
    runtime = published(tmp_path, make_pipeline(prepare, LogisticRegression(max_iter=2000)), train, y)
    with pytest.raises(UnsupportedOutput, match=named) as refused:
        runtime.explain(served_input(runtime, rows))
    assert "'numbers'" in str(refused.value) and refused.value.reason == "unknown_output"
