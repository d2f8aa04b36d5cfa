"""Publish a fitted model to the store in one call: ``from serve_app import publish``.

    publish(model, "churn", sample=X_train)

The sample (the training rows) gives the schema: feature names and order, each column's type
(float, int, bool, string, category with its allowed values), which columns may be missing,
the reference statistics drift is measured against, and a stored example request. The model
gives the framework, the task and the class labels. Nothing is published that the server
could not serve exactly: the artifact is loaded back through the serving runtime, the sample's
rows are sent through the same validation a request gets (as JSON records), and the answers
must equal the in-memory model's, row by row (docs/your-own-model.md).
"""

from __future__ import annotations

import json
from importlib import metadata as _dist
from typing import Any, Sequence

import numpy as np
import orjson
import pandas as pd
import xgboost as xgb
from pandas.api import types
from sklearn.base import is_classifier, is_regressor
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder
from sklearn.utils.validation import check_is_fitted

from serve_app.codecs.tables import from_records
from serve_app.metadata import (Feature, ModelMetadata, categorical_reference, is_missing, numeric_reference)
from serve_app.runtimes import ArtifactError, UnsupportedOutput, runtime_for
from serve_app.store import DEFAULT_STORE, ModelStore, VersionExists, check_segment, store_from_environment

# Rows of the sample the published artifact is checked on (all of them, up to this many).
CHECK_ROWS = 2000
EXAMPLE_ROWS = 3
# Served numbers must equal the in-memory model's to within rounding noise.
FLOAT_RTOL, FLOAT_ATOL = 1e-9, 1e-12
_LIBRARIES = {"scikit-learn": "sklearn", "xgboost": "xgboost", "numpy": "numpy", "skops": "skops",
              "pandas": "pandas"}


class PublishError(ValueError):
    """The model cannot be published as it is: the message says what to change."""


def publish(model: Any, name: str, sample: Any, *, store: str | ModelStore | None = None,
            version: str | None = None, metrics: dict[str, float] | None = None, description: str = "",
            classes: Sequence[Any] | None = None, unknown_categories: str | None = None,
            replace: bool = False) -> ModelMetadata:
    """Write ``model`` as a new version of ``name`` (the next one unless ``version``) and
    return its metadata.

    ``model``: a fitted scikit-learn estimator or Pipeline, an ``XGBClassifier``/``XGBRegressor``
    or an XGBoost ``Booster``. ``sample``: its training rows, a pandas DataFrame or a numpy
    array. ``classes``: the original labels of an XGBoost classifier, in class-index order (say
    ``LabelEncoder().classes_``; XGBoost itself only knows 0..k-1). ``unknown_categories``:
    "allow" lets values outside a column's training categories reach the model, "reject" makes
    them a 400; by default "allow" exactly when every encoder of the model ignores unknown values.
    ``store``: a path or ``s3://`` URI (default ``SERVE_APP_STORE``, else ``./model_store``).
    A published version is never changed: an existing ``version`` is refused unless
    ``replace`` (for rebuilding a store, such as the demo training does).
    """
    check_segment("name", name)
    target = store if isinstance(store, ModelStore) else ModelStore(store or store_from_environment() or DEFAULT_STORE)
    framework, task, fitted = _describe(model)
    frame = _as_frame(sample, _feature_names(model, sample))
    features = _features(frame, model, framework)
    labels = _classes(model, framework, task, classes)
    policy = unknown_categories or _unknown_policy(model, framework)
    runtime_cls = runtime_for(framework)
    metadata = ModelMetadata(
        name=name, version=str(version) if version is not None else target.next_version(name),
        framework=framework, task=task, features=features, artifact=runtime_cls.artifact_name, sha256="",
        classes=labels, metrics=dict(metrics or {}), description=description,
        reference_stats=_reference_stats(frame, features),
        input_form="matrix", unknown_categories=policy,
        example=_records(frame.head(EXAMPLE_ROWS)), libraries=_library_versions(),
    )
    check_segment("version", metadata.version)
    if not replace and metadata.version in target.versions(name):
        raise PublishError(f"{name} version {metadata.version} exists in {target.backend}; a published version "
                           "is never changed: publish a new one (version=None), or pass replace=True")
    artifact = runtime_cls.serialize(fitted)
    metadata.input_form = _input_form(runtime_cls, artifact, metadata, fitted, frame, sample)
    if version is None:  # the next free number at the moment of writing (another publish may take this one)
        return target.add_version(metadata, artifact)
    try:
        return target.save(metadata, artifact, replace=replace)
    except VersionExists as exc:
        raise PublishError(f"{exc}; a published version is never changed: publish a new one (version=None), "
                           "or pass replace=True") from None


