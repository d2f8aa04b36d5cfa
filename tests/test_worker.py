"""ModelWorker's batching path on a real model outside Ray: which requests take the batching
queue. (Serve's batch queue itself runs only inside a replica: tests/test_serve_scaling.py.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from sklearn.datasets import load_iris

from serve_app.config import ModelSpec
from serve_app.runtimes import load_runtime
from serve_app.store import ModelStore
from serve_app.tools.train import ensure_models
from serve_app.serving.interface import ModelInput
from serve_app.serving.worker import ModelWorker


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(str(tmp_path_factory.mktemp("store")))
    ensure_models(store, ["iris"])
    return store


def rows(X) -> ModelInput:
    return ModelInput(tuple(load_iris().feature_names), X)


def counted_worker(store: ModelStore, **spec) -> tuple[ModelWorker, list[int], list[int]]:
    """A worker whose model calls (rows per call) and queue entries are recorded."""
    worker = ModelWorker(load_runtime(store, "iris", "latest"), ModelSpec(name="iris", **spec))
    calls, queued = [], []
    predict, batched = worker.runtime.predict, worker._batched

    def counting_predict(X):
        calls.append(X.shape[0])
        return predict(X)

    async def counting_batched(item):
        queued.append(item[0].rows)
        return await batched(item)

    worker.runtime.predict, worker._batched = counting_predict, counting_batched
    return worker, calls, queued


def test_a_lone_request_skips_the_queue_when_batches_do_not_wait(store):
    worker, calls, queued = counted_worker(store, batch_wait_timeout_s=0.0)
    X = load_iris().data[:3]

    async def one_at_a_time():
        return [await worker.infer(rows(X[i:i + 1]), ("predict",)) for i in range(3)]

    answers = asyncio.run(one_at_a_time())
    assert [a.outputs["predict"].tolist() for a in answers] == [[p] for p in worker.runtime.predict(X).tolist()]
    assert {a.version for a in answers} == {worker.meta.version}
    assert queued == [] and calls[:3] == [1, 1, 1]


def test_which_requests_take_the_queue(store):
    """The decision itself (the queue runs only in a replica: batching is tested live in
    test_serve_scaling.py, concurrent requests at the shipped wait 0 in test_fuzz_api.py's
    isolation test): a request queues when it could share a batch, that is, when others are
    pending, or when the config asks lone requests to wait for company."""
    one, full = rows(load_iris().data[:1]), rows(load_iris().data[:32])
    no_wait = ModelWorker(load_runtime(store, "iris", "latest"), ModelSpec(name="iris", batch_wait_timeout_s=0.0))
    waits = ModelWorker(load_runtime(store, "iris", "latest"), ModelSpec(name="iris", batch_wait_timeout_s=0.01))
    no_wait._pending = waits._pending = 1  # only the request being decided
    assert no_wait._skips_queue(one) and not waits._skips_queue(one)
    assert no_wait._skips_queue(full) and waits._skips_queue(full)
    no_wait._pending = 2  # another request is queued or at the model
    assert not no_wait._skips_queue(one) and no_wait._skips_queue(full)


def test_a_full_batch_never_queues(store):
    worker, calls, queued = counted_worker(store, batch_wait_timeout_s=0.5, max_batch_size=8)
    asyncio.run(worker.infer(rows(load_iris().data[:8]), ("predict",)))
    assert queued == [] and calls == [8]


def threads_of_calls(store: ModelStore, delay_s: float = 0.0, **spec) -> tuple[ModelWorker, list[str]]:
    """A worker whose model calls record the thread they ran on (and take ``delay_s``)."""
    import threading
    import time

    worker = ModelWorker(load_runtime(store, "iris", "latest"), ModelSpec(name="iris", **spec))
    threads, predict = [], worker.runtime.predict

    def recording_predict(X):
        threads.append(threading.current_thread().name)
        time.sleep(delay_s)
        return predict(X)

    worker.runtime.predict = recording_predict
    return worker, threads


def sequential(worker: ModelWorker, n: int, X) -> list:
    async def run():
        return [await worker.infer(rows(X), ("predict",)) for _ in range(n)]
    return asyncio.run(run())


def test_quick_small_calls_move_onto_the_event_loop_once_measured(store):
    # A limit no call here reaches, so that how fast this machine is does not matter; the
    # first call (a cold start) is not measured, the second is.
    worker, threads = threads_of_calls(store, inline_below_ms=10_000)
    sequential(worker, 5, load_iris().data[:1])
    assert all(t.startswith("model-iris") for t in threads[:2]) and threads[2:] == ["MainThread"] * 3


def test_slow_models_large_requests_and_inline_off_stay_on_the_model_thread(store):
    slow, slow_threads = threads_of_calls(store, delay_s=0.003)  # 3 ms a call: above inline_below_ms
    sequential(slow, 3, load_iris().data[:1])
    assert all(t.startswith("model-iris") for t in slow_threads)

    big, big_threads = threads_of_calls(store, max_batch_size=4)
    sequential(big, 3, load_iris().data[:5])  # larger than a batch
    assert all(t.startswith("model-iris") for t in big_threads)

    off, off_threads = threads_of_calls(store, inline_below_ms=0)
    sequential(off, 3, load_iris().data[:1])
    assert all(t.startswith("model-iris") for t in off_threads)
