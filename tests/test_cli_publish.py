"""``serve-app publish`` and ``serve-app models``, run as the real command on files made here: XGBoost
.ubj/.json, skops, joblib (refused, before anything is unpickled, unless --allow-pickle), CSV and
Parquet samples, local and S3 (moto server) stores. Every published model is loaded back through
the serving runtime and must answer exactly as the model it was saved from."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
import joblib
import numpy as np
import orjson
import pandas as pd
import pytest
import skops.io as sio
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from xgboost import XGBClassifier

from serve_app.codecs.tables import from_records
from serve_app.runtimes import load_runtime
from serve_app.runtimes.sklearn import trusted_types
from serve_app.store import ModelStore
from serve_app.tools import cli
from serve_app.tools.train import CHURN_LABELS, CHURN_TEXT_COLUMNS, churn_table

TESTS = Path(__file__).resolve().parent
ROWS = 60


def double(X):
    """A function of this module: a FunctionTransformer around it is a type skops does not trust."""
    return np.asarray(X) * 2.0


class Trap:
    """Unpickling it creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


# -- running the command ---------------------------------------------------------------------------
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def serve_app(*args, env: dict | None = None) -> Run:
    """``serve-app ARGS``, the command's own ``main`` in this process (a fresh interpreter per
    run costs seconds of imports; test_the_installed_command_runs runs the real script), with
    ``env`` added to a clean environment for the run."""
    saved = dict(os.environ)
    for key in ("SERVE_APP_STORE", "SERVE_APP_SKOPS_TRUSTED_TYPES"):
        os.environ.pop(key, None)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Run(code, out.getvalue(), err.getvalue())


