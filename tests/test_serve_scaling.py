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

IRIS = datasets.load_iris().data


def _wait_for(predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def test_concurrent_single_rows_share_model_calls(serve_cluster):
    """N concurrent one-row requests are answered correctly in fewer than N model calls."""
    n = 48
    calls, rows = "ray_serve_app_model_calls_total", "ray_serve_app_batch_size_sum"
    before_calls = serve_cluster.metric_total(calls, model="iris")
    before_rows = serve_cluster.metric_total(rows, model="iris")
    X = IRIS[np.arange(n) * 3]

    with httpx.Client(base_url=serve_cluster.url, timeout=30,
                      limits=httpx.Limits(max_connections=n)) as client:
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait()
            return client.post("/v1/models/iris:predict", json={"instances": [X[i].tolist()]})

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(one, range(n)))

    expected = load_runtime(ModelStore(str(serve_cluster.store)), "iris").predict(X).tolist()
    assert [r.status_code for r in responses] == [200] * n
    assert [r.json()["predictions"][0] for r in responses] == expected

    # Ray exports metrics every second here; wait until all n rows are accounted for.
    seen_rows = _wait_for(
        lambda: serve_cluster.metric_total(rows, model="iris") - before_rows >= n, timeout=30)
    assert seen_rows, "batch-size metric never accounted for the requests"
    assert serve_cluster.metric_total(rows, model="iris") - before_rows == n
    model_calls = serve_cluster.metric_total(calls, model="iris") - before_calls
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
