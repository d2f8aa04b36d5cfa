"""Input drift: the Population Stability Index (PSI) of recent inputs against the training data.

Method (docs/monitoring.md): at training time every feature's decile edges and the share of
training rows in each decile are stored in the model metadata
(:func:`serve_app.metadata.reference_statistics`). At serving time each replica keeps the most
recent ``window_rows`` input rows in a ring buffer; every ``interval_s`` seconds, off the
request path, it bins the window with the same edges (values outside the training range fall
into the first or last bin) and computes, per feature::

    PSI = sum_over_bins (actual - expected) * ln(actual / expected)

with both shares floored at ``EPSILON`` so empty bins stay finite. Missing values (NaN, which
XGBoost models accept) are left out. Rule of thumb, used by the alert: below 0.1 no shift,
0.1-0.2 moderate, above ``PSI_ALERT_THRESHOLD`` (0.2) a significant shift. A window smaller
than ``min_rows`` reports nothing: with few rows the sampling noise alone would look like drift
(with N rows and 10 bins, in-distribution PSI is about 9/N on average).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from serve_app.metadata import ModelMetadata

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


@dataclass(frozen=True)
class FeatureReference:
    name: str
    edges: np.ndarray
    shares: np.ndarray


class DriftMonitor:
    """Per-replica sliding window of inputs and the PSI of each feature against training.

    :meth:`observe` is the only call on the request path: one vectorised copy into a
    preallocated ring buffer. :meth:`snapshot` copies the window (on the event loop, so it is
    consistent), and :meth:`compute` does the binning anywhere (a worker thread).
    """

    def __init__(self, meta: ModelMetadata, window_rows: int = 1000, min_rows: int = 200,
                 interval_s: float = 10.0):
        self.references = [
            FeatureReference(f.name, np.asarray(meta.reference_stats[f.name]["bin_edges"], dtype=np.float64),
                             np.asarray(meta.reference_stats[f.name]["bin_fractions"], dtype=np.float64))
            for f in meta.features
            if f.name in meta.reference_stats
        ]
        self.columns = [meta.feature_names.index(r.name) for r in self.references]
        self.enabled = bool(self.references) and window_rows > 0
        self.window_rows, self.min_rows, self.interval_s = window_rows, min_rows, interval_s
        self._buffer = np.empty((max(window_rows, 1), len(meta.features)), dtype=np.float64)
        self._next = 0      # where the next row goes
        self._filled = 0    # rows held (<= window_rows)
        self._last_compute = time.monotonic()
        self.computing = False

    def observe(self, X: np.ndarray) -> None:
        if not self.enabled:
            return
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
            shares = bin_shares(window[:, column], ref.edges)
            if shares is not None:
                scores[ref.name] = psi(ref.shares, shares)
        return scores

    @property
    def rows(self) -> int:
        return self._filled
