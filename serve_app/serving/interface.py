"""The model interface: what a codec hands the serving layer (:class:`ModelInput`), what
a worker gives back (:class:`Answer`), and the :class:`Worker` protocol that every place a
model version can run implements: this replica (:class:`serve_app.serving.worker.ModelWorker`),
a dedicated deployment behind a handle, or the shared multiplexed deployment
(:mod:`serve_app.deployments`). The serving layer (registry, served models) only talks to
this protocol, so it never asks where a model runs.

Inputs and answers cross DeploymentHandles, so both are small frozen dataclasses that pickle
as they are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from serve_app.config import ModelSpec
from serve_app.metadata import ModelMetadata
from serve_app.runtimes.base import Explanation


@dataclass(frozen=True, eq=False)
class ModelInput:
    """Validated rows for one model, features in the model's order, in one of two forms.

    - ``matrix``: one float64 array, for numeric models: what the runtimes predict on without
      a copy, and what every all-numeric request becomes.
    - ``columns``: one 1-D array per feature, for models fitted on a DataFrame
      (``input_form: frame``): numbers and booleans as such, string and category columns as
      Python strings (NaN: missing). The runtime builds one DataFrame per model call from them
      (``ModelRuntime.prepare``, category columns in their training categories): requests
      concatenate as plain arrays, and no DataFrame is built per request on the event loop.
    """

    feature_names: tuple[str, ...]
    matrix: np.ndarray | None = None  # float64, (rows, len(feature_names))
    columns: Mapping[str, np.ndarray] | None = None  # feature name -> (rows,)

    @property
    def data(self):
        """What the runtime prepares for the model: the matrix or the columns."""
        return self.matrix if self.columns is None else self.columns

    @property
    def rows(self) -> int:
        if self.columns is None:
            return self.matrix.shape[0]
        return len(self.columns[self.feature_names[0]])

    @classmethod
    def concat(cls, parts: Sequence["ModelInput"]) -> "ModelInput":
        """Several requests' rows as one batch (same model, so the same features and form)."""
        names = parts[0].feature_names
        if parts[0].columns is None:
            return cls(names, np.concatenate([p.matrix for p in parts]))
        return cls(names, columns={n: np.concatenate([p.columns[n] for p in parts]) for n in names})


@dataclass(frozen=True)
class Answer:
    """A model's answer to one request.

    ``version`` names the version that computed it: during a rollout of a dedicated model the
    ingress can reach a replica of another version than it asked for, and the answer (its
    ``model_version``, ``X-Model-Version`` and metrics) must name the one that answered. The
    version's full metadata stays out: it carries kilobytes of drift statistics, and answers
    cross handles.
    """

    outputs: Mapping[str, np.ndarray]
    version: str
    explanation: Explanation | None = None  # method, margin and its outputs, when contributions were asked


class Worker(Protocol):
    """One loaded model version, wherever it runs."""

    meta: ModelMetadata        # the version this worker serves (a proxy: the one that answered last)
    accepts_missing: bool      # whether null/NaN inputs are legal (the runtime's property)
    spec: ModelSpec            # batching, timeout and drift settings of this version

    async def infer(self, inputs: ModelInput, outputs: tuple[str, ...]) -> Answer:
        """The requested ``outputs`` for every row of ``inputs``."""
        ...

    async def check(self) -> None:
        """Raise unless the model still predicts (the replica's health check)."""
        ...

    def reconfigure(self, spec: ModelSpec) -> None:
        """Serve by ``spec`` from now on: the same version, other batching, timeout or drift."""
        self.spec = spec

    def close(self) -> None:
        """Release what the worker holds (replaced by a reload, or evicted)."""
        ...


def distinct(workers) -> list:
    """Each worker once: several version labels ("latest", "3") can share one loaded model."""
    return list({id(w): w for w in workers}.values())



def close_later(workers, after_s: float) -> None:
    """Close replaced workers once requests already holding them have had time to finish."""
    unique = distinct(workers)
    asyncio.get_running_loop().call_later(after_s + 1.0, lambda: [w.close() for w in unique])
