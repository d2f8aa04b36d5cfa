"""Batch scoring: a stored model over a whole table with Ray Data (``serve-app score``,
:func:`score`; docs/batch-scoring.md).

The input (Parquet or CSV: a file, a folder of them, local or ``s3://``) is read file by file
in Ray Data read tasks that number each row (``_file``, ``_row``: its file and its position in
it, so a refused row can be named); a pool of scoring actors (Ray Data ``map_batches`` with a
callable class) each load the stored model once (sha256 verified, skops' trusted types: the
runtimes' own loading) and validate every batch with the serving codec
(:func:`serve_app.codecs.tables.typed_column`, the checks of every protocol). A batch that
passes is scored whole; in a batch that does not, each failing column is checked value by
value, so exactly the failing rows are set aside, written to the errors file with the column
and reason, and the others are scored.

CSV cells are text: text features stay text, the others are read as numbers or booleans cell
by cell (a cell that is neither stays text and the codec refuses it), so one bad cell costs
its row, not its column.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serve_app.codecs import tables
from serve_app.errors import BadInput
from serve_app.metadata import Feature, ModelMetadata
from serve_app.serving.outputs import check_outputs, predictions
from serve_app.store import DEFAULT_STORE, ModelStore, store_from_environment

# Exit statuses of `serve-app score`: every row scored; the run failed (bad arguments, an
# unreadable input or store, or a refused row with --on-error fail); some rows were refused
# and set aside (--on-error continue).
EXIT_OK, EXIT_FAILED, EXIT_ROWS_FAILED = 0, 2, 3
ON_ERROR = ("fail", "continue")
# `serve-app score`'s --model, --input and --output when they are not given (the RayJob sets them).
SCORE_ENV = {"model": "SERVE_APP_SCORE_MODEL", "input": "SERVE_APP_SCORE_INPUT", "output": "SERVE_APP_SCORE_OUTPUT"}
SCORE_OUTPUTS = ("predict", "predict_proba")
READ_TASKS = 2  # files read at once: a task of no CPU is otherwise unbounded (a process each)
DEFAULT_BATCH_ROWS = 65536  # a pipeline call costs ~10 ms whatever its rows: few, large calls
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# The position columns the read tasks add; never written to the output.
FILE_COLUMN, ROW_COLUMN = "_file", "_row"
ERROR_COLUMNS = ("file", "row", "column", "reason", "message")
# An input with no column besides the features is keyed by position: ``row`` (and ``file``).
POSITION_NAMES = {FILE_COLUMN: "file", ROW_COLUMN: "row"}


class ScoreError(Exception):
    """The run cannot go on: its message says why (exit status 2)."""


class RowsRefused(ScoreError):
    """Rows failed validation with ``on_error="fail"``: they are in the errors file."""


@dataclass
class ScoreSummary:
    output: str | None
    errors: str | None       # the errors file, when rows were refused
    scored: int              # rows written to the output
    failed: int              # rows refused (in the errors file)
    seconds: float           # reading, scoring and writing: start-up excluded
    startup_seconds: float   # connecting to (or starting) Ray; 0 when it already ran

    @property
    def rows(self) -> int:
        return self.scored + self.failed

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def exit_status(self) -> int:
        return EXIT_ROWS_FAILED if self.failed else EXIT_OK

    def __str__(self) -> str:
        text = (f"{self.rows:,} rows in {self.seconds:.1f} s ({self.rows_per_second:,.0f} rows/s; Ray start-up "
                f"{self.startup_seconds:.1f} s): {self.scored:,} scored")
        if self.output:
            text += f" to {self.output}"
        if self.failed:
            text += f", {self.failed:,} refused (see {self.errors})"
        return text


# -- files ---------------------------------------------------------------------------------------
def filesystem(uri: str):
    """A pyarrow file system and the path in it: ``s3://`` (``AWS_ENDPOINT_URL`` honoured, as
    the store's boto3 client does) or local."""

    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        scheme = "https"
        if endpoint and "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=region), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def input_files(uri: str) -> tuple[Any, list[str], str]:
    """(file system, the input's files in name order, "parquet" or "csv")."""

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        files = [path]
    elif info.type == pafs.FileType.Directory:
        files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if f.type == pafs.FileType.File and PurePosixPath(f.path).suffix.lower() in FORMATS
                       and not PurePosixPath(f.path).name.startswith((".", "_")))
        if not files:
            raise ScoreError(f"{uri}: no {'/'.join(sorted(FORMATS))} files in this folder")
    else:
        raise ScoreError(f"{uri}: no such file or folder")
    kinds = {FORMATS.get(PurePosixPath(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ScoreError(f"{uri}: expected Parquet (.parquet) or CSV (.csv) files of one kind, got "
                         f"{sorted({PurePosixPath(f).suffix or '(none)' for f in files})}")
    return fs, files, kinds.pop()


def input_columns(fs, path: str, fmt: str) -> list[str]:
    """The column names of one input file (a Parquet footer, or a CSV header)."""

    try:
        if fmt == "parquet":
            return list(pq.read_schema(path, filesystem=fs).names)
        with fs.open_input_stream(path) as stream:
            return list(pacsv.open_csv(stream).schema.names)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "unreadable"
        raise ScoreError(f"{path}: not a readable {fmt} file: {exc}") from None


def bytes_per_row(fs, path: str, fmt: str, text: list[str]) -> int:
    """The in-memory size of one row as read (the first rows of ``path``), position columns
    included: what turns a number of rows into Ray Data's block size in bytes."""
    first = next(_file_batches(fs, path, fmt, 1024, text), None)
    if first is None or not first.num_rows:
        return 64
    return max(1, round(first.nbytes / first.num_rows)) + 12  # + FILE_COLUMN and ROW_COLUMN


def _read_files(batch, fs, files: list[str], fmt: str, batch_rows: int, text: list[str]):
    """A read task: each file of its batch as batches of at most ``batch_rows`` rows, with
    the position columns (a generator: Ray Data streams the batches on as blocks)."""

    for index in batch["index"].to_pylist():
        offset = 0
        for record_batch in _file_batches(fs, files[index], fmt, batch_rows, text):
            table = pa.Table.from_batches([record_batch])
            rows = table.num_rows
            table = table.append_column(FILE_COLUMN, pa.array(np.full(rows, index, dtype=np.int32)))
            yield table.append_column(ROW_COLUMN, pa.array(np.arange(offset, offset + rows, dtype=np.int64)))
            offset += rows


def _file_batches(fs, path: str, fmt: str, batch_rows: int, text: list[str]):

    if fmt == "parquet":
        yield from pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=batch_rows)
        return
    # Every feature as text (empty cells null, as MLflow's CSV bodies read): typed per cell later.
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in text}, strings_can_be_null=True)
    with fs.open_input_stream(path) as stream:
        yield from pacsv.open_csv(stream, convert_options=convert, read_options=pacsv.ReadOptions(block_size=1 << 22))


