"""One model name as the ingress serves it: its live versions, the canary split, the shadow.

A :class:`ServedModel` does not care where a version runs: each version is a *worker* with
``meta``, ``accepts_missing``, ``spec`` and ``async infer(X, outputs)`` -- a
:class:`~serve_app.worker.ModelWorker` in the ingress replica, a :class:`RemoteWorker` for a
dedicated deployment, or a :class:`MultiplexedWorker` for the shared long-tail deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from serve_app import telemetry
from serve_app.errors import InferenceError, ModelNotFoundError
from serve_app.metadata import ModelMetadata
from serve_app.routing import TrafficSplit
from serve_app.store import ModelStore
from serve_app.worker import distinct

logger = logging.getLogger("ray.serve")

# Shadows never queue without bound behind a slow shadow version: beyond this many in flight
# per model a mirrored request is dropped (and counted as dropped).
MAX_SHADOWS_IN_FLIGHT = 64


async def _remote_infer(call) -> dict:
    try:
        return await call
    except RayTaskError as exc:
        # The model's client error, as raised there: Ray's wrapper hides its reason.
        if isinstance(exc.cause, InferenceError):
            raise exc.cause from None
        raise


class RemoteWorker:
    """One version of a dedicated model seen from the ingress: same ``infer`` as ModelWorker.

    The dedicated deployment can roll to another model version while this ingress lives on
    (a config change to ``model-<name>`` alone), and during the rollout old and new replicas
    answer side by side. So each answer says which version computed it, and is described with
    that version's metadata (read once per version), never with the version this ingress
    started with.
    """

    def __init__(self, meta: ModelMetadata, accepts_missing: bool, handle: DeploymentHandle, spec,
                 store: ModelStore, label: str):
        self.meta, self.accepts_missing, self._handle, self.spec = meta, accepts_missing, handle, spec
        self._store, self.label = store, label
        self._metas = {meta.version: meta}

    async def infer(self, X: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        results = await _remote_infer(self._handle.infer.remote(X, outputs, self.label))
        version = results["model_version"]
        if version not in self._metas:
            self._metas[version] = await asyncio.get_running_loop().run_in_executor(
                None, self._store.read_metadata, self.meta.name, version)
        self.meta = results["model_meta"] = self._metas[version]  # the newest answer describes the model
        return results

    def close(self) -> None:
        pass


class MultiplexedWorker:
    """One version of a long-tail model, served by the shared multiplexed deployment.

    The model id names the exact version and the reload generation, so Serve routes the
    request to a replica that has that model loaded (or loads it there), and a reload makes
    a new id that no replica has cached.
    """

    def __init__(self, meta: ModelMetadata, accepts_missing: bool, handle: DeploymentHandle, spec,
                 generation: int):
        self.meta, self.accepts_missing, self.spec = meta, accepts_missing, spec
        self.model_id = multiplexed_model_id(meta.name, meta.version, generation)
        self._handle = handle.options(multiplexed_model_id=self.model_id)

    async def infer(self, X: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        return await _remote_infer(self._handle.infer.remote(X, outputs))

    def close(self) -> None:
        pass


def multiplexed_model_id(name: str, version: str, generation: int) -> str:
    return f"{name}:{version}:{generation}"


def parse_multiplexed_model_id(model_id: str) -> tuple[str, str]:
    name, version, _generation = model_id.split(":")
    return name, version


class ServedModel:
    """The live versions of one model and which of them answers a request.

    ``workers`` maps each configured version label (``"latest"``, ``"2"``) to its worker; the
    paths address versions by their real number. ``open_version``, when given, loads a version
    that is not live on first use (the multiplexed long tail can address any stored version).
    """

    def __init__(self, name: str, workers: Mapping[str, Any], default: str,
                 traffic: Mapping[str, float] | None = None, shadow: str | None = None,
                 serving: str = "in-process",
                 open_version: Callable[[str], Awaitable[Any]] | None = None):
        self.name, self.serving = name, serving
        self.default = workers[default]
        self.by_version: dict[str, Any] = {}
        for worker in workers.values():
            self.by_version.setdefault(worker.meta.version, worker)
        weights: dict[str, float] = {}
        for label, weight in (traffic or {}).items():
            version = workers[label].meta.version
            weights[version] = weights.get(version, 0.0) + weight
        self.weights = weights
        self.split = TrafficSplit(weights) if weights else None
        self.shadow = workers[shadow] if shadow else None
        self._open_version = open_version
        self._shadows_in_flight = 0

    @property
    def meta(self) -> ModelMetadata:
        return self.default.meta

    @property
    def spec(self):
        return self.default.spec

    async def pick(self, version: str | None, key: str | None):
        """The worker for an explicit ``version``, else the split's choice for ``key``."""
        if version is None:
            return self.by_version[self.split.choose(key)] if self.split else self.default
        worker = self.by_version.get(version)
        if worker is None and self._open_version is not None:
            worker = self.by_version[version] = await self._open_version(version)
        if worker is None:
            raise ModelNotFoundError(
                f"model {self.name!r} has no version {version!r} loaded; loaded: {sorted(self.by_version)}")
        return worker

    def mirror(self, X: np.ndarray, outputs: tuple[str, ...], served: Mapping[str, Any]) -> None:
        """Send a served request to the shadow version too, without waiting for it."""
        if self.shadow is None:
            return
        version = self.shadow.meta.version
        if self._shadows_in_flight >= MAX_SHADOWS_IN_FLIGHT:
            telemetry.shadow_done(self.name, version, "dropped", None)
            return
        self._shadows_in_flight += 1
        asyncio.get_running_loop().create_task(self._shadow(X, outputs, served, version))

    async def _shadow(self, X, outputs, served, version) -> None:
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.shadow.spec.timeout_s):
                    answer = await self.shadow.infer(X, outputs)
            except Exception as exc:  # a broken shadow never touches the served answer
                logger.warning("shadow version %s of model %r failed: %r", version, self.name, exc)
                telemetry.shadow_done(self.name, version, "error", time.perf_counter() - started)
                return
            outcome = "match" if same_answer(served, answer, outputs) else "mismatch"
            telemetry.shadow_done(self.name, version, outcome, time.perf_counter() - started)
        finally:
            self._shadows_in_flight -= 1

    def describe(self) -> list[dict]:
        """One entry per live version (the model index)."""
        entries = []
        for version, worker in sorted(self.by_version.items()):
            entries.append({
                "name": self.name, "version": version, "state": "READY", "serving": self.serving,
                "default": worker is self.default,
                "traffic_percent": self.weights.get(version, 0.0) if self.split else (
                    100.0 if worker is self.default else 0.0),
                "shadow": worker is self.shadow,
                "framework": worker.meta.framework, "task": worker.meta.task,
            })
        return entries

    def close(self) -> None:
        for worker in distinct(self.by_version.values()):
            worker.close()


def same_answer(served: Mapping[str, Any], shadow: Mapping[str, Any], outputs: tuple[str, ...]) -> bool:
    """Whether two answers agree on every asked output (floats within 1e-6 relative)."""
    for output in outputs:
        a, b = np.asarray(served[output]), np.asarray(shadow[output])
        if a.shape != b.shape:
            return False
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            if not np.allclose(a, b, rtol=1e-6, atol=1e-9, equal_nan=True):
                return False
        elif not np.array_equal(a, b):
            return False
    return True