def test_the_installed_command_runs(tmp_path):
    """The ``serve-app`` script of the venv, as a user runs it."""
    result = subprocess.run([str(Path(sys.executable).parent / "serve-app"), "models", "--store", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"no models in {tmp_path}" in result.stdout, result.stderr


def refused(result: Run) -> str:
    """The message of a refused command: exit 2, a message, no traceback, nothing on stdout."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    return result.stderr


def published(result: Run, name: str, version: str, store: str) -> None:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"published {name} version {version} (")
    assert lines[0].endswith(f" to {store.rstrip('/')}/{name}/{version}")


# -- the models, fitted on a customer table ---------------------------------------------------------
@pytest.fixture(scope="module")
def table():
    frame, labels = churn_table(rows=800, seed=3)
    return frame, labels


@pytest.fixture(scope="module")
def files(tmp_path_factory, table):
    """Models saved in every accepted format, with their training rows as CSV and Parquet."""
    root = tmp_path_factory.mktemp("files")
    frame, labels = table
    categorical = frame.astype({c: "category" for c in CHURN_TEXT_COLUMNS})
    booster_model = XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1, enable_categorical=True,
                                  tree_method="hist", max_cat_to_onehot=1)
    booster_model.fit(categorical, np.searchsorted(CHURN_LABELS, labels))
    booster_model.save_model(root / "churn.ubj")
    booster_model.save_model(root / "churn.json")
    categorical.to_csv(root / "categorical.csv", index=False)
    categorical.to_parquet(root / "categorical.parquet")

    pipeline = customer_pipeline().fit(frame, labels)
    sio.dump(pipeline, root / "pipeline.skops")
    joblib.dump(pipeline, root / "pipeline.joblib")
    frame.to_csv(root / "customers.csv", index=False)
    frame.to_parquet(root / "customers.parquet")

    numbers = pd.DataFrame(np.random.default_rng(0).normal(size=(200, 3)), columns=["a", "b", "c"])
    custom = make_pipeline(FunctionTransformer(double), LogisticRegression()).fit(numbers, numbers["a"] > 0)
    sio.dump(custom, root / "custom.skops")
    numbers.to_csv(root / "numbers.csv", index=False)
    return {"root": root, "xgb": booster_model, "frame": categorical, "pipeline": pipeline,
            "customers": frame, "custom": custom}


def customer_pipeline() -> Pipeline:
    text = make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore"))
    numbers = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
    prepare = ColumnTransformer([("text", text, CHURN_TEXT_COLUMNS),
                                 ("numbers", numbers, ["tenure_months", "monthly_charges", "support_calls"]),
                                 ("flags", "passthrough", ["paperless_billing"])])
    return Pipeline([("prepare", prepare), ("classify", LogisticRegression(max_iter=1000))])


# -- answers: the stored model's against the original's ----------------------------------------------
def served(store: ModelStore, name: str, rows: pd.DataFrame):
    """Labels and probabilities of the stored model for ``rows`` sent as JSON records, decoded
    as a request is."""
    runtime = load_runtime(store, name)
    records = orjson.loads(rows.to_json(orient="records"))
    assert runtime.meta.is_tabular
    X = runtime.prepare(from_records(records, runtime.meta, runtime.accepts_missing).data)
    return runtime, runtime.predict(X), runtime.predict_proba(X)


def assert_xgboost_serves_like(store: ModelStore, name: str, model: XGBClassifier, rows: pd.DataFrame) -> None:
    runtime, labels, proba = served(store, name, rows)
    want = model.predict_proba(rows)
    np.testing.assert_allclose(proba, want, rtol=1e-9, atol=1e-12)
    assert [str(v) for v in labels] == np.asarray(CHURN_LABELS)[model.predict(rows)].tolist()
    assert runtime.meta.classes == CHURN_LABELS


def assert_sklearn_serves_like(store: ModelStore, name: str, model, rows: pd.DataFrame) -> None:
    _, labels, proba = served(store, name, rows)
    np.testing.assert_allclose(proba, model.predict_proba(rows), rtol=1e-9, atol=1e-12)
    assert labels.tolist() == model.predict(rows).tolist()


def category_schema(store: ModelStore, name: str) -> dict:
    return {f.name: f.categories for f in store.read_metadata(name).features if f.dtype == "category"}


# -- XGBoost files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("artifact, sample", [("churn.ubj", "categorical.csv"),
                                              ("churn.json", "categorical.parquet")])
def test_xgboost_file_with_category_columns(files, tmp_path, artifact, sample):
    root, store = files["root"], str(tmp_path / "store")
    result = serve_app("publish", root / artifact, "--name", "churn-xgb", "--sample", root / sample,
                       "--store", store, "--classes", "leave,stay", "--description", "from a file")
    published(result, "churn-xgb", "1", store)
    assert "(xgboost classification, input form frame)" in result.stdout
    meta = ModelStore(store).read_metadata("churn-xgb")
    assert meta.description == "from a file" and meta.artifact == "model.ubj"
    assert {f.name: f.dtype for f in meta.features} == {
        "plan": "category", "region": "category", "contract": "category", "tenure_months": "int64",
        "monthly_charges": "float64", "support_calls": "int64", "paperless_billing": "bool"}
    assert category_schema(ModelStore(store), "churn-xgb")["plan"] == ["basic", "premium", "standard"]
    assert_xgboost_serves_like(ModelStore(store), "churn-xgb", files["xgb"], files["frame"].head(ROWS))


def test_a_csv_sample_lacking_a_category_gets_the_boosters_categories(files, tmp_path):
    """CSV says nothing of categories: the booster's stored ones are the schema, so a sample
    without any "premium" customer still allows them, with the training codes."""
    frame = files["frame"]
    sample = tmp_path / "no-premium.csv"
    frame[frame["plan"] != "premium"].to_csv(sample, index=False)
    store = str(tmp_path / "store")
    result = serve_app("publish", files["root"] / "churn.ubj", "--name", "churn-xgb", "--sample", sample,
                       "--store", store, "--classes", "leave,stay")
    published(result, "churn-xgb", "1", store)
    assert category_schema(ModelStore(store), "churn-xgb")["plan"] == ["basic", "premium", "standard"]
    premium = frame[frame["plan"] == "premium"].head(ROWS)
    assert len(premium) > 10
    assert_xgboost_serves_like(ModelStore(store), "churn-xgb", files["xgb"], premium)


def test_a_sample_value_the_booster_never_saw_is_refused(files, tmp_path):
    sample = tmp_path / "gold.csv"
    files["frame"].head(50).astype({"plan": str}).replace({"plan": {"basic": "gold"}}).to_csv(sample, index=False)
    message = refused(serve_app("publish", files["root"] / "churn.ubj", "--name", "churn-xgb", "--sample", sample,
                                "--store", tmp_path / "store", "--classes", "leave,stay"))
    assert "'plan'" in message and "gold" in message
    assert not (tmp_path / "store").exists()


def test_classes_must_match_the_boosters_class_count(files, tmp_path):
    message = refused(serve_app("publish", files["root"] / "churn.ubj", "--name", "churn-xgb", "--sample",
                                files["root"] / "categorical.csv", "--store", tmp_path / "store",
                                "--classes", "leave,stay,maybe"))
    assert "2 classes" in message


def test_an_empty_or_foreign_xgboost_file_is_refused(tmp_path, files):
    (tmp_path / "empty.ubj").write_bytes(b"")
    (tmp_path / "other.json").write_text('{"not": "a model"}')
    for artifact in ("empty.ubj", "other.json"):
        message = refused(serve_app("publish", tmp_path / artifact, "--name", "x", "--sample",
                                    files["root"] / "categorical.csv", "--store", tmp_path / "store"))
        assert artifact in message
        assert "stack trace" not in message.lower()


# -- skops files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", ["customers.csv", "customers.parquet"])
def test_skops_pipeline(files, tmp_path, sample):
    root, store = files["root"], str(tmp_path / "store")
    result = serve_app("publish", root / "pipeline.skops", "--name", "churn", "--sample", root / sample,
                       "--store", store)
    published(result, "churn", "1", store)
    assert "(sklearn classification, input form frame)" in result.stdout
    meta = ModelStore(store).read_metadata("churn")
    assert meta.classes == CHURN_LABELS and meta.unknown_categories == "allow"
    assert {f.name: f.dtype for f in meta.features}["plan"] == "string"
    assert next(f for f in meta.features if f.name == "region").nullable
    assert_sklearn_serves_like(ModelStore(store), "churn", files["pipeline"], files["customers"].head(ROWS))


def test_skops_file_with_an_untrusted_type_is_refused_naming_it(files, tmp_path):
    artifact = files["root"] / "custom.skops"
    untrusted = sio.get_untrusted_types(file=artifact)
    assert untrusted == [f"{double.__module__}.double"]  # skops itself flags the function
    message = refused(serve_app("publish", artifact, "--name", "custom", "--sample", files["root"] / "numbers.csv",
                                "--store", tmp_path / "store"))
    assert untrusted[0] in message
    assert f"SERVE_APP_SKOPS_TRUSTED_TYPES={untrusted[0]}" in message
    assert not (tmp_path / "store").exists()


def test_an_audited_type_is_allowed_through_the_environment(files, tmp_path):
    """The refusal's advice works: with the type trusted (and its module importable), the model
    is published and served."""
    artifact, store = files["root"] / "custom.skops", str(tmp_path / "store")
    (name,) = sio.get_untrusted_types(file=artifact)
    result = serve_app("publish", artifact, "--name", "custom", "--sample", files["root"] / "numbers.csv",
                       "--store", store, env={"SERVE_APP_SKOPS_TRUSTED_TYPES": name, "PYTHONPATH": str(TESTS)})
    published(result, "custom", "1", store)
    assert "input form matrix" in result.stdout


def test_a_file_that_is_not_skops_is_refused(files, tmp_path):
    (tmp_path / "fake.skops").write_text("hello")
    message = refused(serve_app("publish", tmp_path / "fake.skops", "--name", "x", "--sample",
                                files["root"] / "customers.csv", "--store", tmp_path / "store"))
    assert "not a readable skops file" in message


# -- pickle files -----------------------------------------------------------------------------------------
def test_pickle_is_refused_before_anything_is_unpickled(files, tmp_path):
    marker = tmp_path / "unpickled"
    for suffix in (".joblib", ".pkl", ".pickle"):
        trap = tmp_path / f"trap{suffix}"
        joblib.dump(Trap(marker), trap)
        message = refused(serve_app("publish", trap, "--name", "trap", "--sample", files["root"] / "customers.csv",
                                    "--store", tmp_path / "store"))
        assert "--allow-pickle" in message and "runs whatever code" in message
        assert not marker.exists()
    # The trap does fire when the file is unpickled: the check above would have seen it.
    message = refused(serve_app("publish", tmp_path / "trap.joblib", "--name", "trap", "--sample",
                                files["root"] / "customers.csv", "--store", tmp_path / "store", "--allow-pickle"))
    assert marker.exists()
    assert "no predict()" in message


def test_joblib_with_allow_pickle_is_stored_as_skops(files, tmp_path):
    store = str(tmp_path / "store")
    result = serve_app("publish", files["root"] / "pipeline.joblib", "--name", "churn", "--sample",
                       files["root"] / "customers.parquet", "--store", store, "--allow-pickle")
    published(result, "churn", "1", store)
    meta = ModelStore(store).read_metadata("churn")
    stored = Path(store) / "churn" / "1" / meta.artifact
    assert meta.artifact == "model.skops" and sorted(p.name for p in stored.parent.iterdir()) == [
        "model.json", "model.skops"]
    assert set(sio.get_untrusted_types(data=stored.read_bytes())) <= trusted_types()  # skops the server loads
    assert_sklearn_serves_like(ModelStore(store), "churn", files["pipeline"], files["customers"].head(ROWS))


# -- refusals of the command line itself ---------------------------------------------------------------------
@pytest.mark.parametrize("artifact, sample, expected", [
    ("missing.ubj", "customers.csv", "no such model file"),
    ("pipeline.skops", "missing.csv", "no such sample file"),
    ("customers.csv", "customers.csv", "unknown model file extension '.csv'"),
    ("pipeline.skops", "pipeline.skops", "unknown sample file extension '.skops'"),
])
def test_missing_files_and_unknown_extensions(files, tmp_path, artifact, sample, expected):
    root = files["root"]
    message = refused(serve_app("publish", root / artifact, "--name", "x", "--sample", root / sample,
                                "--store", tmp_path / "store"))
    assert expected in message


def test_a_bad_name_is_refused_before_loading(files, tmp_path):
    message = refused(serve_app("publish", files["root"] / "pipeline.joblib", "--name", "../up", "--sample",
                                files["root"] / "customers.csv", "--store", tmp_path / "store"))
    assert "invalid model name" in message


# -- serve-app models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def listed_store(files, tmp_path_factory) -> str:
    store, root = str(tmp_path_factory.mktemp("listed")), files["root"]
    for version in ("1", "2"):
        published(serve_app("publish", root / "pipeline.skops", "--name", "churn", "--sample",
                            root / "customers.csv", "--store", store), "churn", version, store)
    published(serve_app("publish", root / "churn.ubj", "--name", "churn-xgb", "--sample", root / "categorical.csv",
                        "--store", store, "--classes", "leave,stay", "--version", "7"), "churn-xgb", "7", store)
    return store


def test_models_lists_versions_and_schema(listed_store):
    result = serve_app("models", "--store", listed_store)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["churn", "1,", "2", "2", "sklearn", "classification", "frame"] in lines
    assert ["churn-xgb", "7", "7", "xgboost", "classification", "frame"] in lines
    assert ["plan", "string", "no", "basic,", "premium,", "standard"] in lines
    assert ["plan", "category", "no", "basic,", "premium,", "standard"] in lines
    assert ["region", "category", "yes", "east,", "north,", "south,", "west"] in lines
    assert ["monthly_charges", "float64", "yes", "-"] in lines
    assert "churn version 2: 7 features; classes leave, stay" in result.stdout


def test_models_json(listed_store):
    result = serve_app("models", "--store", listed_store, "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["store"] == listed_store
    models = {m["name"]: m for m in listing["models"]}
    assert models["churn"]["versions"] == ["1", "2"] and models["churn"]["latest"] == "2"
    xgb_model = models["churn-xgb"]
    assert (xgb_model["framework"], xgb_model["task"], xgb_model["input_form"]) == ("xgboost", "classification",
                                                                                     "frame")
    assert xgb_model["features"][0] == {"name": "plan", "dtype": "category",
                                        "categories": ["basic", "premium", "standard"], "nullable": False}
    assert xgb_model["classes"] == CHURN_LABELS


def test_models_of_an_empty_store(tmp_path):
    result = serve_app("models", "--store", tmp_path)
    assert result.returncode == 0 and f"no models in {tmp_path}" in result.stdout
    assert json.loads(serve_app("models", "--store", tmp_path, "--json").stdout)["models"] == []


# -- S3 (the moto server of conftest.py) --------------------------------------------------------
@pytest.fixture
def s3_env(s3_bucket) -> str:
    """A fresh bucket; this process and the commands it runs point boto3 at it (the environment)."""
    return s3_bucket[1]


def test_publish_to_s3(files, s3_env):
    store, root = f"s3://{s3_env}/team/models", files["root"]
    result = serve_app("publish", root / "churn.ubj", "--name", "churn-xgb", "--sample", root / "categorical.parquet",
                       "--store", store, "--classes", "leave,stay")
    published(result, "churn-xgb", "1", store)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_env)["Contents"]}
    assert keys == {"team/models/churn-xgb/1/model.json", "team/models/churn-xgb/1/model.ubj"}
    assert_xgboost_serves_like(ModelStore(store), "churn-xgb", files["xgb"], files["frame"].head(ROWS))
    listing = json.loads(serve_app("models", "--store", store, "--json").stdout)
    assert [(m["name"], m["versions"]) for m in listing["models"]] == [("churn-xgb", ["1"])]


def test_an_unreachable_s3_bucket_is_a_message(files, s3_env):
    result = serve_app("models", "--store", f"s3://{s3_env}-missing/models")
    assert refused(result).startswith("serve-app models: ")
