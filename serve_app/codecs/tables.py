"""Named columns of any protocol, checked against the model's stored schema.

Every protocol that can name its columns ends here: KServe V1 records and schema-ordered rows,
V2 per-column tensors (JSON or binary, strings as BYTES), MLflow's ``dataframe_split``,
``dataframe_records`` and CSV bodies. :func:`as_model_input` turns the columns into what the
runtime predicts on: the float64 matrix of a numeric model, or typed columns from which the
runtime builds one DataFrame per model call (category columns in their training categories).

The policy (docs/your-own-model.md#what-is-refused), each a 400 with a reason:

- every feature must be sent, and nothing else (``feature_names``);
- numeric columns take numbers (``float64`` also takes integers and JSON booleans, as the
  numeric path does; ``int64`` only integers: no float is silently truncated); booleans
  take ``true``/``false``; string and category columns take strings only: a number sent for
  a string is a ``wrong_type``, never quietly turned into text;
- ``null`` is a missing value: legal where the column had missing values in training or the
  runtime handles them (XGBoost), else ``missing_value``;
- a value outside a column's known categories is ``unknown_category`` (naming the column,
  the value and the allowed values) unless the model allows them (``unknown_categories``);
- columns of different lengths, or a column holding lists, is ``wrong_shape``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from serve_app.errors import BadInput
from serve_app.metadata import Feature, ModelMetadata
from serve_app.serving.interface import ModelInput

# How many offending values an error message quotes.
_QUOTED = 5


def check_names(names, feature_names: Sequence[str], what: str) -> None:
    """A 400 naming any unknown or missing feature."""
    unknown = sorted(set(names) - set(feature_names), key=str)
    missing = [f for f in feature_names if f not in names]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown features {unknown}")
        if missing:
            parts.append(f"missing features {missing}")
        raise BadInput(f"{what}: {'; '.join(parts)}; expected {list(feature_names)}", "feature_names")


def from_columns(columns: Mapping[str, Any], meta: ModelMetadata, accepts_missing: bool,
                 what: str = "inputs") -> ModelInput:
    """Validated rows from one sequence of values per feature name."""
    check_names(columns, meta.feature_names, what)
    typed = {f.name: typed_column(f, columns[f.name], accepts_missing, meta.unknown_categories == "allow",
                                  f"{what}: column {f.name!r}")
             for f in meta.features}
    lengths = {len(c) for c in typed.values()}
    if len(lengths) != 1:
        raise BadInput(f"{what}: columns differ in length: {sorted(lengths)}", "wrong_shape")
    if not lengths.pop():
        raise BadInput(f"{what}: no rows to predict", "wrong_shape")
    return as_model_input(typed, meta)


def from_records(records: Sequence[Any], meta: ModelMetadata, accepts_missing: bool,
                 what: str = '"instances"') -> ModelInput:
    """Validated rows from JSON objects keyed by feature name."""
    if not all(isinstance(r, dict) for r in records):
        raise BadInput(f"{what}: mixes objects and other values; send one object per row")
    names = meta.feature_names
    for index, record in enumerate(records):
        if len(record) != len(names) or any(name not in record for name in names):
            check_names(record, names, f"{what}[{index}]")
    return from_columns({n: [r[n] for r in records] for n in names}, meta, accepts_missing, what)


def from_rows(rows: Sequence[Any], meta: ModelMetadata, accepts_missing: bool,
              what: str = '"instances"') -> ModelInput:
    """Validated rows from lists of values in the schema's feature order."""
    width = len(meta.features)
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise BadInput(f"{what}[{index}]: expected a list of {width} values in the order "
                           f"{meta.feature_names}, got {got}", "wrong_shape")
    return from_columns({f.name: [row[j] for row in rows] for j, f in enumerate(meta.features)},
                        meta, accepts_missing, what)


def as_model_input(typed: Mapping[str, np.ndarray], meta: ModelMetadata) -> ModelInput:
    """The runtime's form of validated columns: a matrix for a numeric model, else the columns."""
    names = tuple(meta.feature_names)
    if not meta.is_tabular:
        return ModelInput(names, np.column_stack([typed[n].astype(np.float64, copy=False) for n in names]))
    return ModelInput(names, columns={n: typed[n] for n in names})


