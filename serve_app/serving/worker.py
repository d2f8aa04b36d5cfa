"""A loaded model plus its dynamic-batching queue: the one place a model is called.

The same :class:`ModelWorker` runs inside the HTTP ingress replica (the default: no
DeploymentHandle hop on the request path), inside a dedicated per-model deployment, or in a
replica of the multiplexed long tail (:mod:`serve_app.deployments`). Requests are queued with
``@serve.batch`` and sized in rows, so many single-row requests share one model call while a
large request runs on its own.

Where a model call runs: on the model's own thread, so a slow model cannot freeze the replica
(timeouts fire, health checks and other models answer), unless it is small and this model's
calls have been quick (``inline_below_ms``): then on the event loop, as a hand-written server
calls its model. Handing a sub-millisecond call to a thread and back costs more CPU than the
call itself (docs/performance.md#levers).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from ray import serve

from serve_app.codecs.tables import typical_row
from serve_app.config import ModelSpec
from serve_app.errors import ModelTooLarge
from serve_app.metadata import ModelMetadata
from serve_app.monitoring.drift import DriftMonitor
from serve_app.monitoring.telemetry import ModelTelemetry
from serve_app.runtimes import ModelRuntime, runtime_for
from serve_app.serving.interface import Answer, ModelInput, Worker
from serve_app.serving.outputs import EXPLANATION_OUTPUTS, predictions, wants_explanation
from serve_app.store import ModelStore

logger = logging.getLogger("ray.serve")

Outputs = dict[str, np.ndarray]
_Item = tuple[ModelInput, tuple[str, ...]]


def _rows(items: Sequence[_Item]) -> int:
    return sum(inputs.rows for inputs, _ in items)


def refuse_if_too_large(meta: ModelMetadata, size: int | None, max_bytes: int | None) -> None:
    """ModelTooLarge when ``size`` (the artifact's bytes) is over ``max_bytes``."""
    if size is not None and max_bytes is not None and size > max_bytes:
        raise ModelTooLarge(
            f"model {meta.name!r} version {meta.version} is not loaded: its artifact is {size:,} bytes "
            f"({size / 2**20:.1f} MiB), over this server's max_model_bytes of {max_bytes:,} bytes "
            f"({max_bytes / 2**20:.1f} MiB)")


def _batch_handler(worker: "ModelWorker"):
    """The worker's ``_run_batch`` for Serve's batch queue, holding the worker weakly. The queue
    runs a task that lives until the event loop ends and keeps its handler; a bound method
    would keep the model with it after an eviction, until a full garbage collection (rare in a
    replica: its heap is large and old)."""
    ref = weakref.ref(worker)

    async def _run_batch(items: list[_Item]) -> list[Outputs | Exception]:  # Serve's batch metrics' label
        return await ref()._run_batch(items)  # a batch's requests hold the worker

    return _run_batch


class ModelWorker(Worker):
    """A model version loaded in this process."""

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
        # Moving average of small model calls; None until the second (the first is a cold start).
        self._call_seconds: float | None = None
        self._warmed_up = False
        self._probe = self._reference_row()
        self._batched = serve.batch(
            max_batch_size=spec.max_batch_size,
            batch_wait_timeout_s=spec.batch_wait_timeout_s,
            batch_size_fn=_rows,
        )(_batch_handler(self))
        self.telemetry.loaded(load_seconds)

    @classmethod
    def from_store(cls, store: ModelStore, spec: ModelSpec) -> "ModelWorker":
        """Load ``spec``'s version, refused (ModelTooLarge) before it is read when the backend
        knows the artifact is over ``spec.max_model_bytes``, else before it is deserialised."""
        started = time.perf_counter()
        meta = store.read_metadata(spec.name, spec.version)
        refuse_if_too_large(meta, store.artifact_size(meta), spec.max_model_bytes)
        artifact = store.read_artifact(meta)
        refuse_if_too_large(meta, len(artifact), spec.max_model_bytes)
        runtime = runtime_for(meta.framework).load(artifact, meta)
        return cls(runtime, spec, time.perf_counter() - started)

    def reconfigure(self, spec: ModelSpec) -> None:
        """Apply new batching and drift settings without reloading the model."""
        if spec.drift != self.spec.drift:
            self.drift = DriftMonitor(self.meta, **spec.drift.model_dump())
        self.spec = spec
        self._batched.set_max_batch_size(spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    def close(self) -> None:
        """Release the model's thread and stop reporting it (replaced after a reload). Safe to
        call twice."""
        self._unloaded()
        self._model_thread.shutdown(wait=False)

    def _unloaded(self) -> None:
        if not self._closed:
            self._closed = True
            self.telemetry.unloaded()

    def __del__(self) -> None:
        """Serve's multiplexing calls this when it evicts the model, while requests may still
        hold it: only the metrics go here. The model, its thread and its batching queue go with
        the last reference, which nothing else keeps (see _batch_handler)."""
        try:
            self._unloaded()
        except Exception:
            pass

    # -- the request path -----------------------------------------------------------------
    async def infer(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Answer:
        self.drift.observe(inputs)
        if self.drift.due():
            self._start_drift_update()
        if wants_explanation(outputs):
            return await self._explain(inputs, outputs)
        return Answer(await self._predict(inputs, outputs), self.meta.version)

    async def _predict(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Outputs:
        self._pending += 1
        try:
            if self._skips_queue(inputs):
                return await self._call_model(inputs, outputs)
            answer = await self._batched((inputs, outputs))
        finally:
            self._pending -= 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _skips_queue(self, inputs: ModelInput) -> bool:
        """A request that could share no batch goes straight to the model: one that is already a
        full batch, and, when batches do not wait, one that finds the model idle (the queue would
        call the model with it alone, after a few more event-loop turns). Under load requests
        find others pending and queue as before."""
        if inputs.rows >= self.spec.max_batch_size:
            return True
        return self.spec.batch_wait_timeout_s == 0 and self._pending == 1  # only this request

    async def _run_batch(self, items: list[_Item]) -> list[Outputs | Exception]:
        if len(items) == 1:
            return [await self._alone(*items[0])]
        wanted = tuple(dict.fromkeys(o for _, outs in items for o in outs))
        try:
            results = await self._call_model(ModelInput.concat([inputs for inputs, _ in items]), wanted)
        except Exception:
            # One request's rows broke the shared call (say, a huge value overflowing inside a
            # pipeline): answer each request on its own, so only the one that caused it fails.
            return [await self._alone(inputs, outs) for inputs, outs in items]
        answers, start = [], 0
        for inputs, outs in items:
            stop = start + inputs.rows
            answers.append({o: results[o][start:stop] for o in outs})
            start = stop
        return answers

    async def _alone(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Outputs | Exception:
        """One request's answer, or its exception as a value: a batch result is per request."""
        try:
            return await self._call_model(inputs, outputs)
        except Exception as exc:
            return exc

    async def _call_model(self, inputs: ModelInput, outputs: Sequence[str]) -> Outputs:
        """``_compute`` on the event loop when it is small and quick (see the module docstring),
        else on the model's thread."""
        average, limit = self._call_seconds, self.spec.inline_below_ms / 1000.0
        if average is not None and average < limit and inputs.rows <= self.spec.max_batch_size:
            return self._compute(inputs, outputs)
        return await self._on_model_thread(self._compute, inputs, outputs)

    def _compute(self, inputs: ModelInput, outputs: Sequence[str]) -> Outputs:
        started = time.perf_counter()
        try:
            return self._results(inputs, outputs, started)
        finally:
            if inputs.rows <= self.spec.max_batch_size:  # what decides where the next small call runs
                took = time.perf_counter() - started
                average = self._call_seconds
                if not self._warmed_up:  # a first call's caches are cold: it says little of the next
                    self._warmed_up = True
                else:
                    self._call_seconds = took if average is None else 0.9 * average + 0.1 * took

    def _results(self, inputs: ModelInput, outputs: Sequence[str], started: float) -> Outputs:
        results = predictions(self.runtime, inputs.data, outputs)
        self.telemetry.called(inputs.rows, time.perf_counter() - started, results)
        return results

    async def _explain(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Answer:
        """Explanations are heavier than predictions and have their own shape: they run on the
        model thread directly, not through the batching queue; predictions asked alongside do."""
        explanation = await self._on_model_thread(self._explanation, inputs)
        results = {"contributions": explanation.contributions, "bias": explanation.bias}
        rest = tuple(o for o in outputs if o not in EXPLANATION_OUTPUTS)
        if rest:
            results.update(await self._predict(inputs, rest))
        return Answer(results, self.meta.version, explanation)

    def _explanation(self, inputs: ModelInput):
        return self.runtime.explain(self.runtime.prepare(inputs.data))

    async def _on_model_thread(self, fn, *args):
        """``fn(*args)`` on this model's own thread, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    # -- health and drift -----------------------------------------------------------------
    def _reference_row(self):
        """One typical input for health probes, as the model takes it."""
        return self.runtime.prepare(typical_row(self.meta).data)

    async def check(self) -> None:
        """Raise unless the model still predicts: one row through the model, outside the
        batching queue (Serve calls this from ``check_health`` and replaces a replica that fails)."""
        async with asyncio.timeout(self.spec.timeout_s):
            result = await self._on_model_thread(self.runtime.predict, self._probe)
        if np.asarray(result).shape[0] != 1:
            raise RuntimeError(f"model {self.meta.name!r} answered a one-row probe with {result!r}")

    def _start_drift_update(self) -> None:
        """PSI of the current window, computed on a thread of its own: the request does not
        wait, and nothing waits for it (it reports through telemetry)."""
        window = self.drift.snapshot()
        self.drift.computing = True

        def run() -> None:
            try:
                self.telemetry.drift(self.drift.compute(window), window.shape[0])
            except Exception:
                logger.exception("drift computation failed for model %s", self.meta.name)
            finally:
                self.drift.computing = False

        threading.Thread(target=run, name=f"drift-{self.meta.name}", daemon=True).start()


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
