"""The model store, local and on S3 (a real moto server started by this module): layout,
metadata, version resolution, integrity checking, and loading through the runtimes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from serve_app.metadata import METADATA_FILE, Feature, ModelMetadata, reference_statistics
from serve_app.runtimes import UnsupportedOutput, load_runtime, runtime_for
from serve_app.store import (
    IntegrityError,
    InvalidMetadata,
    LocalBackend,
    NotInStore,
    ModelStore,
    S3Backend,
    VersionExists,
    version_sort_key,
)
from serve_app.tools.train import DEMO_MODELS, train_model


# -- helpers ---------------------------------------------------------------------------------
def refit(name: str, seed: int = 0, **params):
    """The estimator train_model fits for ``name`` (same data, split and parameters; the
    demo estimators are deterministic), with its train/test split, so a served model can be
    compared with the estimator's own output."""
    spec = DEMO_MODELS[name]
    data = spec.loader()
    X = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=seed,
        stratify=y if spec.task == "classification" else None,
    )
    estimator = spec.make_estimator(**params).fit(X_train, y_train)
    return estimator, X, X_train, X_test, y_test


def flip_one_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def assert_serves_like_estimator(runtime, estimator, X) -> None:
    if runtime.meta.is_classifier:
        np.testing.assert_array_equal(runtime.predict(X), estimator.predict(X))
        np.testing.assert_allclose(runtime.predict_proba(X), estimator.predict_proba(X), rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(runtime.predict(X), estimator.predict(X), rtol=1e-6, atol=1e-6)
        with pytest.raises(UnsupportedOutput):
            runtime.predict_proba(X)


# -- local store ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    """A local store holding iris (sklearn classifier), diabetes (sklearn regressor) and
    breast-cancer (xgboost classifier), version 1 each. Tests must not modify it."""
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    metas = {name: train_model(name, store) for name in ("iris", "diabetes", "breast-cancer")}
    return store, metas


def test_train_model_writes_metadata_and_artifact(tmp_path):
    store = ModelStore(str(tmp_path))
    meta = train_model("iris", store)
    version_dir = tmp_path / "iris" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == sorted([METADATA_FILE, "model.skops"])
    artifact = (version_dir / "model.skops").read_bytes()
    on_disk = json.loads((version_dir / METADATA_FILE).read_text())
    assert on_disk["sha256"] == hashlib.sha256(artifact).hexdigest() == meta.sha256
    assert on_disk["artifact"] == "model.skops"
    assert on_disk == meta.to_dict()


@pytest.mark.parametrize("name", ["iris", "diabetes", "breast-cancer"])
def test_metadata_describes_the_model(trained_store, name):
    store, metas = trained_store
    spec = DEMO_MODELS[name]
    meta = store.read_metadata(name, "1")
    assert meta.to_dict() == metas[name].to_dict()
    assert (meta.name, meta.version, meta.framework, meta.task) == (name, "1", spec.framework, spec.task)
    assert meta.artifact == runtime_for(spec.framework).artifact_name

    data = spec.loader()
    assert len(meta.features) == len(data.feature_names)
    assert all(isinstance(f, Feature) and f.dtype == "float64" for f in meta.features)
    assert all(" " not in n and "(" not in n for n in meta.feature_names)
    assert len(set(meta.feature_names)) == len(meta.feature_names)

    estimator, _, X_train, X_test, y_test = refit(name)
    if spec.task == "classification":
        assert meta.is_classifier
        assert meta.classes == np.unique(data.target).tolist()
        assert set(meta.metrics) == {"accuracy", "f1_macro"}
        # The recorded accuracy is the fitted model's on the held-out split.
        accuracy = float(np.mean(estimator.predict(X_test) == y_test))
        assert meta.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    else:
        assert not meta.is_classifier and meta.classes is None
        assert set(meta.metrics) == {"r2", "rmse"}
        rmse = float(np.sqrt(np.mean((estimator.predict(X_test) - y_test) ** 2)))
        assert meta.metrics["rmse"] == pytest.approx(rmse, abs=1e-4)

    artifact = store.backend.read_bytes(f"{name}/1/{meta.artifact}")
    assert meta.sha256 == hashlib.sha256(artifact).hexdigest()

    created = dt.datetime.fromisoformat(meta.created_at)
    assert created.tzinfo is not None
    assert abs(dt.datetime.now(dt.timezone.utc) - created) < dt.timedelta(days=1)

    assert list(meta.reference_stats) == meta.feature_names
    for j, feature in enumerate(meta.feature_names):
        stats = meta.reference_stats[feature]
        column = X_train[:, j]
        assert stats["mean"] == pytest.approx(column.mean())
        assert stats["std"] == pytest.approx(column.std())
        assert (stats["min"], stats["max"]) == (column.min(), column.max())
        assert len(stats["bin_edges"]) == len(stats["bin_fractions"]) + 1
        assert stats["bin_edges"] == sorted(stats["bin_edges"])
        assert sum(stats["bin_fractions"]) == pytest.approx(1.0)


def test_reference_statistics_of_a_constant_feature():
    X = np.column_stack([np.arange(20.0), np.full(20, 3.0)])
    stats = reference_statistics(X, ["varies", "constant"])
    assert sum(stats["varies"]["bin_fractions"]) == pytest.approx(1.0)
    assert sum(stats["constant"]["bin_fractions"]) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["iris", "diabetes", "breast-cancer"])
def test_loaded_runtime_predicts_like_the_fitted_estimator(trained_store, name):
    store, _ = trained_store
    runtime = load_runtime(store, name, "1")
    assert runtime.framework == DEMO_MODELS[name].framework
    estimator, X, *_ = refit(name)
    assert_serves_like_estimator(runtime, estimator, X)


def test_versions_sort_numerically_and_latest_resolves(tmp_path):
    store = ModelStore(str(tmp_path))
    for version in ("9", "1", "10", "2"):
        train_model("iris", store, version=version)
    train_model("iris", store, version="10", C=0.05)  # rewrite 10 with a different model
    train_model("diabetes", store, version="3")

    assert store.versions("iris") == ["1", "2", "9", "10"]
    assert store.list_models() == {"diabetes": ["3"], "iris": ["1", "2", "9", "10"]}
    assert store.latest_version("iris") == "10"
    for alias in ("latest", None, ""):
        assert store.resolve_version("iris", alias) == "10"
    assert store.resolve_version("iris", "2") == "2"
    assert store.resolve_version("iris", 2) == "2"

    latest = load_runtime(store, "iris", "latest")
    assert latest.meta.version == "10"
    assert load_runtime(store, "iris").meta.version == "10"
    estimator, X, *_ = refit("iris", C=0.05)
    assert_serves_like_estimator(latest, estimator, X)
    default_estimator, *_ = refit("iris")
    assert not np.allclose(latest.predict_proba(X), default_estimator.predict_proba(X))


def test_version_sort_key():
    versions = ["10", "b", "9", "1", "a", "100", "2"]
    assert sorted(versions, key=version_sort_key) == ["1", "2", "9", "10", "100", "a", "b"]


def test_file_uri_addresses_the_same_local_store(trained_store):
    store, _ = trained_store
    same = ModelStore(f"file://{store.backend.root}")
    assert isinstance(same.backend, LocalBackend)
    assert same.list_models() == store.list_models() == {
        "breast-cancer": ["1"], "diabetes": ["1"], "iris": ["1"]}


def test_tampered_artifact_is_refused(tmp_path):
    store = ModelStore(str(tmp_path))
    meta = train_model("iris", store)
    path = tmp_path / "iris" / "1" / meta.artifact
    original = path.read_bytes()
    path.write_bytes(flip_one_byte(original))
    with pytest.raises(IntegrityError, match="sha256") as excinfo:
        load_runtime(store, "iris")
    assert meta.sha256 in str(excinfo.value)
    with pytest.raises(IntegrityError, match="sha256"):
        store.read_artifact(store.read_metadata("iris"))
    path.write_bytes(original)  # restored bytes load again
    assert load_runtime(store, "iris").meta.sha256 == meta.sha256


def test_swapped_artifact_is_refused(tmp_path):
    """A valid artifact of another model in place of the recorded one is refused too."""
    store = ModelStore(str(tmp_path))
    train_model("iris", store)
    other = train_model("diabetes", store)
    (tmp_path / "iris" / "1" / "model.skops").write_bytes(
        (tmp_path / "diabetes" / "1" / other.artifact).read_bytes())
    with pytest.raises(IntegrityError, match="sha256"):
        load_runtime(store, "iris")


def test_missing_models_and_versions(trained_store, tmp_path):
    store, _ = trained_store
    with pytest.raises(NotInStore):
        load_runtime(store, "no-such-model")
    with pytest.raises(NotInStore):
        store.latest_version("no-such-model")
    with pytest.raises(NotInStore):
        store.read_metadata("iris", "7")
    with pytest.raises(NotInStore):
        load_runtime(store, "iris", "7")
    assert store.versions("no-such-model") == []

    empty = ModelStore(str(tmp_path / "does-not-exist-yet"))
    assert empty.list_models() == {}
    with pytest.raises(NotInStore):
        load_runtime(empty, "iris")


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "", ".hidden", "x" * 200, "a b", "a\\b"])
def test_invalid_names_and_versions_are_rejected(trained_store, tmp_path, bad):
    store, _ = trained_store
    with pytest.raises(ValueError, match="invalid model name"):
        store.read_metadata(bad, "1")
    with pytest.raises(ValueError, match="invalid model name"):
        store.versions(bad)
    with pytest.raises(ValueError, match="invalid model name"):
        load_runtime(store, bad)
    if bad:  # an empty version means "latest"
        with pytest.raises(ValueError, match="invalid model version"):
            store.read_metadata("iris", bad)

    target = ModelStore(str(tmp_path / "store"))
    meta = ModelMetadata(name=bad, version="1", framework="sklearn", task="regression",
                         features=[Feature("a")], artifact="model.skops", sha256="")
    with pytest.raises(ValueError, match="invalid model name"):
        target.save(meta, b"bytes")
    meta.name, meta.version = "ok", bad
    with pytest.raises(ValueError, match="invalid model version"):
        target.save(meta, b"bytes")
    with pytest.raises(ValueError, match="invalid model version"):
        train_model("iris", target, version=bad)
    assert list(tmp_path.rglob("*")) == []  # nothing written anywhere


def test_trailing_newline_is_an_invalid_name(tmp_path):
    store = ModelStore(str(tmp_path))
    with pytest.raises(ValueError, match="invalid model name"):
        store.versions("iris\n")
    meta = ModelMetadata(name="iris\n", version="1", framework="sklearn", task="regression",
                         features=[Feature("a")], artifact="model.skops", sha256="")
    with pytest.raises(ValueError, match="invalid model name"):
        store.save(meta, b"bytes")


def test_incomplete_version_is_not_visible(tmp_path):
    store = ModelStore(str(tmp_path))
    train_model("iris", store, version="1")
    # The first half of ModelStore.save for version 2: the artifact, not yet the metadata.
    store.backend.write_bytes("iris/2/model.skops", b"partial artifact")
    assert store.versions("iris") == ["1"]
    assert load_runtime(store, "iris").meta.version == "1"


# -- S3 store (the moto server of conftest.py: s3_bucket) ----------------------------------------


def test_s3_store_round_trip(s3_bucket):
    client, bucket = s3_bucket
    store = ModelStore(f"s3://{bucket}/some/prefix")
    assert isinstance(store.backend, S3Backend)
    assert store.list_models() == {}

    for version in ("2", "10", "9"):
        train_model("iris", store, version=version)
    xgb_meta = train_model("breast-cancer", store)

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"some/prefix/iris/10/model.json", "some/prefix/iris/10/model.skops",
            "some/prefix/breast-cancer/1/model.json", "some/prefix/breast-cancer/1/model.ubj"} <= keys
    assert all(k.startswith("some/prefix/") for k in keys)
    artifact = client.get_object(Bucket=bucket, Key="some/prefix/breast-cancer/1/model.ubj")["Body"].read()
    assert hashlib.sha256(artifact).hexdigest() == xgb_meta.sha256

    assert store.list_models() == {"breast-cancer": ["1"], "iris": ["2", "9", "10"]}
    assert store.latest_version("iris") == "10"
    assert store.read_metadata("breast-cancer").to_dict() == xgb_meta.to_dict()

    # A second store object (new client) over the same URI sees and serves the same models.
    reader = ModelStore(f"s3://{bucket}/some/prefix/")
    for name in ("iris", "breast-cancer"):
        runtime = load_runtime(reader, name, "latest")
        estimator, X, *_ = refit(name)
        assert_serves_like_estimator(runtime, estimator, X)

    with pytest.raises(NotInStore):
        load_runtime(reader, "diabetes")
    with pytest.raises(NotInStore):
        reader.read_metadata("iris", "3")  # NoSuchKey becomes NotInStore
    assert ModelStore(f"s3://{bucket}/other/prefix").list_models() == {}


def test_s3_store_at_bucket_root(s3_bucket):
    client, bucket = s3_bucket
    store = ModelStore(f"s3://{bucket}")
    train_model("diabetes", store)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"diabetes/1/model.json", "diabetes/1/model.skops"}
    assert store.list_models() == {"diabetes": ["1"]}
    estimator, X, *_ = refit("diabetes")
    assert_serves_like_estimator(load_runtime(store, "diabetes"), estimator, X)


def test_s3_tampered_artifact_is_refused(s3_bucket):
    client, bucket = s3_bucket
    store = ModelStore(f"s3://{bucket}/some/prefix")
    meta = train_model("iris", store)
    key = "some/prefix/iris/1/model.skops"
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=flip_one_byte(original))
    with pytest.raises(IntegrityError, match="sha256") as excinfo:
        load_runtime(store, "iris")
    assert meta.sha256 in str(excinfo.value)


# -- publishing is atomic and exclusive (docs/models.md#publishing-atomic-and-exclusive) ------------
def constant_model(name: str, value: float) -> tuple[ModelMetadata, bytes]:
    """A model whose every prediction is ``value``: an answer names the artifact it came from."""
    from sklearn.dummy import DummyRegressor  # here: only these tests need a constant model

    artifact = runtime_for("sklearn").serialize(DummyRegressor(strategy="constant", constant=value).fit([[0.0]], [0.0]))
    return ModelMetadata(name=name, version="0", framework="sklearn", task="regression", features=[Feature("x")],
                         artifact="model.skops", sha256=""), artifact


def prediction(store: ModelStore, name: str, version: str) -> float:
    return float(load_runtime(store, name, version).predict(np.zeros((1, 1)))[0])


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return ModelStore(str(tmp_path / "store"))
    client, bucket = request.getfixturevalue("s3_bucket")
    return ModelStore(f"s3://{bucket}/models")


def test_a_version_is_never_overwritten_by_a_racing_publish(any_store):
    """Two publishes that both picked version 1: the second finds it taken (the first's artifact
    and metadata untouched) and the next-version path moves it to 2."""
    (first, a), (second, b) = constant_model("m", 1.0), constant_model("m", 2.0)
    first.version = second.version = "1"
    any_store.save(first, a)
    with pytest.raises(VersionExists, match="taken"):
        any_store.save(second, b)
    assert prediction(any_store, "m", "1") == 1.0
    assert any_store.add_version(second, b).version == "2" and prediction(any_store, "m", "2") == 2.0
    # A version left with its artifact only (a crashed publish): the same bytes may finish it,
    # other bytes may not; numbering goes past it; replace=True overwrites.
    any_store.backend.write_bytes("m/3/model.skops", a)
    third, _ = constant_model("m", 1.0)
    third.version = "3"
    with pytest.raises(VersionExists, match="taken"):
        any_store.save(third, b)
    assert any_store.next_version("m") == "4" and any_store.versions("m") == ["1", "2"]
    assert any_store.save(third, a).version == "3" and prediction(any_store, "m", "3") == 1.0
    with pytest.raises(VersionExists, match="exists"):
        any_store.save(third, a)
    assert any_store.save(third, b, replace=True).version == "3" and prediction(any_store, "m", "3") == 2.0


def test_concurrent_publishers_each_get_their_own_complete_version(any_store):
    """Eight threads publish at once (a barrier lines them up): eight distinct versions, each
    the model of the thread that got it."""
    barrier, got = threading.Barrier(8), {}

    def publisher(value: float) -> None:
        meta, artifact = constant_model("race", value)
        barrier.wait()
        got[value] = any_store.add_version(meta, artifact).version

    threads = [threading.Thread(target=publisher, args=(float(i),)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(got.values(), key=int) == any_store.versions("race") and len(set(got.values())) == 8
    assert all(prediction(any_store, "race", version) == value for value, version in got.items())


def test_leftovers_of_a_write_are_never_listed_or_read(tmp_path):
    """A temporary file (a write that died), the old fixed ``.tmp`` name, and a model.json that
    is not metadata: no version, and reading the broken one is a clear store error."""
    store = ModelStore(str(tmp_path))
    meta, artifact = constant_model("m", 1.0)
    store.add_version(meta, artifact)
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "2" / f".{METADATA_FILE}.0123.tmp").write_text('{"name": "m", "vers')
    (tmp_path / "m" / "2" / f"{METADATA_FILE}.tmp").write_text("{}")
    assert store.versions("m") == ["1"] and store.read_metadata("m").version == "1"
    assert sorted(p.name for p in (tmp_path / "m" / "1").iterdir()) == [METADATA_FILE, "model.skops"]
    (tmp_path / "m" / "3").mkdir()
    for broken in ("not json", "[1, 2]", json.dumps({**meta.to_dict(), "features": [{"name": "x", "evil": 1}]})):
        (tmp_path / "m" / "3" / METADATA_FILE).write_text(broken)
        with pytest.raises(InvalidMetadata):
            store.read_metadata("m", "3")
