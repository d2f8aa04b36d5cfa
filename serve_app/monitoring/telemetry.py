"""Per-model metrics, exported with Ray's own metrics (``ray.serve.metrics``) on Ray's
metrics port next to the built-in ``ray_serve_*`` series.

Ray prefixes every name with ``ray_`` and adds ``application``, ``deployment`` and
``replica`` labels; counters get a ``_total`` suffix. So ``serve_app_requests`` below is
scraped as ``ray_serve_app_requests_total``. :data:`METRICS` is the catalogue docs/monitoring.md's
table, the alert rules and the dashboards are written against.

Label values are bounded on purpose (model names that are served, fixed outcome/reason
vocabularies, class labels of the model): a client sending random model names must not be
able to create series. Metric objects are created on first use, once per process, and only in
a Serve replica: code outside one (unit tests, training, a notebook's driver) may call these
functions and exports nothing.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import ray
from ray.serve import context, metrics

from serve_app.errors import Overloaded
from serve_app.metadata import ModelMetadata, labels_from_probabilities

logger = logging.getLogger("ray.serve")

# Milliseconds resolved at the low end (a single-row tree model takes well under 1 ms).
LATENCY_BUCKETS_MS = [0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 75, 100, 150, 250, 500,
                      1000, 2500, 5000, 10000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
# Regression outputs: 1-2-5 steps from 0.001 to 500,000. Ray only accepts positive bucket
# boundaries, so values at or below 0.001 (negative ones included) share the first bucket.
# Ray observes one value per Python call: a model call adds at most this many predictions,
# evenly spaced, so a 1000-row request does not pay milliseconds for its histogram.
PREDICTION_SAMPLE = 64
PREDICTION_BUCKETS = [m * 10.0 ** e for e in range(-3, 6) for m in (1, 2, 5)]
UNKNOWN_MODEL = "(unknown)"


@dataclass(frozen=True)
class Metric:
    name: str       # as declared; scraped as ray_<name>[_total]
    kind: str       # counter | gauge | histogram
    tags: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def scraped_name(self) -> str:
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


METRICS = {m.name: m for m in (
    Metric("serve_app_requests", "counter", ("model", "version", "protocol", "code", "outcome"),
           "Inference and model-metadata requests by outcome (ok, client_error, server_error, shed)."),
    Metric("serve_app_request_latency_ms", "histogram", ("model", "protocol"),
           "Time from request arrival in the replica to the response, ms (decode, queue, model, encode); "
           "shed requests are not observed.",
           tuple(LATENCY_BUCKETS_MS)),
    Metric("serve_app_input_errors", "counter", ("model", "protocol", "reason"),
           "Rejected requests (4xx) by reason; see serve_app.errors.REASONS."),
    Metric("serve_app_model_calls", "counter", ("model", "version"),
           "Model invocations (one per batch)."),
    Metric("serve_app_batch_size", "histogram", ("model", "version"),
           "Rows per model invocation.", tuple(BATCH_BUCKETS)),
    Metric("serve_app_model_latency_ms", "histogram", ("model", "version"),
           "Time inside the model per invocation, ms.", tuple(LATENCY_BUCKETS_MS)),
    Metric("serve_app_predictions", "counter", ("model", "version", "class"),
           "Predicted rows by class (classification models)."),
    Metric("serve_app_prediction_value", "histogram", ("model", "version"),
           "Predicted values (regression models; up to 64 evenly spaced per model call); values <= 0.001 fall in the first bucket.",
           tuple(PREDICTION_BUCKETS)),
    Metric("serve_app_model_info", "gauge", ("model", "version", "framework", "sha256"),
           "The model a replica has loaded (value 1)."),
    Metric("serve_app_model_load_seconds", "gauge", ("model", "version"),
           "Seconds the replica took to fetch, verify and load the model."),
    Metric("serve_app_feature_drift_psi", "gauge", ("model", "version", "feature"),
           "Population Stability Index of the recent input window against training, per feature."),
    Metric("serve_app_drift_window_rows", "gauge", ("model", "version"),
           "Rows in the replica's drift window."),
    Metric("serve_app_shadow_requests", "counter", ("model", "version", "outcome"),
           "Requests mirrored to a shadow version: match / mismatch with the served answer, error, "
           "or dropped (too many shadows in flight)."),
    Metric("serve_app_shadow_latency_ms", "histogram", ("model", "version"),
           "Time a shadow version took to answer a mirrored request.", tuple(LATENCY_BUCKETS_MS)),
)}
SHADOW_OUTCOMES = ("match", "mismatch", "error", "dropped")


@functools.cache
def _objects():
    made = {}
    for m in METRICS.values():
        if m.kind == "counter":
            made[m.name] = metrics.Counter(m.name, m.help, tag_keys=m.tags)
        elif m.kind == "gauge":
            made[m.name] = metrics.Gauge(m.name, m.help, tag_keys=m.tags)
        else:
            made[m.name] = metrics.Histogram(m.name, m.help, list(m.buckets), tag_keys=m.tags)
    return made


_failure_logged = False


@functools.cache
def _in_replica() -> bool:
    """Metrics come from Serve replicas only: a driver (a test, a notebook) that builds a
    ModelWorker must not export series that look like a served model's. Asked once per
    process (a replica's context exists from its constructor on), not per request."""
    return context._get_internal_replica_context() is not None


def _emit(fn) -> None:
    global _failure_logged
    try:
        if not _in_replica():
            return
        fn(_objects())
    except Exception:  # metrics must never fail a request, but a broken metric must be seen (once)
        if not _failure_logged:
            _failure_logged = True
            logger.exception("metric update failed; later failures are not logged")


class _GaugeKeeper:
    """Re-sets every gauge value this process holds, twice per Ray metrics report interval.

    Ray (2.60) exports a gauge sample only for about two report intervals after it was set
    (a dead worker's series must age out), so a value set once - the loaded model's info
    and load time, the last PSI of a model without traffic - would vanish from Prometheus
    seconds later. A daemon thread keeps them alive for as long as the replica is.
    """

    def __init__(self):
        self._values: dict[tuple[str, tuple], float] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, objects: dict, name: str, value: float, tags: dict[str, str]) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(tags.items())))] = value
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="serve-app-gauges", daemon=True)
                self._thread.start()
        objects[name].set(value, tags=tags)

    def forget(self, objects: dict, labels: dict[str, str]) -> None:
        """Stop holding the gauges of one model version (unloaded): set to 0 once, then let
        Ray age them out."""
        with self._lock:
            dropped = [key for key in self._values
                       if all((k, v) in key[1] for k, v in labels.items())]
            for key in dropped:
                del self._values[key]
        for name, tags in dropped:
            objects[name].set(0, tags=dict(tags))

    def _run(self) -> None:
        period = max(ray._config.metrics_report_interval_ms(), 1000) / 2000.0
        while True:
            time.sleep(period)
            with self._lock:
                values = list(self._values.items())
            try:
                objects = _objects()
                for (name, tags), value in values:
                    objects[name].set(value, tags=dict(tags))
            except Exception:
                logger.exception("refreshing gauges failed")


