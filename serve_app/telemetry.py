"""Per-model metrics, exported with Ray's own metrics (``ray.serve.metrics``) on Ray's
metrics port, next to the built-in ``ray_serve_*`` series.

Metric objects are created lazily, once per process, so importing this module is free and
code outside a Ray worker (unit tests, training) can call these functions harmlessly.
"""

from __future__ import annotations

import functools
import logging

from serve_app.metadata import ModelMetadata

logger = logging.getLogger("serve_app")

LATENCY_BUCKETS_MS = [0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


@functools.cache
def _metrics():
    try:
        from ray.serve import metrics
    except ImportError:  # pragma: no cover - ray is a hard dependency
        return None
    tags = ("model", "version")
    return {
        "calls": metrics.Counter(
            "serve_app_model_calls", "Model invocations (one per batch).", tag_keys=tags),
        "batch": metrics.Histogram(
            "serve_app_batch_size", "Rows per model invocation.", BATCH_BUCKETS, tag_keys=tags),
        "latency": metrics.Histogram(
            "serve_app_model_latency_ms", "Time inside the model per invocation, ms.",
            LATENCY_BUCKETS_MS, tag_keys=tags),
        "requests": metrics.Counter(
            "serve_app_requests", "Inference requests by outcome.",
            tag_keys=("model", "protocol", "code")),
        "info": metrics.Gauge(
            "serve_app_model_info", "Loaded model (value 1).",
            tag_keys=("model", "version", "framework", "sha256")),
    }


def _emit(fn) -> None:
    try:
        m = _metrics()
        if m is not None:
            fn(m)
    except Exception:  # metrics must never fail a request
        logger.debug("metric update failed", exc_info=True)


def model_loaded(meta: ModelMetadata) -> None:
    _emit(lambda m: m["info"].set(1, tags={"model": meta.name, "version": meta.version,
                                            "framework": meta.framework, "sha256": meta.sha256}))


def model_call(labels: dict, rows: int, seconds: float) -> None:
    def update(m):
        m["calls"].inc(1, tags=labels)
        m["batch"].observe(rows, tags=labels)
        m["latency"].observe(seconds * 1000.0, tags=labels)
    _emit(update)


def request_done(model: str, protocol: str, code: int) -> None:
    _emit(lambda m: m["requests"].inc(1, tags={"model": model, "protocol": protocol, "code": str(code)}))
