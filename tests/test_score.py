"""Batch scoring (``serve-app score``, ``serve_app.score``) on a real in-process Ray with Ray
Data, from Parquet and CSV, local and on S3 (a real moto server): every output row is compared
with the runtime's own in-process predictions, and a file with bad rows yields an errors file
with exactly those rows (docs/batch-scoring.md).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from serve_app import scoring
from serve_app.metadata import Feature, ModelMetadata
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore
from serve_app.tools import cli
from serve_app.tools.localserve import stop_ray_cluster
from serve_app.tools.train import churn_table, dataset_split, train_model

ROWS = 3000
RAY_START_ATTEMPTS = 5
_RAY_FAILED: list[str] = []
# Bad rows of the churn table as CSV cells: row -> (column, cell, reason).
BAD_CELLS = {
    7: ("tenure_months", "3.5", "wrong_type"),          # not an integer
    19: ("monthly_charges", "abc", "wrong_type"),       # not a number
    1200: ("contract", "", "missing_value"),            # empty: missing, never missing in training
    2999: ("paperless_billing", "maybe", "wrong_type"),  # not a boolean
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(str(tmp_path_factory.mktemp("score") / "model_store"))
    for name in ("iris", "churn", "churn-xgb"):
        train_model(name, store)
    return store


@pytest.fixture(scope="module")
def ray_local(moto_endpoint):
    """An in-process Ray of its own (private temp dir), its workers reaching the moto server as a
    cluster's would reach S3 (credentials in their environment).

    In a whole-suite run this process is already a driver of the session's Serve cluster (and
    ray.init exported its address as RAY_ADDRESS): it leaves that cluster for the module, starts
    a new one (address="local", never the Serve cluster's busy CPUs) and joins Serve's again after."""
    import ray

    serve_cluster = None
    if ray.is_initialized():
        context = ray.get_runtime_context()
        serve_cluster = (context.gcs_address, context.namespace)
        ray.shutdown()
    if _RAY_FAILED:  # a module fixture that failed is set up again per test: fail at once instead
        pytest.fail(f"Ray did not start: {_RAY_FAILED[0]}")
    temp = tempfile.mkdtemp(prefix="ray-score-", dir="/tmp")
    env = {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        # Ray gives its raylet a fixed 30 s to register with the GCS: a busy machine can miss that.
        for attempt in range(RAY_START_ATTEMPTS):
            try:
                ray.init(address="local", num_cpus=2, _temp_dir=temp, _node_ip_address="127.0.0.1", include_dashboard=False,
                         log_to_driver=False, runtime_env={"env_vars": env})
                break
            except Exception:
                ray.shutdown()
                stop_ray_cluster(temp)
                if attempt == RAY_START_ATTEMPTS - 1:
                    _RAY_FAILED.append(f"{RAY_START_ATTEMPTS} attempts of ray.init failed")
                    raise
        yield
    finally:
        ray.shutdown()
        stop_ray_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
        if serve_cluster is not None:
            address, namespace = serve_cluster
            ray.init(address=address, namespace=namespace, log_to_driver=False)


def customers(rows: int = ROWS, seed: int = 5) -> pd.DataFrame:
    frame, _ = churn_table(rows=rows, seed=seed)
    return frame.assign(customer_id=np.arange(1000, 1000 + rows)).loc[:, ["customer_id", *frame.columns]]


def flowers() -> pd.DataFrame:
    split = dataset_split("iris")
    X = np.vstack([split.X_train, split.X_test])
    return pd.DataFrame(X, columns=split.feature_names).assign(flower=np.arange(len(X)))


def expected(store: ModelStore, name: str, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The runtime's own predictions and probabilities, in this process, on the original columns."""
    runtime = load_runtime(store, name)
    features = runtime.meta.feature_names
    X = (frame[features].to_numpy(dtype=np.float64) if not runtime.meta.is_tabular
         else runtime.prepare({f: frame[f].to_numpy() for f in features}))
    return np.asarray(runtime.predict(X)), np.asarray(runtime.predict_proba(X))


def check_scores(store: ModelStore, name: str, frame: pd.DataFrame, scored: pd.DataFrame, key: str) -> None:
    """Every input row is scored once, exactly as the model scores it in this process."""
    meta = store.read_metadata(name)
    scored = scored.set_index(key).loc[frame[key]]
    assert len(scored) == len(frame)
    labels, proba = expected(store, name, frame)
    assert (scored["predict"].to_numpy() == labels).all()
    columns = [scoring.proba_column(c) for c in meta.classes]
    # Ray Data's to_pandas (2.56+) gives Arrow-backed columns, whose to_numpy() is of objects.
    np.testing.assert_allclose(scored[columns].to_numpy(dtype=np.float64), proba, rtol=1e-9, atol=1e-12)


def read_output(path: Path) -> pd.DataFrame:
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.csv"))
    assert files, f"no output files in {path}"
    reader = pd.read_parquet if files[0].suffix == ".parquet" else pd.read_csv
    return pd.concat([reader(f) for f in files], ignore_index=True)


def as_csv(frame: pd.DataFrame, bad: dict | None = None) -> str:
    text = frame.astype({c: object for c in frame.columns}).where(frame.notna(), "")
    for row, (column, cell, _) in (bad or {}).items():
        text.loc[row, column] = cell
    return text.to_csv(index=False)


# -- validation, without Ray ----------------------------------------------------------------------
def test_a_batch_is_validated_by_the_serving_codec_row_by_row_only_where_it_fails():
    meta = ModelMetadata("t", "1", "sklearn", "classification",
                         [Feature("n", "int64"), Feature("c", "category", ["a", "b"]), Feature("x", "float64")],
                         "model.skops", "", input_form="frame")
    # Integers with a null arrive as floats (Arrow, pandas): the null is the only bad value.
    columns = {"n": np.array([1.0, np.nan, 3.0, 4.0]), "c": np.array(["a", "b", "z", "a"], dtype=object),
               "x": np.array([0.5, 1.5, 2.5, np.inf])}
    passed, model_input, problems = scoring.validate(columns, meta, accepts_missing=False)
    assert passed.tolist() == [True, False, False, False]
    assert sorted((row, column, reason) for row, column, reason, _ in problems) == [
        (1, "n", "missing_value"), (2, "c", "unknown_category"), (3, "x", "non_finite")]
    assert {name: values.tolist() for name, values in model_input.columns.items()} == {"n": [1], "c": ["a"], "x": [0.5]}
    # A clean batch is checked once, column by column, and keeps its integers.
    passed, model_input, problems = scoring.validate(
        {"n": np.array([1, 2]), "c": np.array(["a", "b"], dtype=object), "x": np.array([0.1, 0.2])}, meta, False)
    assert passed.all() and not problems


def test_csv_cells_read_as_pandas_would_and_a_bad_cell_stays_text():
    ints, flags = Feature("n", "int64"), Feature("f", "bool")
    assert scoring.csv_cells(ints, np.array(["1", "2"], dtype=object)).tolist() == [1, 2]
    assert scoring.csv_cells(ints, np.array(["1", "x", None], dtype=object)).tolist() == [1, "x", None]
    assert scoring.csv_cells(flags, np.array(["true", "False", None, "maybe"], dtype=object)).tolist() == [
        True, False, None, "maybe"]


# -- live: Ray Data on an in-process Ray ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["churn", "churn-xgb"])
def test_a_mixed_type_model_scores_parquet_and_csv_like_in_process(ray_local, store, tmp_path, name):
    frame = customers()
    (tmp_path / "parts").mkdir()
    frame.iloc[:1500].to_parquet(tmp_path / "parts" / "a.parquet")  # a folder of two files
    frame.iloc[1500:].to_parquet(tmp_path / "parts" / "b.parquet")
    (tmp_path / "in.csv").write_text(as_csv(frame))
    for source, output in ((tmp_path / "parts", tmp_path / "out"), (tmp_path / "in.csv", tmp_path / "out.csv")):
        summary = scoring.score(name, str(source), str(output), store=store.uri, batch_rows=1000,
                                outputs=("predict", "predict_proba"))
        assert (summary.scored, summary.failed, summary.exit_status) == (ROWS, 0, 0), summary
        check_scores(store, name, frame, read_output(output), "customer_id")
        print(f"\n{name} from {Path(source).name}: {summary}")


@pytest.mark.slow
def test_a_numeric_model_scores_a_parquet_file_keyed_by_position(ray_local, store, tmp_path):
    frame = flowers()
    frame.drop(columns="flower").to_parquet(tmp_path / "flowers.parquet")
    code = cli.main(["score", "--model", "iris", "--input", str(tmp_path / "flowers.parquet"), "--output",
                     str(tmp_path / "out"), "--store", store.uri, "--output-columns", "predict,predict_proba",
                     "--batch-rows", "64"])
    assert code == scoring.EXIT_OK
    scored = read_output(tmp_path / "out")
    assert list(scored.columns) == ["row", "predict", "proba_0", "proba_1", "proba_2"]
    check_scores(store, "iris", frame.assign(row=np.arange(len(frame))), scored, "row")


@pytest.mark.slow
def test_scores_from_s3_to_s3(ray_local, store, s3_bucket, tmp_path):
    client, bucket = s3_bucket
    frame, numbers = customers(), flowers()
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    client.put_object(Bucket=bucket, Key="in/customers.parquet", Body=buffer.getvalue())
    client.put_object(Bucket=bucket, Key="in-csv/flowers.csv", Body=numbers.to_csv(index=False).encode())
    for name, source, data, key in (("churn", "in", frame, "customer_id"), ("iris", "in-csv", numbers, "flower")):
        summary = scoring.score(name, f"s3://{bucket}/{source}", f"s3://{bucket}/out-{name}", store=store.uri,
                                outputs=("predict", "predict_proba"))
        assert (summary.scored, summary.failed) == (len(data), 0)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"out-{name}/")["Contents"]]
        scored = pd.concat([pd.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read()))
                            for k in keys], ignore_index=True)
        check_scores(store, name, data, scored, key)


