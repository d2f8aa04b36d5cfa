"""What a stored model says about itself.

The metadata file travels next to the artifact (``<store>/<name>/<version>/model.json``).
Everything the serving path needs to validate input and describe the model (feature names
and dtypes, class labels, task) lives here, so the server never has to introspect a
framework object to answer a metadata request. The artifact's sha256 is recorded here and
checked on every load; the training-feature reference statistics are kept for drift
monitoring.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METADATA_FILE = "model.json"
TASKS = ("classification", "regression")
# Decile edges give ten equal-mass bins on the training data: the reference distribution
# that population-stability (PSI) drift checks compare live traffic against.
REFERENCE_QUANTILES = tuple(np.linspace(0.0, 1.0, 11).round(2).tolist())


# A feature's type, as the model saw it in training (docs/your-own-model.md#the-schema):
# numbers, booleans, free strings, and categories (a string or pandas category column whose
# allowed values are known: the fitted encoder's, or the training categories).
FEATURE_TYPES = ("float64", "int64", "bool", "string", "category")
NUMERIC_TYPES = ("float64", "int64")
# What the runtime is handed: one float64 matrix (numeric models: the fast path), or a pandas
# DataFrame with the training dtypes (models fitted on a DataFrame that need one).
INPUT_FORMS = ("matrix", "frame")


class MetadataError(ValueError):
    """A stored metadata document this server does not accept (unknown fields, wrong types)."""


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: str = "float64"
    # Allowed values of a "category" column (a "string" column may list them too, when its
    # encoder knows them): anything else is refused unless the model allows unknown values.
    categories: list | None = None
    # Whether the column had missing values in training (then null is a legal input).
    nullable: bool = False
    # A "category" column becomes pandas' category dtype (XGBoost's native categoricals need
    # it); a "string" column stays plain strings (object), as a ColumnTransformer saw it.

    def __post_init__(self) -> None:
        if self.dtype not in FEATURE_TYPES:
            raise ValueError(f"feature {self.name!r}: dtype must be one of {FEATURE_TYPES}, got {self.dtype!r}")

    @property
    def is_numeric(self) -> bool:
        return self.dtype in NUMERIC_TYPES

    @property
    def is_textual(self) -> bool:
        """String or category: BYTES on the V2 wire."""
        return self.dtype in ("string", "category")


@dataclass
class ModelMetadata:
    name: str
    version: str
    framework: str
    task: str
    features: list[Feature]
    artifact: str
    sha256: str
    classes: list[Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    reference_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    input_form: str = "matrix"
    # "allow": values outside a column's categories reach the model (say, a OneHotEncoder with
    # handle_unknown="ignore"); "reject": they are a 400 naming column, value and allowed values.
    unknown_categories: str = "reject"
    # A few training rows as JSON records: the metadata's and /docs' example request.
    example: list[dict[str, Any]] = field(default_factory=list)
    # Library versions the model was fitted and published with.
    libraries: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.input_form not in INPUT_FORMS:
            raise ValueError(f"input_form must be one of {INPUT_FORMS}, got {self.input_form!r}")
        if self.unknown_categories not in ("reject", "allow"):
            raise ValueError(f'unknown_categories must be "reject" or "allow", got {self.unknown_categories!r}')
        self.version = str(self.version)
        self.features = [f if isinstance(f, Feature) else Feature(**f) for f in self.features]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def is_tabular(self) -> bool:
        """Whether the runtime gets a DataFrame (``input_form`` "frame") rather than a matrix."""
        return self.input_form == "frame"

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetadata":
        """The metadata a stored document describes, or MetadataError. The schema is closed: a
        field this server does not know is refused, not skipped, because a stored file must
        never widen how its model loads (a ``trusted_types`` list beside a model approving its
        own types: the server's configuration alone decides that)."""
        if not isinstance(data, dict):
            raise MetadataError(f"metadata must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MetadataError(f"unknown metadata fields {unknown}: refusing the model (loading is decided by "
                                "the server's configuration, never by fields stored beside a model)")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:  # a missing field, a feature with unknown keys, a bad value
            raise MetadataError(f"invalid metadata: {exc}") from None


def labels_from_probabilities(classes, proba: np.ndarray) -> np.ndarray:
    """The most likely class of each row: columns of ``proba`` are ordered as ``classes``."""
    return np.asarray(classes)[np.argmax(proba, axis=1)]


def reference_statistics(X: np.ndarray, feature_names: list[str]) -> dict[str, dict[str, Any]]:
    """Summaries of each training feature: moments, range and decile bin edges with the
    share of training rows in each bin (the PSI reference)."""
    X = np.asarray(X, dtype=np.float64)
    return {name: numeric_reference(X[:, j]) for j, name in enumerate(feature_names)}


def numeric_reference(column: np.ndarray) -> dict[str, Any]:
    """One numeric column's moments, range and decile bins (missing values left out)."""
    column = np.asarray(column, dtype=np.float64)
    column = column[~np.isnan(column)]
    if column.size == 0:
        return {}
    edges = np.unique(np.quantile(column, REFERENCE_QUANTILES))
    if edges.size < 2:  # a constant feature: one bin holding every training row
        edges = np.array([edges[0], edges[0]])
    counts, _ = np.histogram(column, bins=edges)
    return {
        "mean": float(column.mean()),
        "std": float(column.std()),
        "min": float(column.min()),
        "max": float(column.max()),
        "bin_edges": edges.tolist(),
        "bin_fractions": (counts / max(len(column), 1)).tolist(),
    }


def categorical_reference(values: list, categories: list) -> dict[str, Any]:
    """One category column's training shares per category (missing values left out): the PSI
    reference of category columns, whose live shares get one more bin for unseen values."""
    index = {c: i for i, c in enumerate(categories)}
    counts = np.zeros(len(categories) + 1)
    seen = 0
    for value in values:
        if is_missing(value):
            continue
        counts[index.get(value, len(categories))] += 1
        seen += 1
    return {"categories": list(categories),
            "category_fractions": (counts[:-1] / max(seen, 1)).tolist(),
            "mode": categories[int(np.argmax(counts[:-1]))] if categories else None}


def is_missing(value: Any) -> bool:
    """None, or a float NaN (pandas' missing value in object and float columns)."""
    return value is None or (isinstance(value, float) and value != value)
