"""Framework runtimes on real artifacts: the skops trust policy, XGBoost's UBJSON booster
with class mapping, and refusal of unreadable artifacts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import skops.io as sio
import xgboost as xgb
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from serve_app.metadata import Feature, ModelMetadata
from serve_app.runtimes import (
    RUNTIMES,
    ArtifactError,
    UnsupportedOutput,
    runtime_for,
)
from serve_app.runtimes.sklearn import TRUSTED_TYPES, SklearnRuntime, trusted_types
from serve_app.runtimes.xgboost import XGBoostRuntime

TRUST_ENV = "SERVE_APP_SKOPS_TRUSTED_TYPES"


def meta_for(X, task="classification", classes=None, framework="sklearn", name="m"):
    return ModelMetadata(
        name=name, version="1", framework=framework, task=task,
        features=[Feature(f"f{i}") for i in range(X.shape[1])],
        artifact=runtime_for(framework).artifact_name, sha256="", classes=classes,
    )


def double(X):
    """A custom function: skops cannot know it is harmless, so it is an untrusted type."""
    return X * 2.0


def qualified(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


@pytest.fixture(autouse=True)
def no_extra_trust(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


@pytest.fixture(scope="module")
def iris():
    return load_iris(return_X_y=True)


@pytest.fixture(scope="module")
def breast_cancer():
    return load_breast_cancer(return_X_y=True)


# -- sklearn / skops ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def custom_function_pipeline(iris):
    X, y = iris
    return make_pipeline(FunctionTransformer(double), LogisticRegression(max_iter=500)).fit(X, y)


def test_custom_function_is_refused_then_trusted_by_env(custom_function_pipeline, iris, monkeypatch):
    X, _ = iris
    artifact = SklearnRuntime.serialize(custom_function_pipeline)
    untrusted_name = qualified(double)
    assert untrusted_name in sio.get_untrusted_types(data=artifact)
    assert untrusted_name not in TRUSTED_TYPES
    meta = meta_for(X, classes=[0, 1, 2])

    with pytest.raises(ArtifactError, match="untrusted types") as excinfo:
        SklearnRuntime.load(artifact, meta)
    assert untrusted_name in str(excinfo.value)

    monkeypatch.setenv(TRUST_ENV, "some.other.Type")  # trusting something else is not enough
    with pytest.raises(ArtifactError, match=untrusted_name):
        SklearnRuntime.load(artifact, meta)

    monkeypatch.setenv(TRUST_ENV, f" some.other.Type , {untrusted_name} ,")
    assert untrusted_name in trusted_types()
    runtime = SklearnRuntime.load(artifact, meta)
    np.testing.assert_array_equal(runtime.predict(X), custom_function_pipeline.predict(X))
    np.testing.assert_allclose(runtime.predict_proba(X), custom_function_pipeline.predict_proba(X))


def test_every_untrusted_type_is_named_and_must_be_trusted(iris, monkeypatch):
    """KNeighborsClassifier stores a KDTree and a distance metric, neither in TRUSTED_TYPES:
    the refusal names both, and trusting only one of them is not enough."""
    X, y = iris
    knn = KNeighborsClassifier(n_neighbors=3, algorithm="kd_tree").fit(X, y)
    artifact = SklearnRuntime.serialize(knn)
    untrusted = sorted(set(sio.get_untrusted_types(data=artifact)) - TRUSTED_TYPES)
    assert "sklearn.neighbors._kd_tree.KDTree" in untrusted and len(untrusted) >= 2
    meta = meta_for(X, classes=[0, 1, 2])

    with pytest.raises(ArtifactError) as excinfo:
        SklearnRuntime.load(artifact, meta)
    assert str(untrusted) in str(excinfo.value)

    monkeypatch.setenv(TRUST_ENV, untrusted[0])
    with pytest.raises(ArtifactError, match="untrusted types") as excinfo:
        SklearnRuntime.load(artifact, meta)
    assert untrusted[0] not in str(excinfo.value)

    monkeypatch.setenv(TRUST_ENV, ",".join(untrusted))
    np.testing.assert_array_equal(SklearnRuntime.load(artifact, meta).predict(X), knn.predict(X))


@pytest.mark.parametrize("make_model, needs", [
    (lambda: RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0),
     "sklearn.tree._tree.Tree"),
    (lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0),
     "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"),
], ids=["random-forest", "hist-gradient-boosting"])
def test_tree_ensembles_load_through_the_trust_list(breast_cancer, make_model, needs):
    X, y = breast_cancer
    model = make_model().fit(X, y)
    artifact = SklearnRuntime.serialize(model)
    untrusted = set(sio.get_untrusted_types(data=artifact))
    assert needs in untrusted  # the artifact really exercises the trust list
    assert untrusted <= TRUSTED_TYPES
    runtime = SklearnRuntime.load(artifact, meta_for(X, classes=[0, 1]))
    np.testing.assert_array_equal(runtime.predict(X), model.predict(X))
    np.testing.assert_allclose(runtime.predict_proba(X), model.predict_proba(X))


def test_sklearn_regressor_has_no_probabilities():
    X, y = load_diabetes(return_X_y=True)
    model = Ridge().fit(X, y)
    runtime = SklearnRuntime.load(SklearnRuntime.serialize(model), meta_for(X, task="regression"))
    np.testing.assert_allclose(runtime.predict(X), model.predict(X))
    with pytest.raises(UnsupportedOutput, match="regression"):
        runtime.predict_proba(X)


# -- unreadable artifacts --------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(breast_cancer):
    X, y = breast_cancer
    skops_bytes = SklearnRuntime.serialize(LogisticRegression(max_iter=50).fit(X[:, :3], y))
    ubj_bytes = XGBoostRuntime.serialize(xgb.XGBClassifier(n_estimators=3, n_jobs=1).fit(X, y))
    return {"skops": skops_bytes, "ubj": ubj_bytes}


# Empty bytes are covered for XGBoost by test_xgboost_empty_artifact_does_not_abort (a
# subprocess: libxgboost aborts the whole process on them).
@pytest.mark.parametrize("runtime_cls, kind", [
    (runtime_cls, kind)
    for runtime_cls in (SklearnRuntime, XGBoostRuntime)
    for kind in ("garbage", "empty", "truncated-skops", "truncated-ubj", "other-format")
    if not (runtime_cls is XGBoostRuntime and kind == "empty")
])
def test_unreadable_artifacts_raise_artifact_error(artifacts, runtime_cls, kind):
    own = "skops" if runtime_cls is SklearnRuntime else "ubj"
    other = "ubj" if own == "skops" else "skops"
    data = {
        "garbage": b"this is not a model \x00\xff" * 8,
        "empty": b"",
        "truncated-skops": artifacts["skops"][: len(artifacts["skops"]) // 2],
        # Cut inside the ASCII header: see test_xgboost_corrupt_binary_artifact_is_an_artifact_error.
        "truncated-ubj": artifacts["ubj"][:64],
        "other-format": artifacts[other],
    }[kind]
    meta = meta_for(np.zeros((1, 3)), classes=[0, 1], framework=runtime_cls.framework, name="broken")
    with pytest.raises(ArtifactError, match="broken"):
        runtime_cls.load(data, meta)


def test_xgboost_corrupt_binary_artifact_is_an_artifact_error(artifacts):
    corrupt = artifacts["ubj"][: len(artifacts["ubj"]) // 2] + b"\xff\xfe" * 16
    meta = meta_for(np.zeros((1, 3)), classes=[0, 1], framework="xgboost", name="broken")
    with pytest.raises(ArtifactError, match="broken"):
        XGBoostRuntime.load(corrupt, meta)


def test_xgboost_empty_artifact_does_not_abort():
    code = textwrap.dedent("""
        from serve_app.metadata import Feature, ModelMetadata
        from serve_app.runtimes import ArtifactError
        from serve_app.runtimes.xgboost import XGBoostRuntime
        meta = ModelMetadata(name="empty", version="1", framework="xgboost",
                             task="classification", features=[Feature("a")],
                             artifact="model.ubj", sha256="", classes=[0, 1])
        try:
            XGBoostRuntime.load(b"", meta)
        except ArtifactError as exc:
            print("ArtifactError:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ArtifactError: empty" in result.stdout


# -- xgboost ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xgb_binary(breast_cancer):
    X, y = breast_cancer
    return xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1, random_state=0).fit(X, y)