# -- what the model is -----------------------------------------------------------------------
def _describe(model: Any) -> tuple[str, str, Any]:
    """(framework, task, the object to serialise)."""
    if isinstance(model, (xgb.Booster, xgb.XGBModel)):
        if isinstance(model, xgb.XGBModel):
            _require_fitted(model, "get_booster")
            if not isinstance(model, (xgb.XGBClassifier, xgb.XGBRegressor)):
                raise PublishError(f"{type(model).__name__} is not served: publish an XGBClassifier, "
                                   "XGBRegressor or a Booster")
        return "xgboost", _xgboost_task(_booster(model)), model
    if not hasattr(model, "predict"):
        raise PublishError(f"{type(model).__name__} has no predict(): publish a fitted scikit-learn estimator or "
                           "Pipeline, an XGBClassifier/XGBRegressor or a Booster")
    try:
        check_is_fitted(model)
    except Exception as exc:
        raise PublishError(f"the model is not fitted: {exc}") from None
    if is_classifier(model):
        return "sklearn", "classification", model
    if is_regressor(model):
        return "sklearn", "regression", model
    raise PublishError(f"{type(model).__name__} is neither a classifier nor a regressor")


# XGBoost objectives whose output the server can serve as it is: class probabilities, or a value.
PROBABILITY_OBJECTIVES = ("binary:logistic", "multi:softprob")
VALUE_OBJECTIVE_PREFIXES = ("reg:", "count:", "survival:")


def _xgboost_task(booster) -> str:
    """Classification for objectives that output probabilities, regression for those that
    output a value; the rest (class indexes, raw margins, hinge labels, rankings) would be
    served as something they are not, so they are refused."""
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    if objective in PROBABILITY_OBJECTIVES:
        return "classification"
    if objective.startswith(VALUE_OBJECTIVE_PREFIXES):
        return "regression"
    raise PublishError(f"XGBoost objective {objective!r} is not served: its output is not class probabilities "
                       f"or a value; train classifiers with {' or '.join(PROBABILITY_OBJECTIVES)}")


def _require_fitted(model, method: str) -> None:
    try:
        getattr(model, method)()
    except Exception as exc:
        raise PublishError(f"the model is not fitted: {exc}") from None


def _booster(model):
    return model.get_booster() if hasattr(model, "get_booster") else model


def _feature_names(model: Any, sample: Any) -> list[str] | None:
    """Names the model was fitted with, if it knows them."""
    names = getattr(model, "feature_names_in_", None)
    if names is None and (hasattr(model, "get_booster") or hasattr(model, "save_config")):
        names = _booster(model).feature_names
    return [str(n) for n in names] if names is not None else None


def _as_frame(sample: Any, model_names: list[str] | None):
    """The sample as a DataFrame in the model's feature order (numpy arrays get the model's
    names, else x0, x1, ...)."""

    if isinstance(sample, pd.DataFrame):
        frame = sample
        if model_names is not None:
            missing = [n for n in model_names if n not in frame.columns]
            if missing:
                raise PublishError(f"the sample lacks columns the model was fitted on: {missing}")
            frame = frame[model_names]
        frame = frame.reset_index(drop=True)
        frame.attrs["from_numpy"] = False
    else:
        array = np.asarray(sample)
        if array.ndim != 2:
            raise PublishError(f"the sample must be a table (2-D), got shape {list(array.shape)}")
        if array.dtype.kind not in "biuf":
            raise PublishError("a numpy sample must be numeric; send a DataFrame for string or category columns")
        names = model_names or [f"x{j}" for j in range(array.shape[1])]
        if len(names) != array.shape[1]:
            raise PublishError(f"the model has {len(names)} features, the sample {array.shape[1]} columns")
        frame = pd.DataFrame(array.astype(np.float64), columns=names)
        frame.attrs["from_numpy"] = True
    if len(frame) == 0:
        raise PublishError("the sample has no rows")
    bad = [c for c in frame.columns if not isinstance(c, str)]
    if bad:
        raise PublishError(f"column names must be strings, got {bad[:5]}")
    return frame


# -- the schema -------------------------------------------------------------------------------
def _features(frame, model: Any, framework: str) -> list[Feature]:

    encoded = _encoder_categories(model) if framework == "sklearn" else {}
    features = []
    for name in frame.columns:
        column = frame[name]
        nullable = bool(column.isna().any())
        if isinstance(column.dtype, pd.CategoricalDtype):
            categories = [_plain(c) for c in column.cat.categories]
            features.append(Feature(name, "category", categories, nullable))
        elif types.is_bool_dtype(column.dtype):
            features.append(Feature(name, "bool", None, nullable))
        elif types.is_integer_dtype(column.dtype) and not frame.attrs.get("from_numpy"):
            features.append(Feature(name, "int64", None, nullable))
        elif types.is_numeric_dtype(column.dtype):
            features.append(Feature(name, "float64", None, nullable))
        elif types.is_string_dtype(column.dtype) or column.dtype == object:
            values = column.dropna()
            if not all(isinstance(v, str) for v in values):
                kinds = sorted({type(v).__name__ for v in values})
                raise PublishError(f"column {name!r} holds {', '.join(kinds)} values in an object column; give it "
                                   "one type (strings for text, a numeric or bool dtype otherwise)")
            if framework == "xgboost":
                raise PublishError(f"column {name!r} holds strings: XGBoost takes categories as pandas' category "
                                   f"dtype (sample[{name!r}].astype('category')) and enable_categorical=True")
            features.append(Feature(name, "string", encoded.get(name), nullable))
        else:
            raise PublishError(f"column {name!r} has dtype {column.dtype}, which is not served "
                               "(numbers, booleans, strings and categories are)")
    return features