# -- one batch -----------------------------------------------------------------------------------
def column_values(array) -> np.ndarray:
    """One Arrow column as the values a codec takes: numbers as numpy, strings as objects
    (null: None), dictionary (category) columns decoded."""

    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    return array.to_numpy(zero_copy_only=False)


def csv_cells(feature: Feature, values: np.ndarray) -> np.ndarray:
    """A CSV column's text cells as the values pandas would read for the feature (numbers,
    booleans); a cell that is neither stays text, for the codec to refuse."""
    if feature.is_textual:
        return values
    import pandas as pd  # only CSV inputs with non-text features parse cells

    series = pd.Series(values, dtype=object)
    if feature.dtype == "bool":
        parsed = series.str.lower().map({"true": True, "false": False})
        return np.where(parsed.isna() & series.notna(), series, parsed.where(parsed.notna(), None)).astype(object)
    try:
        return pd.to_numeric(series).to_numpy()  # what pandas' read_csv makes of a clean column
    except (ValueError, TypeError):
        return np.array([_number(v) for v in values], dtype=object)


def _number(cell):
    if cell is None:
        return None
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def validate(columns: dict[str, np.ndarray], meta: ModelMetadata, accepts_missing: bool):
    """The serving codec's checks on a batch, row by row where a column fails.

    Returns (a mask of the rows that passed, those rows as the runtime's input or None when
    none did, one (row, column, reason, message) per refused value)."""
    allow_unknown = meta.unknown_categories == "allow"
    rows = len(next(iter(columns.values())))
    refused = np.zeros(rows, dtype=bool)
    problems, typed = [], {}
    for feature in meta.features:
        values = columns[feature.name]
        try:
            typed[feature.name] = tables.typed_column(feature, values, accepts_missing, allow_unknown,
                                                      f"column {feature.name!r}")
        except BadInput:
            for i, cell in enumerate(_cells(feature, values)):
                try:
                    tables.typed_column(feature, [cell], accepts_missing, allow_unknown, f"column {feature.name!r}")
                except BadInput as exc:
                    refused[i] = True
                    problems.append((i, feature.name, exc.reason, exc.message))
    passed = ~refused
    if not passed.any():
        return passed, None, problems
    if refused.any():  # the rows that passed, typed again as one column each
        typed = {f.name: tables.typed_column(f, _kept(f, columns[f.name][passed]), accepts_missing, allow_unknown,
                                             f.name) for f in meta.features}
    return passed, tables.as_model_input(typed, meta), problems