@pytest.mark.slow
def test_bad_rows_go_to_the_errors_file_and_the_exit_status_says_so(ray_local, store, tmp_path, capsys):
    frame = customers()
    source = tmp_path / "customers.csv"
    source.write_text(as_csv(frame, BAD_CELLS))
    args = ["score", "--model", "churn", "--input", str(source), "--store", store.uri, "--batch-rows", "500",
            "--output-columns", "predict,predict_proba"]

    assert cli.main([*args, "--output", str(tmp_path / "out"), "--on-error", "continue"]) == scoring.EXIT_ROWS_FAILED
    errors = pq.read_table(tmp_path / "out.errors.parquet").to_pandas()
    assert list(errors.columns) == list(scoring.ERROR_COLUMNS)
    assert sorted(zip(errors["row"], errors["column"], errors["reason"])) == [
        (row, column, reason) for row, (column, _, reason) in sorted(BAD_CELLS.items())]
    assert set(errors["file"]) == {str(source)}
    good = frame.drop(index=list(BAD_CELLS)).reset_index(drop=True)
    check_scores(store, "churn", good, read_output(tmp_path / "out"), "customer_id")
    assert f"{len(BAD_CELLS)} refused" in capsys.readouterr().out

    # Fail fast: exit 2, a clear message, and the refused rows of the failing batch in the errors file.
    assert cli.main([*args, "--output", str(tmp_path / "out2"), "--on-error", "fail"]) == scoring.EXIT_FAILED
    message = capsys.readouterr().err
    assert "failed validation" in message and "out2.errors.parquet" in message
    refused = pq.read_table(tmp_path / "out2.errors.parquet").to_pandas()
    assert set(refused["row"]) <= set(BAD_CELLS) and len(refused) >= 1


@pytest.mark.slow
def test_an_input_without_a_feature_fails_clearly(ray_local, store, tmp_path, capsys):
    customers().drop(columns="plan").to_parquet(tmp_path / "c.parquet")
    code = cli.main(["score", "--model", "churn", "--input", str(tmp_path / "c.parquet"), "--output",
                     str(tmp_path / "out"), "--store", store.uri])
    assert code == scoring.EXIT_FAILED
    assert "missing features ['plan']" in capsys.readouterr().err
    assert cli.main(["score", "--model", "churn", "--input", str(tmp_path / "nothing-here"), "--output",
                     str(tmp_path / "out"), "--store", store.uri]) == scoring.EXIT_FAILED
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_python_entry_point_returns_a_dataset_of_a_dataframe(ray_local, store):
    frame = customers(rows=200)
    dataset = scoring.score("churn-xgb", frame, outputs=("predict", "predict_proba"), store=store.uri)
    check_scores(store, "churn-xgb", frame, dataset.to_pandas(), "customer_id")