def typical_row(meta: ModelMetadata) -> ModelInput:
    """One valid row for health probes: the stored example's first, else the training means
    (the most common category, for the rest)."""
    if meta.example:
        return from_records(meta.example[:1], meta, accepts_missing=True)
    row = {}
    for feature in meta.features:
        stats = meta.reference_stats.get(feature.name, {})
        if feature.is_textual:
            row[feature.name] = stats.get("mode") or (feature.categories or [""])[0]
        elif feature.dtype == "bool":
            row[feature.name] = False
        elif feature.dtype == "int64":
            row[feature.name] = int(round(stats.get("mean", 0.0)))
        else:
            row[feature.name] = stats.get("mean", 0.0)
    return from_records([row], meta, accepts_missing=True)


# -- one column --------------------------------------------------------------------------
def typed_column(feature: Feature, values: Any, accepts_missing: bool, allow_unknown: bool,
                 what: str) -> np.ndarray:
    """One column's values as a 1-D array of the feature's type, or a BadInput saying why."""
    array, object_kind = _one_dimensional(values, what)
    if feature.is_textual:
        column, missing = _text(array, object_kind, what)
    else:
        column = _booleans(array, what) if feature.dtype == "bool" else _numbers(array, feature.dtype, what)
        missing = _missing_mask(column)
    if missing is not None and missing.any() and not (feature.nullable or accepts_missing):
        raise BadInput(f"{what}: missing values (null) are not accepted: the column had none in training "
                       "and this model cannot take them", "missing_value")
    if feature.categories is not None and not allow_unknown:
        _check_categories(column, missing, feature, what)
    return column


def _one_dimensional(values: Any, what: str) -> tuple[np.ndarray, str | None]:
    """The values as a 1-D array, and for an object array the kind of its values (pandas'
    ``infer_dtype``), inferred once for the column's checks."""
    if isinstance(values, np.ndarray):
        array = values
    else:
        if not isinstance(values, (list, tuple)):
            raise BadInput(f"{what}: expected a list of values, one per row", "wrong_shape")
        try:
            array = np.asarray(values)
        except ValueError:
            raise BadInput(f"{what}: holds lists of different lengths; send one value per row", "wrong_shape") from None
        if array.dtype.kind in "US" or (array.ndim > 1 and array.dtype.kind == "O"):
            array = np.asarray(values, dtype=object)  # numpy would turn numbers among strings into text
            if array.ndim > 1:
                array = np.empty(len(values), dtype=object)
                array[:] = list(values)
    if array.ndim == 2 and array.shape[1] == 1:  # V2's [N, 1]
        array = array.reshape(-1)
    object_kind = _object_kind(array) if array.ndim == 1 and array.dtype.kind == "O" else None
    if array.ndim != 1 or (object_kind is not None and object_kind not in _FLAT_KINDS
                           and any(isinstance(v, (list, dict, tuple)) for v in array)):
        raise BadInput(f"{what}: expected one value per row, got nested values", "wrong_shape")
    return array, object_kind


