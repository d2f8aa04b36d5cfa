"""Dynamic batching and replica autoscaling, observed on the live cluster through Ray's own
metrics export and Serve's own status, never through the app's word."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from sklearn import datasets

from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore

pytestmark = pytest.mark.serve



def _wait_for(predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def _settled(read, quiet_s: float = 3.0, timeout: float = 60.0) -> float:
    """A metric's value once Ray's exporter has stopped changing it for ``quiet_s``."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = read()
        if current != value:
            value, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    return value


def test_concurrent_single_rows_share_model_calls(serve_cluster):
    """N concurrent one-row requests are answered correctly in fewer than N model calls.

    ``wine`` is served only for this test (see conftest), so its counters count exactly
    these requests."""
    n = 48
    calls = lambda: serve_cluster.metric_total("ray_serve_app_model_calls_total", model="wine")
    batches = lambda: serve_cluster.metric_total("ray_serve_app_batch_size_count", model="wine")
    before_calls, before_batches = calls(), batches()
    X = datasets.load_wine().data[np.arange(n) * 3]

    with httpx.Client(base_url=serve_cluster.url, timeout=30,
                      limits=httpx.Limits(max_connections=n)) as client:
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait()
            return client.post("/v1/models/wine:predict", json={"instances": [X[i].tolist()]})

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(one, range(n)))

    expected = load_runtime(ModelStore(str(serve_cluster.store)), "wine").predict(X).tolist()
    assert [r.status_code for r in responses] == [200] * n
    assert [r.json()["predictions"][0] for r in responses] == expected

    assert _wait_for(lambda: calls() > before_calls, timeout=30), "no model call was ever exported"
    model_calls = _settled(calls) - before_calls
    assert _settled(batches) - before_batches == model_calls  # one batch-size sample per call
    assert 1 <= model_calls < n, f"{n} requests took {model_calls} model calls: no batching"


def _running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["models"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_dedicated_model_scales_up_under_load_and_back_down(serve_cluster):
    config = next(d for d in serve_cluster.config["applications"][0]["deployments"]
                  if d["name"] == "model-diabetes")["autoscaling_config"]
    low, high = config["min_replicas"], config["max_replicas"]
    assert _wait_for(lambda: _running_replicas("model-diabetes") == low, timeout=60)

    stop = threading.Event()
    failures: list[int] = []
    body = {"instances": datasets.load_diabetes().data[:8].tolist()}

    def load():
        with httpx.Client(base_url=serve_cluster.url, timeout=30) as client:
            while not stop.is_set():
                response = client.post("/v1/models/diabetes:predict", json=body)
                if response.status_code != 200:
                    failures.append(response.status_code)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(24)]
    for t in threads:
        t.start()
    try:
        scaled_up = _wait_for(lambda: _running_replicas("model-diabetes") >= high, timeout=90)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert scaled_up, f"model-diabetes never reached {high} replicas under load"
    assert failures == [], f"requests failed while scaling: {failures[:5]}"
    assert _wait_for(lambda: _running_replicas("model-diabetes") == low, timeout=120), \
        "model-diabetes did not scale back down after the load stopped"