def test_xgboost_binary_matches_xgbclassifier(xgb_binary, breast_cancer):
    X, _ = breast_cancer
    runtime = XGBoostRuntime.load(XGBoostRuntime.serialize(xgb_binary), meta_for(X, classes=[0, 1], framework="xgboost"))
    proba = runtime.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_allclose(proba, xgb_binary.predict_proba(X), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(runtime.predict(X), xgb_binary.predict(X))
    assert runtime.accepts_missing and not SklearnRuntime.accepts_missing


def test_xgboost_classes_map_from_metadata(xgb_binary, breast_cancer):
    X, _ = breast_cancer
    labels = ["malignant", "benign"]
    runtime = XGBoostRuntime.load(XGBoostRuntime.serialize(xgb_binary),
                                  meta_for(X, classes=labels, framework="xgboost"))
    expected = np.asarray(labels)[xgb_binary.predict(X)]
    np.testing.assert_array_equal(runtime.predict(X), expected)
    assert set(runtime.predict(X)) == set(labels)  # both classes occur


def test_xgboost_multiclass_with_label_mapping():
    X, y = load_wine(return_X_y=True)
    clf = xgb.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1, random_state=0).fit(X, y)
    classes = [10, 20, 30]
    runtime = XGBoostRuntime.load(XGBoostRuntime.serialize(clf), meta_for(X, classes=classes, framework="xgboost"))
    np.testing.assert_allclose(runtime.predict_proba(X), clf.predict_proba(X), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(runtime.predict(X), np.asarray(classes)[clf.predict(X)])


def test_xgboost_missing_values_match_xgbclassifier(xgb_binary, breast_cancer):
    X, _ = breast_cancer
    X = X[:50].copy()
    X[::3, 0] = np.nan
    X[1::4, 7] = np.nan
    runtime = XGBoostRuntime.load(XGBoostRuntime.serialize(xgb_binary), meta_for(X, classes=[0, 1], framework="xgboost"))
    np.testing.assert_allclose(runtime.predict_proba(X), xgb_binary.predict_proba(X), rtol=1e-6, atol=1e-7)


def test_xgboost_regressor():
    X, y = load_diabetes(return_X_y=True)
    reg = xgb.XGBRegressor(n_estimators=20, max_depth=3, n_jobs=1, random_state=0).fit(X, y)
    runtime = XGBoostRuntime.load(XGBoostRuntime.serialize(reg), meta_for(X, task="regression", framework="xgboost"))
    np.testing.assert_allclose(runtime.predict(X), reg.predict(X), rtol=1e-6)
    with pytest.raises(UnsupportedOutput, match="regression"):
        runtime.predict_proba(X)


def test_runtime_registry():
    assert runtime_for("sklearn") is SklearnRuntime
    assert runtime_for("xgboost") is XGBoostRuntime
    assert {"sklearn", "xgboost"} <= set(RUNTIMES)
    assert (SklearnRuntime.artifact_name, XGBoostRuntime.artifact_name) == ("model.skops", "model.ubj")
    with pytest.raises(ArtifactError, match="'nope'") as excinfo:
        runtime_for("nope")
    assert "sklearn" in str(excinfo.value) and "xgboost" in str(excinfo.value)


def test_runtime_metadata_is_the_model_metadata(breast_cancer):
    X, y = breast_cancer
    meta = meta_for(X[:, :3], task="regression")
    runtime = SklearnRuntime.load(SklearnRuntime.serialize(Ridge().fit(X[:, :3], y)), meta)
    assert runtime.metadata() == meta.to_dict()
    assert ModelMetadata.from_dict(runtime.metadata()).to_dict() == meta.to_dict()
