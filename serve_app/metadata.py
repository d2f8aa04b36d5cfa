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


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: str = "float64"


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

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        self.version = str(self.version)
        self.features = [f if isinstance(f, Feature) else Feature(**f) for f in self.features]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetadata":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def labels_from_probabilities(classes, proba: np.ndarray) -> np.ndarray:
    """The most likely class of each row: columns of ``proba`` are ordered as ``classes``."""
    return np.asarray(classes)[np.argmax(proba, axis=1)]


def reference_statistics(X: np.ndarray, feature_names: list[str]) -> dict[str, dict[str, Any]]:
    """Summaries of each training feature: moments, range and decile bin edges with the
    share of training rows in each bin (the PSI reference)."""
    X = np.asarray(X, dtype=np.float64)
    stats: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(feature_names):
        column = X[:, j]
        edges = np.unique(np.quantile(column, REFERENCE_QUANTILES))
        if edges.size < 2:  # a constant feature: one bin holding every training row
            edges = np.array([edges[0], edges[0]])
        counts, _ = np.histogram(column, bins=edges)
        stats[name] = {
            "mean": float(column.mean()),
            "std": float(column.std()),
            "min": float(column.min()),
            "max": float(column.max()),
            "bin_edges": edges.tolist(),
            "bin_fractions": (counts / max(len(column), 1)).tolist(),
        }
    return stats
