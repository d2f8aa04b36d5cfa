"""Turning decoded JSON values into a validated 2-D feature matrix, without Python loops
over elements: numpy does the conversion in C, we only inspect the resulting dtype.

Input policy (docs/protocols.md):
- numbers only; strings (even numeric ones) are rejected with 400; JSON ``true``/``false``
  inside numeric data count as 1/0, as they do in Python;
- ``null`` means a missing value: accepted for runtimes that handle missing values natively
  (XGBoost), rejected with 400 for the others;
- non-finite values (``NaN``/``Infinity`` are not JSON; numbers too large for float64) are
  rejected with 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from serve_app.errors import BadInput
from serve_app.metadata import ModelMetadata
from serve_app.serving.interface import ModelInput


@dataclass(frozen=True)
class DecodedRequest:
    """What a protocol's request asks of a model: its rows, the outputs wanted (in order), the
    request's own id, echoed in the answer (V2), and how probabilities are presented."""

    inputs: ModelInput
    outputs: tuple[str, ...]
    request_id: Any = None
    classes: Any = None  # the labels probabilities are keyed by, when the client asked for that


def model_input(matrix: np.ndarray, meta: ModelMetadata) -> ModelInput:
    return ModelInput(tuple(meta.feature_names), matrix)


def as_float_matrix(values: Any, n_features: int, accepts_missing: bool, what: str) -> np.ndarray:
    """``values`` as a float64 array of shape (rows, n_features), or a BadInput saying why."""
    try:
        array = np.asarray(values)
    except ValueError:
        raise BadInput(f"{what}: rows have different lengths; each needs {n_features} features", "wrong_shape") from None
    if array.dtype.kind == "O":  # nulls, or a mix numpy could not type
        array = numbers_or_null(array, what)
    elif array.dtype.kind not in "iuf":
        kind = {"U": "strings", "S": "strings", "b": "booleans"}.get(array.dtype.kind, str(array.dtype))
        raise BadInput(f"{what}: values must be numbers, got {kind}", "wrong_type")
    array = array.astype(np.float64, copy=False)
    if array.ndim == 1 and array.size == n_features:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] != n_features:
        got = array.shape[1] if array.ndim == 2 else f"shape {list(array.shape)}"
        raise BadInput(f"{what}: expected {n_features} features per row, got {got}", "wrong_shape")
    return check_finite(array, accepts_missing, what)


def numbers_or_null(array: np.ndarray, what: str) -> np.ndarray:
    """An object array (JSON nulls among the values) as float64 with NaN for null.

    Only this rare path inspects elements one by one: numpy would otherwise turn numeric
    strings into numbers here."""
    if not all(v is None or type(v) in (int, float, bool) for v in array.reshape(-1)):
        raise BadInput(f"{what}: values must be numbers or null", "wrong_type")
    try:
        return array.astype(np.float64)
    except OverflowError:  # a Python int beyond float64 (orjson never makes one; json does)
        raise BadInput(f"{what}: a number is out of range for float64", "wrong_type") from None


def jsonable(array: np.ndarray):
    """What orjson can write: numeric arrays as they are, string labels as a list."""
    return array.tolist() if array.dtype.kind in "USO" else array


def check_finite(array: np.ndarray, accepts_missing: bool, what: str) -> np.ndarray:
    if array.shape[0] == 0:
        raise BadInput(f"{what}: no rows to predict", "wrong_shape")
    if array.dtype.kind == "f":
        if np.isinf(array).any():
            raise BadInput(f"{what}: non-finite values (Infinity) are not accepted", "non_finite")
        if not accepts_missing and np.isnan(array).any():
            raise BadInput(f"{what}: missing values (null/NaN) are not accepted by this model", "missing_value")
    return array
