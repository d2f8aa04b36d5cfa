"""Models that already exist as files, published by ``serve-app publish`` (docs/your-own-model-cli.md).

An artifact is loaded only in a way that cannot run code the server would refuse:

- XGBoost ``.json``/``.ubj``: XGBoost's own formats, data only.
- ``.skops``: its types are read from the file's schema first and checked against the
  server's trusted-type list; a file holding any other type is refused before skops builds
  anything from it, since the server would refuse to load it anyway.
- ``.joblib``/``.pkl``/``.pickle``: unpickling runs whatever code the file names, so these are
  refused, without opening the file, unless the person running the command says
  ``--allow-pickle``; the model is then unpickled once, here, and stored through
  :func:`serve_app.publish` as skops or UBJSON: the server never unpickles.

The sample (CSV or Parquet) is the training rows, the schema's source. CSV carries no types,
so columns an XGBoost model treats as categories become pandas categories with the
categories the booster stores (its own training values, in its own order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import joblib
import pandas as pd
import pyarrow
import skops.io as sio
import xgboost as xgb

from serve_app.metadata import ModelMetadata
from serve_app.publishing import PublishError, publish
from serve_app.runtimes.sklearn import trusted_types
from serve_app.store import ModelStore, check_segment

XGBOOST_SUFFIXES = (".json", ".ubj")
SKOPS_SUFFIXES = (".skops",)
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
TRUST_ENV = "SERVE_APP_SKOPS_TRUSTED_TYPES"


def publish_file(artifact: Path, name: str, sample: Path, *, store: ModelStore, version: str | None = None,
                 classes: Sequence[str] | None = None, allow_pickle: bool = False, description: str = "",
                 unknown_categories: str | None = None) -> ModelMetadata:
    """Load the model in ``artifact`` and its training rows in ``sample``, then publish them.

    Names are checked first, so a typo costs no loading; every refusal is a PublishError."""
    _check_segment("name", name)
    if version is not None:
        _check_segment("version", version)
    model = load_model(artifact, allow_pickle=allow_pickle)
    frame = load_sample(sample, model)
    return publish(model, name, frame, store=store, version=version, description=description,
                   classes=classes, unknown_categories=unknown_categories)


def _check_segment(kind: str, value: str) -> None:
    try:
        check_segment(kind, value)
    except ValueError as exc:
        raise PublishError(str(exc)) from None


# -- the model ----------------------------------------------------------------------------------
def load_model(path: Path, *, allow_pickle: bool = False) -> Any:
    """The model in ``path``, by its extension; the checks of each format come before its
    loader sees the file."""
    suffix = _existing(path, "model").suffix.lower()
    if suffix in XGBOOST_SUFFIXES:
        return _load_xgboost(path)
    if suffix in SKOPS_SUFFIXES:
        return _load_skops(path)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, allow_pickle)
    known = ", ".join(XGBOOST_SUFFIXES + SKOPS_SUFFIXES + PICKLE_SUFFIXES)
    raise PublishError(f"{path}: unknown model file extension {path.suffix!r}; expected one of {known}")


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PublishError(f"{path}: no such {what} file")
    return path


def _load_xgboost(path: Path) -> xgb.Booster:
    # libxgboost aborts the whole process on an empty buffer instead of raising.
    if path.stat().st_size == 0:
        raise PublishError(f"{path}: the file is empty, not an XGBoost model")
    booster = xgb.Booster()
    try:
        booster.load_model(str(path))
    except xgb.core.XGBoostError as exc:
        raise PublishError(f"{path}: not a readable XGBoost model: {_first_line(exc)}") from None
    return booster


def _first_line(exc: Exception) -> str:
    """XGBoost's messages end in a C++ stack trace: the first line says what is wrong."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _load_skops(path: Path) -> Any:
    """Refuse the file when it holds a type the server does not trust, before skops
    instantiates anything; else load it trusting exactly the types it names."""
    try:
        untrusted = sorted(sio.get_untrusted_types(file=path))
    except Exception as exc:  # any failure to read the schema means it is no skops file
        raise PublishError(f"{path}: not a readable skops file: {exc}") from None
    refused = sorted(set(untrusted) - trusted_types())
    if refused:
        raise PublishError(
            f"{path} holds types the server does not trust: {refused}. Nothing was loaded. If you have "
            f"audited them (they run code when loaded), allow them here and on the server with "
            f"{TRUST_ENV}={','.join(refused)}")
    try:
        return sio.load(path, trusted=untrusted)
    except Exception as exc:  # a trusted type whose module is missing here, a damaged member, ...
        raise PublishError(f"{path}: skops could not load it: {type(exc).__name__}: {exc}") from None