def _encoder_categories(model: Any) -> dict[str, list]:
    """Column -> the values its fitted encoder knows (OneHotEncoder/OrdinalEncoder inside a
    ColumnTransformer, however deep in pipelines), missing values left out."""
    found: dict[str, list] = {}
    for transformer, columns in _column_transformers(model):
        encoder = _last_encoder(transformer)
        if encoder is None or not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns):
            continue
        for column, categories in zip(columns, encoder.categories_):
            found[column] = [_plain(c) for c in categories if not is_missing(_plain(c))]
    return found


def _column_transformers(model: Any):
    """(fitted transformer, its columns) of every ColumnTransformer in ``model``."""
    if isinstance(model, Pipeline):
        for _, step in model.steps:
            yield from _column_transformers(step)
    elif isinstance(model, ColumnTransformer):
        for _, transformer, columns in model.transformers_:
            if transformer not in ("drop", "passthrough"):
                yield transformer, columns


def _last_encoder(transformer: Any):
    steps = [s for _, s in transformer.steps] if isinstance(transformer, Pipeline) else [transformer]
    encoders = [s for s in steps if isinstance(s, (OneHotEncoder, OrdinalEncoder))]
    return encoders[-1] if encoders else None


def _unknown_policy(model: Any, framework: str) -> str:
    """"allow" when every encoder of string columns handles values it never saw."""
    if framework != "sklearn":
        return "reject"
    encoders = [e for t, _ in _column_transformers(model) if (e := _last_encoder(t)) is not None]
    tolerant = [getattr(e, "handle_unknown", "error") in ("ignore", "infrequent_if_exist", "use_encoded_value")
                for e in encoders]
    return "allow" if tolerant and all(tolerant) else "reject"


def _classes(model: Any, framework: str, task: str, classes: Sequence[Any] | None) -> list | None:
    if task != "classification":
        if classes is not None:
            raise PublishError("classes= is for classifiers; this model is a regressor")
        return None
    if framework == "xgboost":
        count = _xgboost_class_count(_booster(model))
        labels = list(classes) if classes is not None else list(range(count))
        if len(labels) != count:
            raise PublishError(f"the model has {count} classes, classes= names {len(labels)}")
        return [_plain(c) for c in labels]
    fitted = [_plain(c) for c in model.classes_]
    if classes is not None and [_plain(c) for c in classes] != fitted:
        raise PublishError(f"classes= {list(classes)} differs from the model's own classes_ {fitted}")
    return fitted


def _xgboost_class_count(booster) -> int:
    config = json.loads(booster.save_config())["learner"]
    return max(int(config["learner_model_param"].get("num_class", "0")), 2)


def _reference_stats(frame, features: list[Feature]) -> dict[str, dict]:
    stats = {}
    for feature in features:
        column = frame[feature.name]
        if feature.is_textual:
            categories = feature.categories
            if categories is None:
                categories = sorted({v for v in column.dropna()}, key=str)
            stats[feature.name] = categorical_reference([_plain(v) for v in column.tolist()], categories)
        else:
            values = column.to_numpy(dtype=np.float64, na_value=np.nan)
            if reference := numeric_reference(values):
                stats[feature.name] = reference
    return stats


def _input_form(runtime_cls, artifact: bytes, metadata: ModelMetadata, model, frame, sample) -> str:
    """"matrix" when the served model answers a float matrix exactly as the in-memory model
    answers the sample (numeric features: the fast path), else "frame"; a PublishError
    naming the difference when neither does."""
    rows = frame.head(CHECK_ROWS)
    expected = _in_memory_answers(model, metadata, sample, rows)
    numeric = all(f.is_numeric for f in metadata.features)
    failures = []
    for form in (("matrix", "frame") if numeric else ("frame",)):
        metadata.input_form = form
        try:
            served = _served_answers(runtime_cls, artifact, metadata, rows)
        except Exception as exc:
            if isinstance(exc, ArtifactError):
                raise PublishError(f"the stored artifact cannot be loaded by the server: {exc}") from None
            failures.append(f"as a {form}: {type(exc).__name__}: {exc}")
            continue
        difference = _difference(expected, served)
        if difference is None:
            return form
        failures.append(f"as a {form}: {difference}")
    raise PublishError("the served model would not answer exactly as the model in memory; "
                       + "; ".join(failures))