def _text(array: np.ndarray, object_kind: str | None, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The text column (objects, missing as NaN) and its missing-value mask (None: none can be)."""
    kind = array.dtype.kind
    if kind == "U":
        return array.astype(object), None
    if kind == "O":
        if object_kind in ("string", "empty"):
            column, missing = array.copy(), _pandas().isna(array)
            column[missing] = np.nan  # None (a JSON null, an Arrow null) is missing
            return column, missing
        bad = [v for v in array if not (isinstance(v, str) or v is None or _is_nan(v))]
        raise BadInput(f"{what}: expects strings, got {_quote(bad)} (numbers are not turned into text: "
                       "send them as strings)", "wrong_type")
    if array.size == 0:
        return array.astype(object), None
    raise BadInput(f"{what}: expects strings, got {_kind_name(array)}", "wrong_type")


def _booleans(array: np.ndarray, what: str) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "b" or array.size == 0:
        return array.astype(bool)
    if kind == "O" and all(v is None or type(v) in (bool, np.bool_) for v in array):
        return np.array([np.nan if v is None else float(v) for v in array])
    raise BadInput(f"{what}: expects true/false, got {_kind_name(array)}", "wrong_type")


def _numbers(array: np.ndarray, dtype: str, what: str) -> np.ndarray:
    kind, integer = array.dtype.kind, dtype == "int64"
    if kind == "O":
        allowed = (int,) if integer else (int, float, bool)
        bad = [v for v in array if not (v is None or type(v) in allowed or isinstance(v, np.number))]
        if bad:
            raise BadInput(f"{what}: expects {'integers' if integer else 'numbers'}, got {_quote(bad)}", "wrong_type")
        if integer and not any(v is None for v in array):
            try:
                return np.asarray(array.tolist(), dtype=np.int64)
            except OverflowError:
                raise BadInput(f"{what}: an integer is out of range for int64", "wrong_type") from None
        try:
            array = np.array([np.nan if v is None else v for v in array], dtype=np.float64)
        except OverflowError:
            raise BadInput(f"{what}: a number is out of range for float64", "wrong_type") from None
        kind = "f"
        if integer:  # integers with nulls: float64 with NaN, as pandas holds them
            return _finite(array, what)
    if kind in "US":
        raise BadInput(f"{what}: expects {'integers' if integer else 'numbers'}, got strings "
                       f"{_quote(array[:_QUOTED].tolist())}", "wrong_type")
    if integer:
        if kind == "f" and array.size and _whole_with_missing(array):
            return _finite(array, what)  # integers with missing values, as pandas reads them (CSV)
        if kind == "f" and array.size:
            raise BadInput(f"{what}: expects integers, got non-integer numbers (only integers are "
                           "taken as they are)", "wrong_type")
        if kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
            raise BadInput(f"{what}: an integer is out of range for int64", "wrong_type")
        return array.astype(np.int64)
    if kind not in "iufb" and array.size:
        raise BadInput(f"{what}: expects numbers, got {_kind_name(array)}", "wrong_type")
    with np.errstate(over="ignore"):
        return _finite(array.astype(np.float64, copy=False), what)


def _whole_with_missing(array: np.ndarray) -> bool:
    missing = np.isnan(array)
    present = array[~missing]
    return bool(missing.any()) and bool(np.all(np.isfinite(present) & (present == np.floor(present))))


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    if np.isinf(array).any():
        raise BadInput(f"{what}: non-finite values (Infinity) are not accepted", "non_finite")
    return array


def _missing_mask(column: np.ndarray) -> np.ndarray | None:
    if column.dtype.kind == "f":
        return np.isnan(column)
    if column.dtype.kind == "O":
        return _pandas().isna(column)
    return None


def _check_categories(column: np.ndarray, missing: np.ndarray | None, feature: Feature, what: str) -> None:
    present = column if missing is None else column[~missing]
    # pandas' hash table: a batch of a million rows is checked in C, with Python's equality
    unseen = present[~_pandas().Series(present, dtype=object, copy=False).isin(feature.categories).to_numpy()].tolist()
    if unseen:
        values = list(dict.fromkeys(unseen))
        raise BadInput(f"{what}: {_quote(values)} never seen in training; allowed values: "
                       f"{list(feature.categories)}", "unknown_category")


# Object arrays whose values are all of one flat kind (nulls aside), as pandas' C loop infers it.
_FLAT_KINDS = frozenset({"string", "empty", "integer", "floating", "boolean", "mixed-integer-float"})


def _object_kind(array: np.ndarray) -> str:
    return _pandas().api.types.infer_dtype(array, skipna=True)


def _pandas():
    """pandas, imported on first use: only object columns (text, or numbers with JSON nulls)
    need its C loops, so a request of plain numbers never imports it."""
    import pandas  # lazy: see the docstring

    return pandas


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _quote(values: list) -> str:
    shown = ", ".join(repr(v) for v in values[:_QUOTED])
    return f"[{shown}{', ...' if len(values) > _QUOTED else ''}]"


def _kind_name(array: np.ndarray) -> str:
    return {"U": "strings", "S": "strings", "b": "booleans", "i": "integers", "u": "integers",
            "f": "numbers"}.get(array.dtype.kind, str(array.dtype))
