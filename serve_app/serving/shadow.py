"""Shadow traffic: a version that gets a copy of every unversioned request, after the served
answer, whose answers are compared with the served ones, counted and discarded.

:class:`ShadowedWorker` wraps the worker that serves a request and implements the same
:class:`~serve_app.serving.interface.Worker` protocol, so a route cannot tell it from the
worker it wraps: the served answer is returned as it is, and the mirror runs afterwards
without the request waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping

import numpy as np

from serve_app.config import ModelSpec
from serve_app.metadata import ModelMetadata
from serve_app.monitoring import telemetry
from serve_app.serving.interface import Answer, ModelInput, Worker
from serve_app.serving.outputs import wants_explanation

logger = logging.getLogger("ray.serve")

# Shadows never queue without bound behind a slow shadow version: beyond this many in flight
# per model a mirrored request is dropped (and counted as dropped).
MAX_SHADOWS_IN_FLIGHT = 64


class Shadow:
    """One model's shadow version and its mirrored requests in flight."""

    def __init__(self, model: str, worker: Worker):
        self.model, self.worker = model, worker
        self.in_flight = 0

    def mirror(self, inputs: ModelInput, outputs: tuple[str, ...], served: Answer) -> None:
        """Send a served request to the shadow version too, without waiting for it."""
        version = self.worker.meta.version
        if self.in_flight >= MAX_SHADOWS_IN_FLIGHT:
            telemetry.shadow_done(self.model, version, "dropped", None)
            return
        self.in_flight += 1
        asyncio.get_running_loop().create_task(self._compare(inputs, outputs, served, version))

    async def _compare(self, inputs: ModelInput, outputs: tuple[str, ...], served: Answer, version: str) -> None:
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.worker.spec.timeout_s):
                    answer = await self.worker.infer(inputs, outputs)
            except Exception as exc:  # a broken shadow never touches the served answer
                logger.warning("shadow version %s of model %r failed: %r", version, self.model, exc)
                telemetry.shadow_done(self.model, version, "error", time.perf_counter() - started)
                return
            outcome = "match" if same_answer(served.outputs, answer.outputs, outputs) else "mismatch"
            telemetry.shadow_done(self.model, version, outcome, time.perf_counter() - started)
        finally:
            self.in_flight -= 1


class ShadowedWorker(Worker):
    """A live version as unversioned requests reach it: served, then mirrored to the shadow.
    Explanations are not mirrored (the shadow compares predictions)."""

    def __init__(self, served: Worker, shadow: Shadow):
        self.served, self.shadow = served, shadow

    @property
    def meta(self) -> ModelMetadata:
        return self.served.meta

    @property
    def accepts_missing(self) -> bool:
        return self.served.accepts_missing

    @property
    def spec(self) -> ModelSpec:
        return self.served.spec

    async def infer(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Answer:
        answer = await self.served.infer(inputs, outputs)
        if not wants_explanation(outputs):
            self.shadow.mirror(inputs, outputs, answer)
        return answer

    async def check(self) -> None:
        await self.served.check()

    def close(self) -> None:
        """The wrapped workers belong to their model, which closes them."""


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