def _in_memory_answers(model, metadata: ModelMetadata, sample, rows) -> dict[str, np.ndarray]:
    data = rows
    if rows.attrs.get("from_numpy"):
        data = np.asarray(sample)[:len(rows)]
    elif _feature_names(model, None) is None:  # fitted on an array: predict on one
        data = rows.to_numpy(dtype=np.float64)
    if hasattr(model, "inplace_predict") and not hasattr(model, "get_booster"):  # a Booster
        raw = np.asarray(model.inplace_predict(data))
        if not metadata.is_classifier:
            return {"predict": raw.astype(np.float64)}
        proba = np.column_stack([1 - raw, raw]) if raw.ndim == 1 else raw
        return {"predict_proba": proba.astype(np.float64),
                "predict": np.asarray(metadata.classes, dtype=object)[np.argmax(proba, axis=1)]}
    if not metadata.is_classifier:
        return {"predict": np.asarray(model.predict(data), dtype=np.float64)}
    answers = {"predict": np.asarray(model.predict(data))}
    if metadata.framework == "xgboost":  # labels are class indexes: name them
        answers["predict"] = np.asarray(metadata.classes, dtype=object)[answers["predict"].astype(int)]
    if hasattr(model, "predict_proba"):
        answers["predict_proba"] = np.asarray(model.predict_proba(data), dtype=np.float64)
    return answers


def _served_answers(runtime_cls, artifact: bytes, metadata: ModelMetadata, rows) -> dict[str, np.ndarray]:
    """The answers the server would give: the artifact loaded by its runtime, the rows sent
    as JSON records through the request validation."""
    runtime = runtime_cls.load(artifact, metadata)
    records = orjson.loads(orjson.dumps(_records(rows), option=orjson.OPT_SERIALIZE_NUMPY))
    inputs = from_records(records, metadata, runtime.accepts_missing, "sample")
    X = runtime.prepare(inputs.data)
    answers = {"predict": np.asarray(runtime.predict(X))}
    if metadata.is_classifier:
        try:
            answers["predict_proba"] = np.asarray(runtime.predict_proba(X), dtype=np.float64)
        except UnsupportedOutput:
            pass
    return answers


def _difference(expected: dict[str, np.ndarray], served: dict[str, np.ndarray]) -> str | None:
    for output, want in expected.items():
        got = served.get(output)
        if got is None:
            return f"the server gives no {output}"
        if want.shape != got.shape:
            return f"{output} has shape {list(got.shape)} served, {list(want.shape)} in memory"
        if output == "predict_proba" or want.dtype.kind == "f":
            want_f, got_f = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
            gap = np.abs(want_f - got_f)
            # Floating-point noise (a matrix product summed in another memory order) is not a
            # difference; anything above it is.
            if not np.allclose(got_f, want_f, rtol=FLOAT_RTOL, atol=FLOAT_ATOL, equal_nan=True):
                row = int(np.unravel_index(np.nanargmax(gap), gap.shape)[0])
                return (f"{output} differs by up to {float(np.nanmax(gap)):.3g} (row {row}: served "
                        f"{np.asarray(got)[row].tolist()}, in memory {np.asarray(want)[row].tolist()})")
        else:
            unequal = np.nonzero([_plain(a) != _plain(b) for a, b in zip(want.tolist(), got.tolist())])[0]
            if unequal.size:
                row = int(unequal[0])
                return (f"{output} differs on {unequal.size} rows (row {row}: served {got[row]!r}, "
                        f"in memory {want[row]!r})")
    return None


# -- small helpers ------------------------------------------------------------------------------
def _records(frame) -> list[dict[str, Any]]:
    """Rows as JSON-ready records: Python scalars, None for missing."""
    return [{k: (None if is_missing(v := _plain(value)) else v) for k, value in row.items()}
            for row in frame.to_dict(orient="records")]


def _plain(value: Any) -> Any:
    """A numpy/pandas scalar as the Python value JSON carries."""
    if isinstance(value, np.generic):
        return value.item()
    if value is not None and not isinstance(value, (str, int, float, bool)):
        try:
            if pd.isna(value):
                return None
        except (TypeError, ValueError):
            pass
    return value


def _library_versions() -> dict[str, str]:
    versions = {}
    for distribution, key in _LIBRARIES.items():
        try:
            versions[key] = _dist.version(distribution)
        except _dist.PackageNotFoundError:
            try:
                versions[key] = _dist.version(f"{distribution}-cpu")
            except _dist.PackageNotFoundError:
                pass
    return versions