_gauges = _GaugeKeeper()


class _CounterBuffer:
    """Counter increments summed in the process and handed to Ray a few times a second.

    A Ray metric update costs several microseconds of Python and C++ per call; a request
    makes several (its outcome, the model call, the predicted classes). Summed here, each
    series costs one update per flush however many requests it counted. Prometheus sees the
    same totals, at most ``FLUSH_S`` later (Ray itself exports every few seconds)."""

    FLUSH_S = 0.25

    def __init__(self):
        self._sums: Counter = Counter()  # (metric name, tag values in METRICS order) -> sum
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, name: str, values: tuple[str, ...], amount: float = 1) -> None:
        with self._lock:
            self._sums[(name, values)] += amount
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="serve-app-counters", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            sums, self._sums = self._sums, Counter()
        objects = _objects()
        for (name, values), amount in sums.items():
            objects[name].inc(amount, tags=dict(zip(METRICS[name].tags, values)))

    def _run(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            try:
                self.flush()
            except Exception:
                logger.exception("flushing counters failed")


_counters = _CounterBuffer()
# Loaded workers per (model, version) in this process (see ModelTelemetry.unloaded).
_loaded: Counter = Counter()
_loaded_lock = threading.Lock()


def _outcome(code: int, reason: str | None) -> str:
    if reason == Overloaded.reason:  # refused on purpose before any work (503): not an outage
        return "shed"
    return "ok" if code < 400 else "client_error" if code < 500 else "server_error"


class ModelTelemetry:
    """The metric updates of one loaded model, with its labels computed once."""

    def __init__(self, meta: ModelMetadata):
        self.meta = meta
        self.labels = {"model": meta.name, "version": meta.version}
        self._label_values = (meta.name, meta.version)

    def loaded(self, seconds: float) -> None:
        with _loaded_lock:
            _loaded[(self.meta.name, self.meta.version)] += 1

        def update(m):
            _gauges.set(m, "serve_app_model_info", 1, {**self.labels, "framework": self.meta.framework,
                                                       "sha256": self.meta.sha256})
            _gauges.set(m, "serve_app_model_load_seconds", seconds, dict(self.labels))
        _emit(update)

    def unloaded(self) -> None:
        """The model left this replica; its gauges go unless another worker loaded the same
        version (a reload of an unchanged version loads the new one before the old closes)."""
        key = (self.meta.name, self.meta.version)
        with _loaded_lock:
            _loaded[key] -= 1
            last = _loaded[key] <= 0
        if last:
            _emit(lambda m: _gauges.forget(m, self.labels))

    def called(self, rows: int, seconds: float, results: Mapping[str, np.ndarray]) -> None:
        def update(m):
            _counters.add("serve_app_model_calls", self._label_values)
            m["serve_app_batch_size"].observe(rows, tags=self.labels)
            m["serve_app_model_latency_ms"].observe(seconds * 1000.0, tags=self.labels)
            if self.meta.is_classifier:
                labels = results.get("predict")
                if labels is None:  # probabilities only: count the most likely class
                    labels = labels_from_probabilities(self.meta.classes, results["predict_proba"])
                for value, count in Counter(labels.tolist()).items():
                    _counters.add("serve_app_predictions", (*self._label_values, str(value)), count)
            elif "predict" in results:
                histogram = m["serve_app_prediction_value"]
                values = np.asarray(results["predict"], dtype=np.float64).reshape(-1)
                if values.size > PREDICTION_SAMPLE:
                    values = values[np.linspace(0, values.size - 1, PREDICTION_SAMPLE).astype(int)]
                for value in values.tolist():
                    histogram.observe(value, tags=self.labels)
        _emit(update)

    def drift(self, scores: Mapping[str, float], rows: int) -> None:
        def update(m):
            for feature, score in scores.items():
                _gauges.set(m, "serve_app_feature_drift_psi", score, {**self.labels, "feature": feature})
            _gauges.set(m, "serve_app_drift_window_rows", rows, dict(self.labels))
        _emit(update)


def shadow_done(model: str, version: str, outcome: str, seconds: float | None) -> None:
    """One mirrored request: ``outcome`` is SHADOW_OUTCOMES' match, mismatch, error or dropped."""
    def update(m):
        _counters.add("serve_app_shadow_requests", (model, version, outcome))
        if seconds is not None:
            m["serve_app_shadow_latency_ms"].observe(seconds * 1000.0, tags={"model": model, "version": version})
    _emit(update)


def request_done(model: str, version: str, protocol: str, code: int, seconds: float,
                 reason: str | None = None) -> None:
    """One finished request. ``model`` must be a served model's name or UNKNOWN_MODEL; ``reason``:
    an error's (client errors are counted by it too)."""
    outcome = _outcome(code, reason)

    def update(m):
        _counters.add("serve_app_requests", (model, version, protocol, str(code), outcome))
        if outcome != "shed":  # the latency of requests worked on, not of instant refusals
            m["serve_app_request_latency_ms"].observe(seconds * 1000.0, tags={"model": model, "protocol": protocol})
        if reason is not None and code < 500:
            _counters.add("serve_app_input_errors", (model, protocol, reason))
    _emit(update)