def _kept(feature: Feature, values: np.ndarray) -> np.ndarray:
    """Rows that passed, of an integer column Arrow held as floats because of a null that was
    refused: integers again (the codec takes whole floats only beside a missing value)."""
    if feature.dtype == "int64" and values.dtype.kind == "f" and not np.isnan(values).any():
        return values.astype(np.int64)
    return values


def _cells(feature: Feature, values: np.ndarray) -> list:
    """A column's values one by one as a request would send them: null as None, and a whole
    float of an integer column (how Arrow and pandas hold integers with nulls) as an int."""
    cells = []
    for value in np.asarray(values).tolist():
        if isinstance(value, float) and value != value:
            value = None
        elif feature.dtype == "int64" and isinstance(value, float) and value.is_integer():
            value = int(value)
        cells.append(value)
    return cells


def proba_column(label) -> str:
    """The output column of one class's probability: ``proba_<label>``."""
    return f"proba_{label}"


class _Scorer:
    """A scoring actor: the model loaded once, then validated batches in, outputs out."""

    def __init__(self, store: str, name: str, version: str, outputs: tuple[str, ...], keys: list[str],
                 files: list[str], fmt: str, on_error: str, errors: tuple | None):
        from serve_app.runtimes import load_runtime  # in the actor: the frameworks load where models run

        self.runtime = load_runtime(ModelStore(store), name, version)
        self.meta = self.runtime.meta
        self.outputs, self.keys, self.files, self.fmt = outputs, keys, files, fmt
        self.on_error, self.errors = on_error, errors
        self.classes = list(self.meta.classes or [])

    def __call__(self, batch):
        columns = {f.name: column_values(batch.column(f.name)) for f in self.meta.features}
        if self.fmt == "csv":
            columns = {f.name: csv_cells(f, columns[f.name]) for f in self.meta.features}
        passed, model_input, problems = validate(columns, self.meta, self.runtime.accepts_missing)
        if model_input is not None:
            try:
                results = predictions(self.runtime, model_input.data, self.outputs)
            except BadInput:  # the model refused a value: find its rows one by one
                results = self._row_by_row(columns, passed, problems)
        else:
            results = {}
        if problems:
            self._set_aside(batch, problems)
        return self._table(batch.filter(passed) if not passed.all() else batch, results)

    def _row_by_row(self, columns: dict, passed: np.ndarray, problems: list) -> dict[str, np.ndarray]:
        parts = []
        for i in np.flatnonzero(passed):
            _, one, _ = validate({name: values[i:i + 1] for name, values in columns.items()}, self.meta,
                                 self.runtime.accepts_missing)
            try:
                parts.append(predictions(self.runtime, one.data, self.outputs))
            except BadInput as exc:
                passed[i] = False
                problems.append((int(i), None, exc.reason, exc.message))
        if not parts:
            return {}
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _set_aside(self, batch, problems: list) -> None:
        files, rows = batch.column(FILE_COLUMN).to_numpy(), batch.column(ROW_COLUMN).to_numpy()
        table = pa.table({"file": [self.files[files[i]] for i, *_ in problems],
                          "row": pa.array([int(rows[i]) for i, *_ in problems], pa.int64()),
                          "column": pa.array([c for _, c, _, _ in problems], pa.string()),
                          "reason": [r for _, _, r, _ in problems],
                          "message": [m for *_, m in problems]})
        if self.errors is not None:
            fs, folder = self.errors
            fs.create_dir(folder, recursive=True)
            pq.write_table(table, f"{folder}/part-{files[0]}-{rows[0]}-{uuid.uuid4().hex[:8]}.parquet", filesystem=fs)
        if self.on_error == "fail":
            first = problems[0]
            raise RowsRefused(f"{len({i for i, *_ in problems})} rows of this batch failed validation; first: "
                              f"{self.files[files[first[0]]]} row {int(rows[first[0]])}: {first[3]}")

    def _table(self, batch, results: dict[str, np.ndarray]):
        table = batch.select(self.keys)
        if FILE_COLUMN in self.keys:  # the file's name, stored once per block (dictionary-encoded)
            at = table.column_names.index(FILE_COLUMN)
            table = table.set_column(at, FILE_COLUMN, pa.DictionaryArray.from_arrays(
                pa.array(table.column(at).to_numpy()), pa.array(self.files)))
        table = table.rename_columns([POSITION_NAMES.get(c, c) for c in table.column_names])
        rows = table.num_rows
        if "predict" in self.outputs:
            predict = results.get("predict")
            if predict is None:  # no row passed: an empty column of the labels' type
                predict = np.asarray(self.classes if self.classes else [0.0])[:0]
            table = table.append_column("predict", pa.array(predict))
        if "predict_proba" in self.outputs:
            proba = results.get("predict_proba", np.zeros((rows, len(self.classes))))
            for j, label in enumerate(self.classes):
                table = table.append_column(proba_column(label), pa.array(proba[:, j], pa.float64()))
        return table


