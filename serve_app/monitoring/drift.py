"""Input drift: the Population Stability Index (PSI) of recent inputs against the training data.

Method (docs/monitoring.md): at training time every feature's decile edges and the share of
training rows in each decile are stored in the model metadata
(:func:`serve_app.metadata.reference_statistics`). At serving time each replica keeps the most
recent ``window_rows`` input rows in a ring buffer; every ``interval_s`` seconds, off the
request path, it bins the window with the same edges (values outside the training range fall
into the first or last bin) and computes, per feature::

    PSI = sum_over_bins (actual - expected) * ln(actual / expected)

with both shares floored at ``EPSILON`` so empty bins stay finite. Missing values (NaN, which
XGBoost models accept; null in a nullable column) are left out. Category and string columns with
known categories get the same PSI over their categories' shares, plus one bin for values never
seen in training (empty in training, so its live share alone raises the PSI: 10% unseen values
give about 0.7); booleans get it over their two values. Rule of thumb, used by the alert: below
0.1 no shift, 0.1-0.2 moderate, above ``PSI_ALERT_THRESHOLD`` (0.2) a significant shift. A
window smaller than ``min_rows`` reports nothing: with few rows the sampling noise alone would
look like drift (with N rows and 10 bins, in-distribution PSI is about 9/N on average).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from serve_app.metadata import Feature, ModelMetadata

EPSILON = 1e-4
PSI_ALERT_THRESHOLD = 0.2


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI between two bin-share vectors of the same length."""
    e = np.clip(np.asarray(expected, dtype=np.float64), EPSILON, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), EPSILON, None)
    return float(np.sum((a - e) * np.log(a / e)))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray | None:
    """Share of ``values`` (NaN dropped) in each bin given by the reference ``edges``;
    ``None`` when no value is left."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    n_bins = len(edges) - 1
    # Inner edges only: below the training minimum -> first bin, above the maximum -> last bin.
    # side="right" matches np.histogram's [left, right) bins used for the reference shares.
    index = np.searchsorted(edges[1:-1], values, side="right")
    return np.bincount(index, minlength=n_bins) / values.size


def category_shares(codes: np.ndarray, bins: int) -> np.ndarray | None:
    """Share of each category index (NaN, missing, dropped; the last bin: unseen values)."""
    codes = codes[~np.isnan(codes)]
    if codes.size == 0:
        return None
    return np.bincount(codes.astype(np.int64), minlength=bins) / codes.size


@dataclass(frozen=True)
class FeatureReference:
    """A numeric feature's decile ``edges`` and training ``shares``; a categorical one's
    ``categories`` and training shares, with one more bin, always 0 in training, for values
    never seen in training."""

    name: str
    shares: np.ndarray
    edges: np.ndarray | None = None
    categories: tuple | None = None


def _reference(feature: Feature, stats: dict) -> FeatureReference | None:
    name = feature.name
    if feature.dtype == "bool" and "mean" in stats:
        # A boolean's deciles are all 0 or 1: one bin that every value falls in, blind to any
        # shift. Its two values are its bins; the stored mean is the training share of true.
        return FeatureReference(name, np.array([1.0 - stats["mean"], stats["mean"]]),
                                edges=np.array([0.0, 0.5, 1.0]))
    if "bin_edges" in stats:
        return FeatureReference(name, np.asarray(stats["bin_fractions"], dtype=np.float64),
                                edges=np.asarray(stats["bin_edges"], dtype=np.float64))
    if "categories" in stats:
        return FeatureReference(name, np.append(np.asarray(stats["category_fractions"], dtype=np.float64), 0.0),
                                categories=tuple(stats["categories"]))
    return None


class DriftMonitor:
    """Per-replica sliding window of inputs and the PSI of each feature against training.

    :meth:`observe` is the only call on the request path: one vectorised copy into a
    preallocated ring buffer (category columns are held as the index of their category,
    ``len(categories)`` for an unseen value, NaN for a missing one). :meth:`snapshot` copies
    the window (on the event loop, so it is consistent), and :meth:`compute` does the binning
    anywhere (a worker thread).
    """

    def __init__(self, meta: ModelMetadata, window_rows: int = 1000, min_rows: int = 200,
                 interval_s: float = 10.0):
        self.references = [ref for f in meta.features
                           if (ref := _reference(f, meta.reference_stats.get(f.name, {}))) is not None]
        self.columns = [meta.feature_names.index(r.name) for r in self.references]
        self.enabled = bool(self.references) and window_rows > 0
        self.window_rows, self.min_rows, self.interval_s = window_rows, min_rows, interval_s
        self._buffer = np.empty((max(window_rows, 1), len(meta.features)), dtype=np.float64)
        self._next = 0      # where the next row goes
        self._filled = 0    # rows held (<= window_rows)
        self._last_compute = time.monotonic()
        self.computing = False
        self._encoders = None  # column -> category index, built on the first frame

    def observe(self, inputs) -> None:
        """Keep the rows of a ``ModelInput`` (or a float matrix) in the window."""
        if not self.enabled:
            return
        X = inputs if isinstance(inputs, np.ndarray) else inputs.matrix
        if X is None:
            X = self._encode(inputs.columns, inputs.rows)
        self._append(X)

    def _encode(self, columns, rows: int) -> np.ndarray:
        """The window's share of typed columns as numbers: numeric columns as floats, category
        columns as indexes."""
        import pandas as pd  # only mixed-type models pay for pandas

        if self._encoders is None:
            self._encoders = {ref.name: pd.Index(ref.categories) for ref in self.references if ref.categories}
        take = min(rows, self.window_rows)
        X = np.full((take, self._buffer.shape[1]), np.nan)
        for ref, column in zip(self.references, self.columns):
            values = np.asarray(columns[ref.name])[-take:]
            if ref.categories is None:  # numbers and booleans: typed by the codec
                X[:, column] = values.astype(np.float64)
                continue
            index = self._encoders[ref.name].get_indexer(values).astype(np.float64)
            index[index < 0] = len(ref.categories)
            index[pd.isna(values)] = np.nan
            X[:, column] = index
        return X

    def _append(self, X: np.ndarray) -> None:
        rows = X[-self.window_rows:]
        n = rows.shape[0]
        end = self._next + n
        if end <= self.window_rows:
            self._buffer[self._next:end] = rows
        else:  # wrap around the end of the ring
            split = self.window_rows - self._next
            self._buffer[self._next:] = rows[:split]
            self._buffer[:n - split] = rows[split:]
        self._next = end % self.window_rows
        self._filled = min(self._filled + n, self.window_rows)

    def due(self, now: float | None = None) -> bool:
        """Whether a new PSI computation should start now."""
        now = time.monotonic() if now is None else now
        return (self.enabled and not self.computing and self._filled >= self.min_rows
                and now - self._last_compute >= self.interval_s)

    def snapshot(self) -> np.ndarray:
        self._last_compute = time.monotonic()
        return self._buffer[:self._filled].copy()

    def compute(self, window: np.ndarray) -> dict[str, float]:
        """PSI per feature for a window of rows (features in model order)."""
        scores = {}
        for ref, column in zip(self.references, self.columns):
            values = window[:, column]
            shares = (bin_shares(values, ref.edges) if ref.categories is None
                      else category_shares(values, len(ref.shares)))
            if shares is not None:
                scores[ref.name] = psi(ref.shares, shares)
        return scores

    @property
    def rows(self) -> int:
        return self._filled
