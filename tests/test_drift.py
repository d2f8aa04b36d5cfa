"""The PSI drift method on real training data (sklearn's breast-cancer set, the churn demo's
mixed-type table): in-distribution windows stay below the alert threshold, shifted ones cross
it, category columns drift through their shares and an unseen-value bin, and the ring buffer
keeps exactly the most recent rows."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from sklearn.datasets import load_breast_cancer, load_iris

from serve_app.codecs import tables
from serve_app.metadata import Feature, ModelMetadata, reference_statistics
from serve_app.monitoring.drift import PSI_ALERT_THRESHOLD, DriftMonitor, bin_shares, psi
from serve_app.runtimes import accepts_missing
from serve_app.store import ModelStore
from serve_app.tools.train import churn_table, table_split, train_model


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



# -- category columns (the churn demo: string columns with known categories, a boolean) -------------
TEXT = ["plan", "region", "contract"]


@pytest.fixture(scope="module")
def churn(tmp_path_factory):
    """The churn model's metadata (unknown categories allowed) and its held-out rows."""
    meta = train_model("churn", ModelStore(str(tmp_path_factory.mktemp("store"))))
    assert meta.unknown_categories == "allow"
    return meta, table_split("churn").X_test


def churn_scores(meta, frame, batch=100):
    """PSI per feature after observing ``frame`` as requests of ``batch`` validated records."""
    monitor = DriftMonitor(meta, window_rows=len(frame), min_rows=100)
    for start in range(0, len(frame), batch):
        records = orjson.loads(frame.iloc[start:start + batch].to_json(orient="records"))
        monitor.observe(tables.from_records(records, meta, accepts_missing(meta)))
    return monitor.compute(monitor.snapshot())


def test_category_columns_in_distribution_stay_low(churn):
    meta, rows = churn
    for frame in (rows, churn_table(rows=1000, seed=7)[0]):  # held-out rows; a fresh draw
        scores = churn_scores(meta, frame)
        assert set(scores) == set(meta.feature_names)
        assert max(scores[c] for c in TEXT) < 0.05, scores
        assert max(scores.values()) < PSI_ALERT_THRESHOLD, scores


def test_a_shifted_category_mix_crosses_the_threshold_and_only_there(churn):
    meta, rows = churn
    scores = churn_scores(meta, rows.assign(plan="premium"))
    assert scores["plan"] > PSI_ALERT_THRESHOLD
    assert max(v for k, v in scores.items() if k != "plan") < PSI_ALERT_THRESHOLD


def test_unseen_values_raise_the_psi_through_their_own_bin(churn):
    meta, rows = churn
    plan = rows["plan"].copy()
    plan.iloc[::10] = "enterprise"  # never seen in training; the model ignores it, drift does not
    scores = churn_scores(meta, rows.assign(plan=plan))
    assert scores["plan"] > PSI_ALERT_THRESHOLD
    reference = meta.reference_stats["plan"]
    live = [float((plan == c).mean()) for c in reference["categories"]] + [float((plan == "enterprise").mean())]
    assert scores["plan"] == pytest.approx(psi(reference["category_fractions"] + [0.0], live))


def test_missing_values_are_left_out(churn):
    meta, rows = churn
    region = rows["region"].copy()
    region.iloc[::2] = None  # half the rows: missing, which the column had in training
    scores = churn_scores(meta, rows.assign(region=region))
    present = rows.assign(region=region)[region.notna().to_numpy()]
    assert scores["region"] == pytest.approx(churn_scores(meta, present)["region"])
    assert scores["region"] < PSI_ALERT_THRESHOLD
    assert "region" not in churn_scores(meta, rows.assign(region=None))  # nothing left: no score


def test_a_boolean_column_drifts_over_its_two_values(churn):
    """A boolean's training deciles are all 0 or 1 (one bin): its two values are its bins."""
    meta, rows = churn
    assert churn_scores(meta, rows)["paperless_billing"] < 0.05
    assert churn_scores(meta, rows.assign(paperless_billing=True))["paperless_billing"] > PSI_ALERT_THRESHOLD
