"""The PSI drift method on real training data (sklearn's breast-cancer set): in-distribution
windows stay below the alert threshold, shifted ones cross it, and the ring buffer keeps
exactly the most recent rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris

from serve_app.monitoring.drift import PSI_ALERT_THRESHOLD, DriftMonitor, bin_shares, psi
from serve_app.metadata import Feature, ModelMetadata, reference_statistics


def metadata_for(X: np.ndarray, names: list[str]) -> ModelMetadata:
    return ModelMetadata(name="m", version="1", framework="sklearn", task="classification",
                         features=[Feature(n) for n in names], artifact="model.skops", sha256="0" * 64,
                         classes=[0, 1], reference_stats=reference_statistics(X, names))


@pytest.fixture(scope="module")
def cancer():
    data = load_breast_cancer()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.target))
    train, live = order[:400], order[400:]
    names = [n.replace(" ", "_") for n in data.feature_names]
    return metadata_for(data.data[train], names), data.data[train], data.data[live]


def test_psi_is_zero_for_identical_shares_and_grows_with_the_shift():
    expected = np.full(10, 0.1)
    assert psi(expected, expected) == pytest.approx(0.0)
    mild = np.array([0.08] * 5 + [0.12] * 5)
    strong = np.array([0.0] * 5 + [0.2] * 5)
    assert 0 < psi(expected, mild) < psi(expected, strong)
    assert np.isfinite(psi(expected, strong))  # empty bins are floored, not infinite


def test_values_outside_the_training_range_land_in_the_outer_bins():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    shares = bin_shares(np.array([-5.0, 0.5, 1.5, 2.5, 99.0, np.nan]), edges)
    assert shares.tolist() == [0.4, 0.2, 0.4]
    assert bin_shares(np.array([np.nan]), edges) is None


def test_in_distribution_window_stays_below_threshold(cancer):
    meta, _, live = cancer
    monitor = DriftMonitor(meta, window_rows=1000, min_rows=100)
    monitor.observe(live)
    scores = monitor.compute(monitor.snapshot())
    assert set(scores) == set(meta.feature_names)
    assert max(scores.values()) < PSI_ALERT_THRESHOLD, scores


def test_shifted_feature_crosses_threshold_and_only_that_one(cancer):
    meta, train, live = cancer
    shifted = live.copy()
    column = meta.feature_names.index("mean_radius")
    shifted[:, column] += 2 * train[:, column].std()
    monitor = DriftMonitor(meta, window_rows=1000, min_rows=100)
    monitor.observe(shifted)
    scores = monitor.compute(monitor.snapshot())
    assert scores["mean_radius"] > PSI_ALERT_THRESHOLD
    others = {k: v for k, v in scores.items() if k != "mean_radius"}
    assert max(others.values()) < PSI_ALERT_THRESHOLD


def test_ring_buffer_keeps_the_most_recent_rows_across_wraparound():
    X = load_iris().data
    meta = metadata_for(X, ["a", "b", "c", "d"])
    monitor = DriftMonitor(meta, window_rows=7, min_rows=1)
    seen = []
    for size in (3, 2, 4, 1, 9, 5):
        rows = np.arange(size * 4, dtype=np.float64).reshape(size, 4) + 1000 * len(seen)
        monitor.observe(rows)
        seen.extend(rows.tolist())
    window = monitor.snapshot()
    assert monitor.rows == 7
    assert sorted(window.tolist()) == sorted(seen[-7:])


def test_not_due_before_min_rows_or_interval():
    X = load_iris().data
    monitor = DriftMonitor(metadata_for(X, ["a", "b", "c", "d"]), window_rows=100, min_rows=50, interval_s=5)
    monitor.observe(X[:49])
    assert not monitor.due(now=1e12)
    monitor.observe(X[49:60])
    assert monitor.due(now=1e12)
    monitor.snapshot()                  # a computation starts now...
    assert not monitor.due()            # ...so the next is not due before interval_s


def test_window_zero_turns_drift_off():
    X = load_iris().data
    monitor = DriftMonitor(metadata_for(X, ["a", "b", "c", "d"]), window_rows=0)
    monitor.observe(X)
    assert not monitor.enabled and not monitor.due(now=1e12)