# -- a run ---------------------------------------------------------------------------------------
def connect(address: str | None) -> float:
    """Seconds spent attaching to ``address`` (``auto``, ``ray://...``), or starting a local Ray
    with this machine's cores; 0 when this process already has Ray."""
    import ray  # on demand: `serve-app` reads this module's constants for every command

    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    return time.perf_counter() - started


def _table_input(frame, batch_rows: int):
    """A pandas DataFrame in the notebook as a Dataset with the position columns, one block
    per batch (each block goes to one scoring actor)."""
    import ray  # on demand: `serve-app` reads this module's constants for every command

    frame = frame.reset_index(drop=True).assign(**{FILE_COLUMN: np.int32(0), ROW_COLUMN: np.arange(len(frame))})
    parts = [frame.iloc[start:start + batch_rows] for start in range(0, len(frame), batch_rows)] or [frame]
    return ray.data.from_pandas(parts), ["<DataFrame>"], "table", list(frame.columns[:-2])


def _errors_location(output: str | None, errors: str | None) -> str | None:
    if errors:
        return errors
    return f"{output.rstrip('/')}.errors.parquet" if output else None


def scored_dataset(model: str, input, *, version: str | None = None, store: str | None = None,
                   outputs: Sequence[str] = ("predict",), key_columns: Sequence[str] | None = None,
                   batch_rows: int = DEFAULT_BATCH_ROWS, on_error: str = "fail", errors_parts: str | None = None,
                   concurrency: int | None = None):
    """The lazy Ray Dataset of ``model``'s outputs over ``input`` (a path or a DataFrame), and
    the checked settings. Ray must be running (:func:`connect`)."""
    import ray  # on demand: `serve-app` reads this module's constants for every command

    if on_error not in ON_ERROR:
        raise ScoreError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if batch_rows < 1:
        raise ScoreError(f"batch_rows must be at least 1, got {batch_rows}")
    store = store or store_from_environment() or DEFAULT_STORE
    if "://" not in store:  # the actors' working directory is not this process's
        store = os.path.abspath(os.path.expanduser(store))
    model_store = ModelStore(store)
    version = model_store.resolve_version(model, version)
    meta = model_store.read_metadata(model, version)
    unknown = [o for o in outputs if o not in SCORE_OUTPUTS]
    if unknown:
        raise ScoreError(f"unknown output(s) {unknown}; batch scoring writes {list(SCORE_OUTPUTS)}")
    try:
        outputs = check_outputs(list(outputs) or ["predict"], meta.is_classifier)
    except BadInput as exc:
        raise ScoreError(exc.message) from None

    if isinstance(input, (str, os.PathLike)):
        fs, files, fmt = input_files(str(input))
        columns = input_columns(fs, files[0], fmt)
        text = [f.name for f in meta.features if f.name in columns]
        dataset = ray.data.from_items([{"index": i} for i in range(len(files))], override_num_blocks=len(files))
        # Reading asks for no CPU: the scoring actors take every core, and a read task that
        # waited for one would never run (a 1-CPU worker deadlocked with 0.5). Reads are light
        # beside scoring, and Ray Data's memory budget still paces them.
        dataset = dataset.map_batches(_read_files, fn_args=(fs, files, fmt, batch_rows, text), batch_size=1,
                                      batch_format="pyarrow", num_cpus=0,
                                      compute=ray.data.TaskPoolStrategy(size=min(READ_TASKS, len(files))))
        # One block per batch, not one per file: each block goes to one scoring actor, and a
        # file read as one block (Ray Data merges a task's output up to its block size, 128 MiB
        # by default) would be scored by one actor while the others wait.
        dataset.context.target_max_block_size = batch_rows * bytes_per_row(fs, files[0], fmt, text)
    else:
        dataset, files, fmt, columns = _table_input(input, batch_rows)
    try:
        tables.check_names([c for c in columns if c in meta.feature_names], meta.feature_names, "the input")
    except BadInput as exc:
        raise ScoreError(exc.message) from None
    keys = [c for c in columns if c not in meta.feature_names] if key_columns is None else list(key_columns)
    if not keys:
        keys = [FILE_COLUMN, ROW_COLUMN] if len(files) > 1 else [ROW_COLUMN]
    missing = [k for k in keys if k not in [*columns, *POSITION_NAMES]]
    if missing:
        raise ScoreError(f"key columns {missing} are not in the input; its columns: {columns}")
    if concurrency is None:
        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)))
    parts = filesystem(errors_parts) if errors_parts else None
    return dataset.map_batches(
        _Scorer, fn_constructor_args=(store, model, version, outputs, keys, files, fmt, on_error, parts),
        batch_size=batch_rows, batch_format="pyarrow", num_cpus=1,
        # every actor asked for at once: each loads the model, and the table is there to score
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency, initial_size=concurrency))


