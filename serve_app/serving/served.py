"""One model name as the ingress serves it: its live versions, the canary split, the shadow.

A :class:`ServedModel` does not care where a version runs: each version is a
:class:`~serve_app.serving.interface.Worker`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Mapping

import numpy as np

from serve_app.config import ModelSpec
from serve_app.errors import ModelNotFoundError
from serve_app.metadata import ModelMetadata
from serve_app.monitoring import telemetry
from serve_app.serving.interface import Answer, ModelInput, Worker, distinct
from serve_app.serving.routing import TrafficSplit

logger = logging.getLogger("ray.serve")

# Shadows never queue without bound behind a slow shadow version: beyond this many in flight
# per model a mirrored request is dropped (and counted as dropped).
MAX_SHADOWS_IN_FLIGHT = 64


class ServedModel:
    """The live versions of one model and which of them answers a request.

    ``workers`` maps each configured version label (``"latest"``, ``"2"``) to its worker; the
    paths address versions by their real number. ``open_version``, when given, loads a version
    that is not live on first use (the multiplexed long tail can address any stored version).
    """

    def __init__(self, name: str, workers: Mapping[str, Worker], default: str,
                 traffic: Mapping[str, float] | None = None, shadow: str | None = None,
                 serving: str = "in-process",
                 open_version: Callable[[str], Awaitable[Worker]] | None = None):
        self.name, self.serving = name, serving
        self.default = workers[default]
        self.by_version: dict[str, Worker] = {}
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
    def spec(self) -> ModelSpec:
        return self.default.spec

    @classmethod
    def declared(cls, spec: ModelSpec, workers: Mapping[str, Worker], serving: str) -> "ServedModel":
        """A model of the config: its live versions, split and shadow as the spec says."""
        return cls(spec.name, workers, spec.version, spec.traffic, spec.shadow, serving)

    async def pick(self, version: str | None, key: str | None) -> Worker:
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

    async def infer(self, worker: Worker, inputs: ModelInput, outputs: tuple[str, ...], mirror: bool) -> Answer:
        """``worker``'s answer; with ``mirror`` (an unversioned request) the shadow version
        gets the same request afterwards."""
        answer = await worker.infer(inputs, outputs)
        if mirror and self.shadow is not None:
            self._mirror(inputs, outputs, answer)
        return answer

    def _mirror(self, inputs: ModelInput, outputs: tuple[str, ...], served: Answer) -> None:
        """Send a served request to the shadow version too, without waiting for it."""
        version = self.shadow.meta.version
        if self._shadows_in_flight >= MAX_SHADOWS_IN_FLIGHT:
            telemetry.shadow_done(self.name, version, "dropped", None)
            return
        self._shadows_in_flight += 1
        asyncio.get_running_loop().create_task(self._shadow(inputs, outputs, served, version))

    async def _shadow(self, inputs: ModelInput, outputs: tuple[str, ...], served: Answer, version: str) -> None:
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.shadow.spec.timeout_s):
                    answer = await self.shadow.infer(inputs, outputs)
            except Exception as exc:  # a broken shadow never touches the served answer
                logger.warning("shadow version %s of model %r failed: %r", version, self.name, exc)
                telemetry.shadow_done(self.name, version, "error", time.perf_counter() - started)
                return
            outcome = "match" if same_answer(served.outputs, answer.outputs, outputs) else "mismatch"
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


def same_answer(served: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], outputs: tuple[str, ...]) -> bool:
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