def _load_pickle(path: Path, allow_pickle: bool) -> Any:
    if not allow_pickle:
        raise PublishError(
            f"{path}: refusing to unpickle it: loading a pickle (or joblib) file runs whatever code the "
            "file names, so only do it for a file you made or trust. Pass --allow-pickle to unpickle it "
            "once, here; it is stored as skops (scikit-learn) or UBJSON (XGBoost), never as a pickle, so "
            "the server does not unpickle it. Better still: save the model with skops.io.dump (.skops) "
            "or XGBoost's save_model (.ubj)")
    try:
        return joblib.load(path)
    except Exception as exc:  # unpickling fails in as many ways as the code it runs
        raise PublishError(f"{path}: could not unpickle it: {type(exc).__name__}: {exc}") from None


# -- the sample ---------------------------------------------------------------------------------
def load_sample(path: Path, model: Any) -> pd.DataFrame:
    """The training rows in ``path`` (CSV or Parquet), with the category columns ``model``
    needs as pandas categories."""
    return _with_model_categories(_read_table(_existing(path, "sample")), model)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:
        known = ", ".join(CSV_SUFFIXES + PARQUET_SUFFIXES)
        raise PublishError(f"{path}: unknown sample file extension {path.suffix!r}; expected one of {known}")
    try:
        return pd.read_csv(path) if suffix in CSV_SUFFIXES else pd.read_parquet(path)
    except (ValueError, OSError, UnicodeError, pyarrow.ArrowException) as exc:
        raise PublishError(f"{path}: cannot read the sample: {exc}") from None


def _with_model_categories(frame: pd.DataFrame, model: Any) -> pd.DataFrame:
    """``frame`` with every column the XGBoost model marks categorical ('c') as a category
    column, on the booster's own categories when it stores them: the codes XGBoost sees are
    then the training ones, even when the sample lacks a value or orders them otherwise."""
    wanted = _categorical_columns(model, list(frame.columns))
    if not wanted:
        return frame
    frame = frame.copy()
    for column, categories in wanted.items():
        if column in frame.columns:
            frame[column] = _as_category(frame[column], categories)
    return frame


def _categorical_columns(model: Any, columns: list[str]) -> dict[str, list | None]:
    """Column -> its training categories (None when the booster does not store them), for
    each column an XGBoost model treats as categorical. Boosters without feature names
    take the sample's columns in order, as publish() does."""
    booster = model.get_booster() if isinstance(model, xgb.XGBModel) else model
    if not isinstance(booster, xgb.Booster) or not booster.feature_types:
        return {}
    names = booster.feature_names or columns
    stored = _stored_categories(booster)
    return {name: stored.get(name) for name, kind in zip(names, booster.feature_types) if kind == "c"}


def _stored_categories(booster: xgb.Booster) -> dict[str, list]:
    """The categories XGBoost (3.1 and later) saves with a model fitted on category columns."""
    try:
        exported = booster.get_categories(export_to_arrow=True).to_arrow()
    except (ValueError, xgb.core.XGBoostError):  # an older model: no categories stored
        return {}
    return {name: values.to_pylist() for name, values in exported or [] if values is not None}


def _as_category(column: pd.Series, categories: list | None) -> pd.Series:
    """``column`` as a category column; a value outside the training categories is refused,
    not silently turned into a missing value."""
    if categories is None:
        return column if isinstance(column.dtype, pd.CategoricalDtype) else column.astype("category")
    unknown = sorted(set(column.dropna().unique().tolist()) - set(categories), key=str)
    if unknown:
        raise PublishError(f"sample column {column.name!r} has values the model was not trained on: "
                           f"{unknown[:5]} (its categories: {categories[:20]})")
    return column.astype(pd.CategoricalDtype(categories))