def score(model: str, input, output: str | None = None, *, version: str | None = None, store: str | None = None,
          outputs: Sequence[str] = ("predict",), key_columns: Sequence[str] | None = None,
          batch_rows: int = DEFAULT_BATCH_ROWS, on_error: str = "fail", errors: str | None = None,
          address: str | None = None, concurrency: int | None = None):
    """Score ``input`` (a Parquet or CSV file or folder, local or ``s3://``, or a DataFrame)
    with stored model ``model``.

    Without ``output``: the lazy Ray Dataset of key columns and outputs (a refused row raises
    when it is computed). With ``output`` (``.csv``: CSV, else a Parquet folder): writes it,
    refused rows to ``errors`` (default ``<output>.errors.parquet``), and returns a
    :class:`ScoreSummary`; with ``on_error="fail"`` a refused row raises :class:`RowsRefused`.
    """
    startup = connect(address)
    if output is None:
        return scored_dataset(model, input, version=version, store=store, outputs=outputs, key_columns=key_columns,
                              batch_rows=batch_rows, on_error=on_error, concurrency=concurrency)
    errors = _errors_location(output, errors)
    parts = f"{errors}.parts-{uuid.uuid4().hex[:8]}"
    dataset = scored_dataset(model, input, version=version, store=store, outputs=outputs, key_columns=key_columns,
                             batch_rows=batch_rows, on_error=on_error, errors_parts=parts, concurrency=concurrency)
    started = time.perf_counter()
    fs, path = filesystem(output)
    failure = None
    try:
        _write(dataset, fs, path, output, batch_rows)
    except Exception as exc:  # a refused row ends the run through Ray Data's own error
        failure = exc
    seconds = time.perf_counter() - started
    failed = _gather_errors(parts, errors)
    if failure is not None:
        if failed:
            raise RowsRefused(f"{failed} rows failed validation (on_error='fail'); they are in {errors}") from None
        raise failure
    scored = _count(fs, path, output)
    return ScoreSummary(output, errors if failed else None, scored, failed, seconds, startup)


