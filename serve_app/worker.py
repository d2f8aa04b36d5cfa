"""A loaded model plus its dynamic-batching queue: the one place a model is called.

The same :class:`ModelWorker` runs inside the HTTP ingress replica (the default: no
DeploymentHandle hop on the request path) or inside a dedicated per-model deployment
(:class:`DedicatedModel`, for models that need their own replicas, autoscaling and
resources). Requests are queued with ``@serve.batch`` and sized in rows, so many
single-row requests share one model call while a large request runs on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from ray import serve

from serve_app.codecs.tensors import EXPLANATION_OUTPUTS
from serve_app.config import ModelSpec, MultiplexSpec
from serve_app.drift import DriftMonitor
from serve_app.runtimes import ModelRuntime, load_runtime
from serve_app.store import ModelStore
from serve_app.telemetry import ModelTelemetry

logger = logging.getLogger("ray.serve")


_EXPLANATION = frozenset(EXPLANATION_OUTPUTS)


def _rows(items: Sequence[tuple[np.ndarray, tuple[str, ...]]]) -> int:
    return sum(x.shape[0] for x, _ in items)


class ModelWorker:
    def __init__(self, runtime: ModelRuntime, spec: ModelSpec, load_seconds: float = 0.0):
        self.runtime = runtime
        self.meta = runtime.meta
        self.spec = spec
        self.accepts_missing = runtime.accepts_missing
        self.telemetry = ModelTelemetry(self.meta)
        self.drift = DriftMonitor(self.meta, **spec.drift.model_dump())
        # The model runs on a thread of its own, never on the event loop: a slow or stuck
        # model cannot freeze the replica (timeouts fire, health checks and other models answer).
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix=f"model-{self.meta.name}")
        self._closed = False
        self._pending = 0  # requests inside _predict (queued or at the model); event loop only
        self._probe = self._reference_row()
        self._batched = serve.batch(
            max_batch_size=spec.max_batch_size,
            batch_wait_timeout_s=spec.batch_wait_timeout_s,
            batch_size_fn=_rows,
        )(self._run_batch)
        self.telemetry.loaded(load_seconds)

    @classmethod
    def from_store(cls, store: ModelStore, spec: ModelSpec) -> "ModelWorker":
        started = time.perf_counter()
        runtime = load_runtime(store, spec.name, spec.version)
        return cls(runtime, spec, time.perf_counter() - started)

    def reconfigure(self, spec: ModelSpec) -> None:
        """Apply new batching and drift settings without reloading the model."""
        if spec.drift != self.spec.drift:
            self.drift = DriftMonitor(self.meta, **spec.drift.model_dump())
        self.spec = spec
        self._batched.set_max_batch_size(spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    def close(self) -> None:
        """Release the model's thread and stop reporting it (replaced, or evicted from a
        multiplexed replica). Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._model_thread.shutdown(wait=False)
            self.telemetry.unloaded()

    def __del__(self) -> None:  # Serve's multiplexing calls it on eviction
        try:
            self.close()
        except Exception:
            pass

    def _compute(self, X: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        results = {}
        if "predict_proba" in outputs and self.meta.is_classifier:
            proba = np.asarray(self.runtime.predict_proba(X), dtype=np.float64)
            results["predict_proba"] = proba
            if "predict" in outputs:  # derive labels from the probabilities: one model call
                results["predict"] = np.asarray(self.meta.classes)[np.argmax(proba, axis=1)]
        elif "predict" in outputs:
            pred = np.asarray(self.runtime.predict(X))
            results["predict"] = pred if self.meta.is_classifier else pred.astype(np.float64)
        self.telemetry.called(X.shape[0], time.perf_counter() - started, results)
        return results

    async def _on_model_thread(self, fn, *args):
        """``fn(*args)`` on this model's own thread, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def _compute_off_loop(self, X: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return await self._on_model_thread(self._compute, X, outputs)

    async def _run_batch(self, items: list[tuple[np.ndarray, tuple[str, ...]]]) -> list[dict]:
        if len(items) == 1:
            return [await self._compute_off_loop(*items[0])]
        wanted = tuple(dict.fromkeys(o for _, outs in items for o in outs))
        try:
            results = await self._compute_off_loop(np.concatenate([x for x, _ in items]), wanted)
        except Exception:
            # One request's rows broke the shared call (say, a huge value overflowing inside a
            # pipeline): answer each request on its own, so only the one that caused it fails.
            return [await self._alone(x, outs) for x, outs in items]
        answers, start = [], 0
        for x, outs in items:
            stop = start + x.shape[0]
            answers.append({o: results[o][start:stop] for o in outs})
            start = stop
        return answers

    async def _alone(self, X: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray] | Exception:
        """One request's answer, or its exception as a value: a batch result is per request."""
        try:
            return await self._compute_off_loop(X, outputs)
        except Exception as exc:
            return exc

    async def infer(self, X: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        self.drift.observe(X)
        if self.drift.due():
            self._start_drift_update()
        if not _EXPLANATION.isdisjoint(outputs):
            results = await self._infer_with_explanation(X, outputs)
        else:
            results = await self._predict(X, outputs)
        results["model_version"] = self.meta.version  # which version answered (see RemoteWorker)
        return results

    async def _predict(self, X: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        self._pending += 1
        try:
            if self._skips_queue(X):
                return await self._compute_off_loop(X, outputs)
            answer = await self._batched((X, outputs))
        finally:
            self._pending -= 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _skips_queue(self, X: np.ndarray) -> bool:
        """A request that could share no batch goes straight to the model: one that is already a
        full batch, and, when batches do not wait, one that finds the model idle (the queue would
        call the model with it alone, after a few more event-loop turns: 16 % of the requests/s
        of one client in bench's no-batching lever). Under load requests find others pending
        and queue as before."""
        if X.shape[0] >= self.spec.max_batch_size:
            return True
        return self.spec.batch_wait_timeout_s == 0 and self._pending == 1  # only this request

    async def _infer_with_explanation(self, X: np.ndarray, outputs: tuple[str, ...]) -> dict:
        """Explanations are heavier than predictions and have their own shape: they run on the
        model thread directly, not through the batching queue; predictions asked alongside do."""
        explanation = await self._on_model_thread(self.runtime.explain, X)
        results = {"contributions": explanation.contributions, "bias": explanation.bias,
                   "explanation_info": {"outputs": explanation.outputs, "method": explanation.method,
                                        "margin_kind": explanation.margin_kind}}
        rest = tuple(o for o in outputs if o not in _EXPLANATION)
        if rest:
            results.update(await self._predict(X, rest))
        return results

    def _reference_row(self) -> np.ndarray:
        """One typical input (training means) for health probes."""
        stats = self.meta.reference_stats
        return np.array([[stats.get(f, {}).get("mean", 0.0) for f in self.meta.feature_names]])

    async def check(self) -> None:
        """Raise unless the model still predicts: one row through the model, outside the
        batching queue (Serve calls this from ``check_health`` and replaces a replica that fails)."""
        async with asyncio.timeout(self.spec.timeout_s):
            result = await self._on_model_thread(self.runtime.predict, self._probe)
        if np.asarray(result).shape[0] != 1:
            raise RuntimeError(f"model {self.meta.name!r} answered a one-row probe with {result!r}")

    def _start_drift_update(self) -> None:
        """PSI of the current window, computed in a thread: the request does not wait."""
        window = self.drift.snapshot()
        self.drift.computing = True

        def run() -> None:
            try:
                self.telemetry.drift(self.drift.compute(window), window.shape[0])
            except Exception:
                logger.exception("drift computation failed for model %s", self.meta.name)
            finally:
                self.drift.computing = False

        asyncio.get_running_loop().run_in_executor(None, run)


def load_versions(store: ModelStore, spec: ModelSpec) -> dict[str, ModelWorker]:
    """A worker for each live version label of ``spec``; labels naming the same stored
    version (``latest`` and ``"3"``) share one loaded model."""
    by_version: dict[str, ModelWorker] = {}
    workers = {}
    for label in spec.live_versions:
        version = store.resolve_version(spec.name, label)
        if version not in by_version:
            by_version[version] = ModelWorker.from_store(store, spec.for_version(version))
        workers[label] = by_version[version]
    return workers


def distinct(workers) -> list:
    """Each worker once: several version labels ("latest", "3") can share one loaded model."""
    return list({id(w): w for w in workers}.values())


def replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


# max_surge_percent: start the new replica before stopping the old one (see ModelServer).
@serve.deployment(name="DedicatedModel", max_ongoing_requests=64, max_surge_percent=25)
class DedicatedModel:
    """A model (each of its live versions) in a deployment of its own, reached by a handle.

    Costs one DeploymentHandle hop per request (measured in the README), in exchange for
    its own replicas, autoscaling and ``ray_actor_options``. Batching settings come from
    the model spec and can change through ``user_config`` without a restart.
    """

    def __init__(self, store_uri: str, spec: ModelSpec):
        from serve_app.reloads import ReloadWatcher

        self.store, self.spec = ModelStore(store_uri), spec
        self._set_workers(load_versions(self.store, spec))
        self._watcher = ReloadWatcher(serve.get_replica_context().app_name, replica_id(),
                                      lambda: [spec.name], self._reload)

    def _set_workers(self, workers: dict[str, ModelWorker]) -> None:
        self.workers, self._by_version = workers, {w.meta.version: w for w in workers.values()}

    async def _reload(self, _name: str) -> None:
        old = self.workers
        self._set_workers(await asyncio.get_running_loop().run_in_executor(None, load_versions, self.store, self.spec))
        close_later(old.values(), self.spec.timeout_s)

    def reconfigure(self, user_config: dict) -> None:
        self.spec = self.spec.model_copy(update=user_config)
        for worker in distinct(self.workers.values()):
            worker.reconfigure(worker.spec.model_copy(update=user_config))

    async def infer(self, X: np.ndarray, outputs: tuple[str, ...], label: str | None = None) -> dict[str, np.ndarray]:
        """``label`` is the version the ingress chose. During a rollout an ingress with the new
        config can reach a replica with the old one (or the reverse): a label this replica does
        not have gets its default version, and the answer names the version that computed it."""
        self._watcher.start()
        worker = self.workers.get(label) or self._by_version.get(label) or self.workers[self.spec.version]
        return await worker.infer(X, outputs)

    async def check_health(self) -> None:
        self._watcher.start()
        for worker in distinct(self.workers.values()):
            await worker.check()


def close_later(workers, after_s: float) -> None:
    """Close replaced workers once requests already holding them have had time to finish."""
    unique = distinct(workers)
    asyncio.get_running_loop().call_later(after_s + 1.0, lambda: [w.close() for w in unique])


@serve.deployment(name="MultiplexedModels", max_ongoing_requests=64, max_surge_percent=25)
class MultiplexedModels:
    """The long tail: any stored model, loaded on first use into a replica's LRU cache.

    Serve's model multiplexing routes a model id (``name:version:generation``) to a replica
    that already holds it where it can; a replica holding ``max_models_per_replica`` models
    evicts the least recently used one (its thread and metrics go with it).
    """

    def __init__(self, store_uri: str, spec: MultiplexSpec):
        self.store, self.spec = ModelStore(store_uri), spec
        async def load(model_id: str) -> ModelWorker:  # a function: Serve keeps its cache on it
            return await self._load(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=spec.max_models_per_replica)(load)

    async def _load(self, model_id: str) -> ModelWorker:
        from serve_app.served import parse_multiplexed_model_id

        name, version = parse_multiplexed_model_id(model_id)
        return await asyncio.get_running_loop().run_in_executor(
            None, ModelWorker.from_store, self.store, self.spec.spec_for(name, version))

    async def infer(self, X: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        worker = await self.get_model(serve.get_multiplexed_model_id())
        return await worker.infer(X, outputs)