def _write(dataset, fs, path: str, output: str, batch_rows: int) -> None:
    from ray.data import SaveMode  # on demand, as ray above

    # S3 has no folders: Arrow's create_dir there PUTs a zero-byte "<output>/" marker object,
    # which a reader listing the output's keys takes for an empty Parquet file. Ray Data skips
    # it for s3:// paths, but ``path`` carries no scheme (the file system is given): say so.
    create_dir = not isinstance(fs, pafs.S3FileSystem)
    # Writing asks for no CPU, as reading: the scoring actors hold every core. Two write tasks
    # at most (a task of no CPU is otherwise unbounded, and each new one may start a worker
    # process), a few batches per file.
    options = dict(filesystem=fs, mode=SaveMode.OVERWRITE, try_create_dir=create_dir, ray_remote_args={"num_cpus": 0},
                   concurrency=2, min_rows_per_file=4 * batch_rows)
    if output.lower().endswith(".csv"):
        dataset.write_csv(path, **options)
    else:
        dataset.write_parquet(path, **options)


def _count(fs, path: str, output: str) -> int:

    fmt = "csv" if output.lower().endswith(".csv") else "parquet"
    return pads.dataset(path, filesystem=fs, format=fmt).count_rows()


def _gather_errors(parts: str, errors: str) -> int:
    """The actors' error parts as one file (sorted by file and row); the number of refused rows."""

    fs, folder = filesystem(parts)
    target_fs, target = filesystem(errors)
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        if target_fs.get_file_info(target).type == pafs.FileType.File:
            target_fs.delete_file(target)  # an earlier run's: this run refused nothing
        return 0
    table = pads.dataset(folder, filesystem=fs, format="parquet").to_table()
    table = table.sort_by([("file", "ascending"), ("row", "ascending")])
    if errors.lower().endswith(".csv"):
        with target_fs.open_output_stream(target) as stream:
            pacsv.write_csv(table, stream)
    else:
        pq.write_table(table, target, filesystem=target_fs)
    fs.delete_dir(folder)
    return len(set(zip(table.column("file").to_pylist(), table.column("row").to_pylist())))
